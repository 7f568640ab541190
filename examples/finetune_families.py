"""One LoRA fine-tuning run per family, end to end, on every transformers release.

    python examples/finetune_families.py                    # each family on its tiny built-in model: offline, CPU
    python examples/finetune_families.py --family chatglm   # one family
    python examples/finetune_families.py --family baichuan --model /path/to/Baichuan2-7B-Chat --output_dir out

For each family: the model and its remote tokenizer are loaded; a small chat dataset is written in the family's
own chat format (what its remote code builds for ``chat()``), only the answers learned; LoRA on the family's
usual targets with gradient checkpointing, trained by ``Trainer(gradient_checkpointing=True)``; the adapter
saved, reloaded on a fresh base model, and asked to answer. qwen-ckpt-compat adds two lines: the import (first)
and ``prepare_for_lora``. The "Checks" prove the run; leave them out of your own script.
"""

import qwen_ckpt_compat  # noqa: F401  (qwen-ckpt-compat) first: it repairs the remote model and tokenizer as they load

# isort: split

import argparse
import importlib.util
import tempfile
from typing import Callable, Dict, List, Tuple

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat.testing import TINY_FAMILIES, watch_checkpointing

IGNORE_INDEX = -100  # labels the loss skips
CONVERSATIONS = [
    ("Hi!", "Hello! How can I help?"),
    ("What is 2 + 2?", "4."),
    ("Name a colour.", "Blue."),
    ("Say yes.", "Yes."),
    ("Count to three.", "1, 2, 3."),
    ("Thanks!", "You are welcome."),
]


# --- each family's chat format: (prompt ids, answer ids) for one turn ---------------------------------------


def chatml(tokenizer, model, query: str, answer: str) -> Tuple[List[int], List[int]]:
    """Qwen v1, Qwen-VL and Qwen-Audio: ChatML with a system prompt; the answer ends with ``<|im_end|>``."""
    start, end, newline = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")
    prompt = start + tokenizer.encode("system\nYou are a helpful assistant.") + end + newline
    prompt += start + tokenizer.encode(f"user\n{query}") + end + newline + start + tokenizer.encode("assistant\n")
    return prompt, tokenizer.encode(answer) + end


def chatglm3(tokenizer, model, query: str, answer: str) -> Tuple[List[int], List[int]]:
    """ChatGLM3 and GLM-4: the tokenizer's ``build_chat_input`` (``[gMASK]sop<|user|>...<|assistant|>``); the
    answer then EOS."""
    prompt = tokenizer.build_chat_input(query)["input_ids"][0].tolist()
    return prompt, tokenizer.encode(f"\n{answer}", add_special_tokens=False) + [tokenizer.eos_token_id]


def baichuan2(tokenizer, model, query: str, answer: str) -> Tuple[List[int], List[int]]:
    """Baichuan2: the reserved user and assistant ids of its ``generation_config``; the answer then EOS."""
    config = model.generation_config
    prompt = [config.user_token_id] + tokenizer.encode(query) + [config.assistant_token_id]
    return prompt, tokenizer.encode(answer) + [tokenizer.eos_token_id]


def internlm(tokenizer, model, query: str, answer: str) -> Tuple[List[int], List[int]]:
    """InternLM v1: ``<s><|User|>:...<eoh>\\n<|Bot|>:``; the answer ends with ``<eoa>\\n``."""
    prompt = tokenizer(f"<|User|>:{query}<eoh>\n<|Bot|>:")["input_ids"]  # the tokenizer adds <s>
    return prompt, tokenizer.encode(f"{answer}<eoa>\n", add_special_tokens=False)


CHAT_FORMATS: Dict[str, Callable] = {
    "qwen": chatml, "qwen_vl": chatml, "qwen_audio": chatml, "chatglm": chatglm3, "glm4": chatglm3,
    "baichuan": baichuan2, "internlm": internlm,
}  # fmt: skip


def encode(tokenizer, model, family: str, query: str, answer: str) -> Dict[str, List[int]]:
    prompt, response = CHAT_FORMATS[family](tokenizer, model, query, answer)
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def collate(pad_id: int) -> Callable[[List[dict]], Dict[str, torch.Tensor]]:
    def pad(rows: List[dict]) -> Dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        batch: Dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        for row in rows:
            padding = width - len(row["input_ids"])
            batch["input_ids"].append(row["input_ids"] + [pad_id] * padding)
            batch["labels"].append(row["labels"] + [IGNORE_INDEX] * padding)
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * padding)
        return {name: torch.tensor(values) for name, values in batch.items()}

    return pad


def finetune(family: str, model_path: str, output_dir: str) -> None:
    transformers.set_seed(0)  # before peft draws the LoRA weights: the same run every time
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model = prepare_for_lora(model)  # (qwen-ckpt-compat) checkpointing that works with LoRA, on every release
    targets = list(TINY_FAMILIES[family].target_modules)  # the family's usual LoRA targets
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))

    dataset = [encode(tokenizer, model, family, query, answer) for query, answer in CONVERSATIONS]
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    arguments = dict(
        output_dir=output_dir, gradient_checkpointing=True, max_steps=12, learning_rate=2e-2,
        per_device_train_batch_size=3, logging_steps=4, save_strategy="no", report_to="none", seed=0,
        remove_unused_columns=False,
    )  # fmt: skip
    training_args = transformers.TrainingArguments(**arguments)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate(pad_id))
    loss_before = mean_loss(model, dataset, pad_id)
    with watch_checkpointing(model) as training:
        trainer.train()
    trainer.save_model(output_dir)  # the adapter only
    loss_after = mean_loss(model, dataset, pad_id)

    # The saved adapter, on a fresh base model, answers the first question.
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(base, output_dir).eval()
    prompt, _ = CHAT_FORMATS[family](tokenizer, base, *CONVERSATIONS[0])
    with torch.no_grad():
        generated = reloaded.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=6, do_sample=False, pad_token_id=pad_id,
        )  # fmt: skip
    # The words only: ids past the tokenizer's base vocabulary are special (skipped anyway), or on the tiny
    # fixtures, whose embedding tables are larger than their tokenizers, ids no text decodes to.
    words = [i for i in generated[0, len(prompt) :].tolist() if i < tokenizer.vocab_size]
    answer = tokenizer.decode(words, skip_special_tokens=True)
    print(f"{family}: loss {loss_before:.3f} -> {loss_after:.3f}; the reloaded adapter answers {answer!r}")

    # Checks: training did what it should, and the saved adapter gives the trained model back.
    assert loss_after < loss_before, (loss_before, loss_after)
    assert training.every_block_recomputed(), f"each block runs again in the backward pass: {training.block_runs}"
    assert generated.shape[1] > len(prompt), "generate() produced tokens"
    batch = collate(pad_id)(dataset[:2])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5), "adapter reloads"


def mean_loss(model, dataset: List[dict], pad_id: int) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**collate(pad_id)(dataset)).loss.item()
    model.train()
    return loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(CHAT_FORMATS), action="append", help="default: every family")
    parser.add_argument("--model", help="a model directory of that family (default: its tiny built-in model)")
    parser.add_argument("--output_dir", help="where the adapter is saved (default: a temporary folder)")
    args = parser.parse_args(argv)
    families = args.family or sorted(CHAT_FORMATS)
    if args.model and len(families) != 1:
        parser.error("--model needs exactly one --family")
    for family in families:
        missing = [name for name in TINY_FAMILIES[family].packages if importlib.util.find_spec(name) is None]
        if missing:  # Qwen-VL's remote code imports its vision packages when it loads
            print(f"{family}: skipped, its remote code needs {', '.join(missing)} (pip install them)")
            continue
        model_path = args.model or str(TINY_FAMILIES[family].write(tempfile.mkdtemp(prefix=f"tiny-{family}-")))
        finetune(family, model_path, args.output_dir or tempfile.mkdtemp(prefix=f"lora-{family}-"))
    print("Fine-tuning each family end to end: OK")


if __name__ == "__main__":
    main()
