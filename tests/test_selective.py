"""selective=True: checkpointed blocks keep their attention outputs and recompute the rest, with equal gradients."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    batch,
    count_block_calls,
    enable,
    lora,
    max_relative_difference,
    needs_kwargs,
    needs_selective,
    step_grads,
)
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_ckpt_compat import CompatWarning, UnsupportedTorchError, checkpoint_settings, prepare_for_lora
from qwen_ckpt_compat.selective import saved_ops

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class OpCounts(TorchDispatchMode):
    """Counts the aten operators that really run (a result served from selective recompute's cache does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def attention(self) -> int:
        names = {str(op) for op in saved_ops()}
        return sum(n for op, n in self.counts.items() if op in names)

    def matmuls(self) -> int:
        return sum(n for op, n in self.counts.items() if op in MATMULS)


def _counted_step(model, inputs) -> tuple[dict, OpCounts, Counter]:
    with OpCounts() as ops, count_block_calls(model) as blocks:
        grads = step_grads(model, inputs)
    return grads, ops, blocks


@needs_selective
def test_selective_recomputes_everything_but_attention_with_equal_grads(qwen, tiny_qwen_dir):
    from helpers import load_qwen

    inputs = batch()
    plain = lora(load_qwen(tiny_qwen_dir))
    reference, plain_ops, _ = _counted_step(plain, inputs)
    full = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(full)
    _, full_ops, _ = _counted_step(full, inputs)

    model = lora(qwen)
    prepare_for_lora(model, selective=True)
    grads, ops, blocks = _counted_step(model, inputs)

    assert plain_ops.attention() == 2, "the fused attention kernel runs once per block without checkpointing"
    assert full_ops.attention() == 4, "full checkpointing runs it again in each recompute"
    assert ops.attention() == 2, "selective recompute serves it from its cache in the recompute"
    assert set(blocks.values()) == {2}, "each block's forward still runs twice: the rest is recomputed"
    assert ops.matmuls() == full_ops.matmuls() > plain_ops.matmuls(), "matmuls are recomputed"
    assert max_relative_difference(grads, reference) <= 1e-5
    settings = checkpoint_settings(model)
    assert settings.selective is True and "context_fn" in settings.kwargs


@needs_selective
def test_selective_is_the_default_for_later_enables(qwen):
    """Trainer re-enables checkpointing with no preference: the prepared choice stays."""
    prepare_for_lora(qwen, selective=True)
    enable(qwen)
    assert checkpoint_settings(qwen).selective is True
    _, ops, _ = _counted_step(lora(qwen), batch())
    assert ops.attention() == 2


@needs_kwargs
@needs_selective
def test_an_explicit_reentrant_request_drops_selective_with_a_warning(qwen):
    prepare_for_lora(qwen, selective=True)
    with pytest.warns(CompatWarning, match="selective recompute cannot be used"):
        enable(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert checkpoint_settings(qwen).selective is False
    assert "context_fn" not in checkpoint_settings(qwen).kwargs
    _, ops, _ = _counted_step(lora(qwen), batch())
    assert ops.attention() == 4


def test_selective_needs_the_non_reentrant_checkpoint(qwen):
    with pytest.raises(ValueError, match="non-reentrant"):
        prepare_for_lora(qwen, selective=True, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_torch_without_selective_checkpointing_gets_a_clear_error(qwen, monkeypatch):
    monkeypatch.delattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", raising=False)  # < 2.5 lacks it
    with pytest.raises(UnsupportedTorchError, match=r"torch >= 2\.5.*create_selective_checkpoint_contexts"):
        prepare_for_lora(qwen, selective=True)
    prepare_for_lora(qwen)  # everything else still works


@needs_selective
def test_native_models_get_selective_recompute_through_transformers(native_model_factory):
    if not HAS_CHECKPOINTING_KWARGS:
        pytest.skip("this transformers takes no checkpointing kwargs")
    inputs = batch()
    reference, plain_ops, _ = _counted_step(lora_native(native_model_factory()), inputs)
    if plain_ops.attention() == 0:
        pytest.skip("this transformers' native attention does not call a fused SDPA kernel here")
    model = lora_native(native_model_factory())
    prepare_for_lora(model, selective=True)
    grads, ops, _ = _counted_step(model, inputs)
    assert ops.attention() == plain_ops.attention() == 2, "transformers passed selective recompute's context_fn on"
    assert ops.matmuls() > plain_ops.matmuls()
    assert max_relative_difference(grads, reference) <= 1e-5


def lora_native(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config)
