"""Trainer re-enables checkpointing itself: it must work after prepare_for_lora or after patch alone."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from helpers import HAS_CHECKPOINTING_KWARGS, batch, count_block_calls, lora

from qwen_ckpt_compat import patch, prepare_for_lora


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 4):
        tensors = batch(batch_size=n, length=16, seed=1)
        self.rows = [{k: v[i] for k, v in tensors.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def _training_arguments(tmp_path, checkpointing_kwargs=None, max_steps: int = 2) -> transformers.TrainingArguments:
    """Arguments built once: 4.32's are frozen after construction."""
    parameters = inspect.signature(transformers.TrainingArguments).parameters
    options = dict(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, remove_unused_columns=False, seed=0,
    )
    # 5.23 renamed the switch; the old name stays as a deprecated alias.
    prefix = "activation" if "activation_checkpointing" in parameters else "gradient"
    options[f"{prefix}_checkpointing"] = True
    if checkpointing_kwargs is not None:
        options[f"{prefix}_checkpointing_kwargs"] = checkpointing_kwargs
    options["use_cpu" if "use_cpu" in parameters else "no_cuda"] = True
    return transformers.TrainingArguments(**options)


def _train(model, args) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(before) == 20
    with count_block_calls(model) as counts:
        transformers.Trainer(model=model, args=args, train_dataset=_Rows()).train()
    assert set(counts.values()) == {4}, "2 steps, each block forward and recomputed in the backward pass"
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p.detach(), before[n])]
    assert unchanged == [], f"LoRA tensors not updated by the Trainer: {unchanged}"


@pytest.mark.behaviour("trainer")
@pytest.mark.parametrize("order", ["prepare_then_peft", "peft_then_prepare"])
def test_trainer_after_prepare_for_lora_updates_every_lora_tensor(qwen, tmp_path, order):
    if order == "prepare_then_peft":
        model = lora(prepare_for_lora(qwen))
    else:
        model = prepare_for_lora(lora(qwen))
    _train(model, _training_arguments(tmp_path))


@pytest.mark.behaviour("trainer")
@pytest.mark.parametrize("use_reentrant", [None, True, False])
def test_trainer_after_patch_alone(qwen, tmp_path, use_reentrant):
    if use_reentrant is not None and not HAS_CHECKPOINTING_KWARGS:
        pytest.skip(f"transformers {transformers.__version__} has no gradient_checkpointing_kwargs")
    model = lora(qwen)
    patch(model)
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    _train(model, _training_arguments(tmp_path, kwargs))
