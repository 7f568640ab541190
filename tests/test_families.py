"""ChatGLM2/3, Baichuan2, InternLM v1 and Qwen-VL with the library: the same guarantees as Qwen v1 (issue 8).

Each test runs on the tiny fixture of each family (``qwen_ckpt_compat.testing.TINY_FAMILIES``): checkpointing
recomputes every block, the requested ``use_reentrant`` reaches torch, LoRA trains in both peft orders with
gradients equal to no checkpointing, ``Trainer`` works, the owner's ``use_cache`` duty is done, and the library
import alone honours a request (what peft's ``prepare_model_for_kbit_training`` makes).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers
from conftest import FAMILIES
from helpers import (
    count_calls,
    family_lora,
    max_relative_difference,
    needs_kwargs,
    reentrant_after,
    spy_checkpoint,
    step_grads,
)

from qwen_ckpt_compat import checkpoint_settings, describe, prepare_for_lora

by_family = pytest.mark.parametrize("family_model", FAMILIES, indirect=True)


def _enable(model, **kwargs) -> None:
    """The enable call peft and user code make (on 5.23+ a deprecated alias, still honoured)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)


@pytest.mark.behaviour("kwargs")
@needs_kwargs
@by_family
def test_import_alone_honours_the_request(family_model, monkeypatch):
    family, model, batch = family_model
    _enable(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = family_lora(model, family)
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        grads = step_grads(peft_model, batch)
    assert calls and all(c.get("use_reentrant") is False for c in calls), calls
    assert set(counts.values()) == {2}, "each block once forward, once more in the backward pass"
    assert grads and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.behaviour("kwargs")
@by_family
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_requested_mode_reaches_torch(family_model, monkeypatch, use_reentrant):
    family, model, batch = family_model
    prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpoint_settings(model).use_reentrant is use_reentrant
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        step_grads(model, batch)
    blocks = len([m for m in model.modules() if type(m).__name__ == family.block])
    assert [c.get("use_reentrant") for c in calls][:blocks] == [use_reentrant] * blocks
    assert set(counts.values()) == {2}
    assert reentrant_after(model, family.final_norm, batch) is use_reentrant


@pytest.mark.behaviour("grads_equal")
@by_family
@pytest.mark.parametrize("order", ["prepare_then_peft", "peft_then_prepare"])
def test_lora_grads_with_checkpointing_equal_those_without(family_model, order):
    family, model, batch = family_model
    if order == "prepare_then_peft":
        prepare_for_lora(model, use_gradient_checkpointing=False)
        peft_model = family_lora(model, family)
    else:
        peft_model = family_lora(model, family)
        prepare_for_lora(peft_model, use_gradient_checkpointing=False)  # Baichuan2 enabled it while being built
    with count_calls(model, family.block) as counts:
        reference = step_grads(peft_model, batch)
    assert set(counts.values()) == {1}, "no checkpointing for the reference"
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    with count_calls(model, family.block) as counts:
        checkpointed = step_grads(peft_model, batch)
    assert set(counts.values()) == {2}
    assert max_relative_difference(checkpointed, reference) <= 1e-5
    assert all(g.abs().sum() > 0 for g in checkpointed.values())


@pytest.mark.behaviour("trainer")
@by_family
def test_trainer_updates_every_lora_tensor(family_model, tmp_path):
    from test_trainer import _training_arguments

    family, model, batch = family_model
    peft_model = family_lora(prepare_for_lora(model), family)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    arguments = _training_arguments(tmp_path / "out")
    with count_calls(model, family.block) as counts:
        transformers.Trainer(model=peft_model, args=arguments, train_dataset=rows).train()
    assert set(counts.values()) == {4}, "2 steps, each block forward and recomputed in the backward pass"
    unchanged = [n for n, p in peft_model.named_parameters() if n in before and torch.equal(p.detach(), before[n])]
    assert before and unchanged == []


@pytest.mark.behaviour("enables")
@by_family
def test_use_cache_is_off_while_training_checkpointed(family_model, caplog):
    """The owner's duty (its forward used to turn use_cache off when checkpointing) is done for its signature."""
    family, model, batch = family_model
    prepare_for_lora(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with caplog.at_level(logging.WARNING):
        out = model(**inputs, use_cache=True)
    assert not out.past_key_values
    assert "use_cache=False" in caplog.text
    model.eval()
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.past_key_values is not None and len(out.past_key_values) == 2


@pytest.mark.behaviour("enables")
@by_family
def test_use_gradient_checkpointing_false_means_off(family_model):
    family, model, batch = family_model
    prepare_for_lora(model)
    prepare_for_lora(model, use_gradient_checkpointing=False)
    with count_calls(model, family.block) as counts:
        step_grads(model, batch)
    assert set(counts.values()) == {1}
    assert not any(m.__dict__.get("gradient_checkpointing") is True for m in model.modules())


@by_family
def test_describe_names_the_family(family_model):
    family, model, _ = family_model
    info = describe(model)
    assert info.old_checkpointing_api and info.is_remote_code
    assert family.block in info.decoder_blocks and info.num_decoder_blocks == 2
