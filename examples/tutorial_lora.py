"""The Qwen-7B-Chat LoRA tutorial flow, on any transformers release, with qwen-ckpt-compat.

    python examples/tutorial_lora.py                          # the tiny built-in model: offline, CPU, seconds
    python examples/tutorial_lora.py --model /path/to/Qwen-7B-Chat --learning-rate 1e-4

The steps are those of the popular Qwen-7B-Chat LoRA tutorials: load the remote code with
``trust_remote_code=True``, call ``enable_input_require_grads()``, add LoRA on ``c_attn``/``c_proj``/``w1``/``w2``,
train with ``Trainer(gradient_checkpointing=True)``, then ``model.chat()`` right after training, while the model
is still in training mode. qwen-ckpt-compat adds two lines, marked below: the import, before ``from_pretrained``,
and ``prepare_for_lora``. The "Checks" at the end prove that it worked; leave them out of your own script.
"""

import qwen_ckpt_compat  # noqa: F401  (qwen-ckpt-compat, 1/2) first: on 4.57+ and 5.x the remote code loads only then

# isort: split

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat.testing import watch_checkpointing, write_tiny_qwen

SYSTEM = "You are Ada, a patient teacher of arithmetic."
DATA = [  # instruction-tuning rows as the tutorials keep them: instruction, input, output
    {"instruction": "Who are you?", "input": "", "output": "I am Ada, and I teach arithmetic."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4."},
    {"instruction": "What is 3 * 3?", "input": "", "output": "3 * 3 = 9."},
    {"instruction": "Add these.", "input": "5 and 7", "output": "5 + 7 = 12."},
    {"instruction": "What is 10 - 4?", "input": "", "output": "10 - 4 = 6."},
    {"instruction": "Halve this.", "input": "8", "output": "8 / 2 = 4."},
    {"instruction": "Say hello.", "input": "", "output": "Hello! Shall we count?"},
    {"instruction": "What is 1 + 1?", "input": "", "output": "1 + 1 = 2."},
]


def tokenize(row: dict, tokenizer, max_length: int) -> dict:
    """One chatml conversation; only the assistant's answer is learned (the prompt's labels are -100)."""
    prompt = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{row['instruction']}{row['input']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(f"{row['output']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Qwen v1 chat model (default: the tiny built-in one)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-2)  # the tiny model; 1e-4 for Qwen-7B-Chat
    args = parser.parse_args()
    set_seed(0)  # the LoRA weights peft draws, too: the same run every time
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="tutorial-lora-")
    model_path = args.model or write_tiny_qwen(tempfile.mkdtemp(prefix="tiny-qwen-"), seq_length=256)

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    model = prepare_for_lora(model)  # (qwen-ckpt-compat, 2/2) non-reentrant checkpointing, on every release
    model.enable_input_require_grads()  # the tutorial's own line: harmless, and no longer needed

    config = LoraConfig(
        task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "w1", "w2"], r=8, lora_alpha=32, lora_dropout=0.1
    )
    model = get_peft_model(model, config)

    train_dataset = [tokenize(row, tokenizer, max_length=256) for row in DATA]
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        gradient_checkpointing=True,  # `activation_checkpointing` on 5.23+; the old name still works
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
    )

    loss_before = mean_loss(model, trainer)
    lora_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    with watch_checkpointing(model) as training:
        trainer.train()
    loss_after = mean_loss(model, trainer)

    model.train()  # where trainer.train() leaves it: the tutorial chats straight away
    with watch_checkpointing(model) as chatting:
        response, history = model.chat(tokenizer, "Who are you?", history=[], system=SYSTEM)
    print(f"loss {loss_before:.3f} -> {loss_after:.3f}; reply: {response!r}")

    # Checks: what the tutorial flow needs from qwen-ckpt-compat, on this transformers release.
    assert loss_after < loss_before, (loss_before, loss_after)
    changed = [name for name, p in model.named_parameters() if name in lora_before and not torch.equal(p, lora_before[name])]
    assert lora_before and sorted(changed) == sorted(lora_before), "every LoRA tensor was trained"
    assert training.every_block_recomputed(), f"each block runs again in the backward pass: {training.block_runs}"
    assert training.use_reentrant == {False}, f"torch.utils.checkpoint received {training.use_reentrant}"
    assert model.training and isinstance(response, str) and history == [("Who are you?", response)]
    assert chatting.used_kv_cache(), f"one new token per step, not the whole prefix: {chatting.first_block_lengths}"
    assert not chatting.checkpoint_calls, "nothing is checkpointed while generating"
    print("tutorial flow: OK")


def mean_loss(model, trainer) -> float:
    """The mean training loss over the training set, without dropout and without grad."""
    model.eval()
    with torch.no_grad():
        batches = trainer.get_train_dataloader()
        losses = [model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item() for batch in batches]
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
