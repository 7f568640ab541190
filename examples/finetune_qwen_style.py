"""A LoRA fine-tuning script shaped like Qwen's own ``finetune.py``, running on every transformers release.

    python examples/finetune_qwen_style.py        # the tiny built-in model and conversations: offline, CPU, seconds
    python examples/finetune_qwen_style.py --model_name_or_path /path/to/Qwen-7B-Chat --data_path chat.json \\
        --output_dir out --use_lora --gradient_checkpointing --bf16 --model_max_length 512 \\
        --num_train_epochs 5 --learning_rate 3e-4 --warmup_ratio 0.01 --per_device_train_batch_size 2

Same shape as Qwen's script: ``HfArgumentParser`` over model, data, training and LoRA arguments; conversations
in chatml where only the assistant's turns are learned; ``Trainer``; the adapter saved at the end. The changes
that make it run on newer transformers are marked "port:" (docs/porting-qwen-finetune.md explains each);
qwen-ckpt-compat adds the import (first) and ``prepare_for_lora``. The "Checks" at the end reload the saved
adapter and prove the run; leave them out of your own script.
"""

import qwen_ckpt_compat  # noqa: F401  (qwen-ckpt-compat) first: on 4.57+ and 5.x the remote code loads only then

# isort: split

import dataclasses
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat.testing import watch_checkpointing, write_tiny_qwen

IGNORE_INDEX = -100  # labels the loss skips
SYSTEM = "You are a helpful assistant."
# port: `--warmup_ratio` is gone from 5.2 on (deprecated in 5.0); `--warmup_steps` takes a ratio below 1 instead.
HAS_WARMUP_RATIO = "warmup_ratio" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
# When run without arguments: the tiny model, the built-in conversations, settings scaled to both.
TINY_RUN = [
    "--use_lora", "--gradient_checkpointing", "--model_max_length", "96",
    "--num_train_epochs", "3", "--learning_rate", "2e-2", "--warmup_ratio", "0.1",
    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
    "--report_to", "none", "--seed", "0",
]  # fmt: skip
SAMPLE_CONVERSATIONS = [
    [("user", "Hi!"), ("assistant", "Hello! How can I help?")],
    [("user", "What is 2 + 2?"), ("assistant", "4.")],
    [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?"), ("assistant", "Green.")],
    [("user", "Say yes."), ("assistant", "Yes.")],
    [("user", "What is 3 * 3?"), ("assistant", "9.")],
    [("user", "Count to three."), ("assistant", "1, 2, 3.")],
    [("user", "Thanks!"), ("assistant", "You are welcome.")],
    [("user", "Spell cat."), ("assistant", "C-A-T.")],
]


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "default: the tiny built-in model"})


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None, metadata={"help": 'JSON list of {"conversations": [{"from": "user", "value": ...}, ...]}'}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=512, metadata={"help": "sequences are right-padded or cut to this"})
    use_lora: bool = False
    if not HAS_WARMUP_RATIO:  # port: accept `--warmup_ratio` where transformers no longer does
        warmup_ratio: float = 0.0

    def __post_init__(self):
        if not HAS_WARMUP_RATIO and self.warmup_ratio:
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"])


def encode_conversation(turns: List[dict], tokenizer, max_length: int) -> Dict[str, torch.Tensor]:
    """chatml token ids, right-padded; labels keep only the assistant's words and their ``<|im_end|>``."""
    pieces = [(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False)]
    for turn in turns:
        if turn["from"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (f"{turn['value']}<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"<|im_start|>{turn['from']}\n{turn['value']}<|im_end|>\n", False))
    input_ids: List[int] = []
    labels: List[int] = []
    for text, learned in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    padding = max_length - len(input_ids)
    return {
        "input_ids": torch.tensor(input_ids + [tokenizer.pad_token_id] * padding),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * padding),
        "attention_mask": torch.tensor([1] * len(input_ids) + [0] * padding),
    }


def load_conversations(data_args: DataArguments, output_dir: str) -> List[List[dict]]:
    if data_args.data_path is None:  # write the built-in sample the way users keep their data
        data_args.data_path = os.path.join(output_dir, "sample_conversations.json")
        rows = [{"id": f"sample-{i}", "conversations": [{"from": who, "value": text} for who, text in turns]}
                for i, turns in enumerate(SAMPLE_CONVERSATIONS)]
        with open(data_args.data_path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    with open(data_args.data_path, encoding="utf-8") as f:
        return [row["conversations"] for row in json.load(f)]


def train(argv: List[str]) -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    model_path = model_args.model_name_or_path or write_tiny_qwen(
        tempfile.mkdtemp(prefix="tiny-qwen-"), seq_length=training_args.model_max_length
    )
    os.makedirs(training_args.output_dir, exist_ok=True)
    transformers.set_seed(training_args.seed)  # before peft draws the LoRA weights: the same run every time

    config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, config=config, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_path, model_max_length=training_args.model_max_length, padding_side="right", use_fast=False,
        trust_remote_code=True,
    )
    tokenizer.pad_token_id = tokenizer.eod_id

    if training_args.gradient_checkpointing:
        model = prepare_for_lora(model)  # (qwen-ckpt-compat) non-reentrant checkpointing, on every release
    if training_args.use_lora:
        lora_config = LoraConfig(
            r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
            target_modules=lora_args.lora_target_modules, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        if training_args.gradient_checkpointing:
            model.enable_input_require_grads()  # Qwen's own line: harmless with the library

    conversations = load_conversations(data_args, training_args.output_dir)
    train_dataset = [encode_conversation(turns, tokenizer, training_args.model_max_length) for turns in conversations]

    # port: 5.0 renamed Trainer(tokenizer=...) to processing_class= (added in 4.46).
    tokenizer_argument = "processing_class" if "processing_class" in inspect.signature(transformers.Trainer).parameters else "tokenizer"
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=train_dataset, **{tokenizer_argument: tokenizer}
    )

    loss_before = mean_loss(model, train_dataset)
    with watch_checkpointing(model) as training:
        trainer.train()
    trainer.save_state()
    # port: Qwen's script saves only where `local_rank == 0`, which a single-process run on 5.x never is (it
    # stays -1), and asks `transformers.deepspeed`, gone since 4.51. `save_model` saves on the one process
    # that should, gathers ZeRO-3 shards itself, and writes only the adapter of a peft model.
    trainer.save_model(training_args.output_dir)
    loss_after = mean_loss(model, train_dataset)
    print(f"loss {loss_before:.3f} -> {loss_after:.3f}; adapter in {training_args.output_dir}")

    # Checks: training did what it should, and the saved adapter gives the trained model back.
    assert loss_after < loss_before, (loss_before, loss_after)
    if training_args.gradient_checkpointing:
        assert training.every_block_recomputed(), f"each block runs again in the backward pass: {training.block_runs}"
        assert training.use_reentrant == {False}, f"torch.utils.checkpoint received {training.use_reentrant}"
    if training_args.use_lora:
        check_adapter_reloads(model, model_path, training_args.output_dir, train_dataset[0])
    print("Qwen-style fine-tuning: OK")


def mean_loss(model, dataset: List[dict]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(**{k: v[None].to(model.device) for k, v in row.items()}).loss.item() for row in dataset]
    return sum(losses) / len(losses)


def check_adapter_reloads(trained, model_path: str, adapter_dir: str, row: dict) -> None:
    """Loads the base model afresh, puts the saved adapter on it, and compares logits with the trained model."""
    inputs = {k: v[None].to(trained.device) for k, v in row.items() if k != "labels"}
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(base.to(trained.device), adapter_dir).eval()
    with torch.no_grad():
        logits = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**inputs).logits
    assert torch.equal(logits, expected), "the reloaded adapter gives the trained model's logits"
    assert not torch.allclose(base_logits, expected), "and the adapter matters"


if __name__ == "__main__":
    train(sys.argv[1:] or TINY_RUN + ["--output_dir", tempfile.mkdtemp(prefix="qwen-style-")])
