"""Routed checkpointing honours the request: mode, recomputation, every_n_layers, offload, use_cache, disable."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import (
    ENABLE_RAISES_TYPEERROR,
    HAS_CHECKPOINTING_KWARGS,
    batch,
    checkpointing_on,
    count_block_calls,
    disable,
    enable,
    lora,
    max_relative_difference,
    needs_kwargs,
    reentrant_in_effect,
    step_grads,
)

from qwen_ckpt_compat import checkpoint_settings, patch, prepare_for_lora


@pytest.mark.behaviour("enables")
def test_enable_works_once_patched(qwen):
    """4.35.x raises TypeError without the library (see test_fixture_faithful); with it every release enables."""
    patch(qwen)
    enable(qwen)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {2}, "each block runs once forward and once more in the backward pass"


@pytest.mark.skipif(not ENABLE_RAISES_TYPEERROR, reason="the TypeError exists on 4.35.x only")
def test_the_4_35_typeerror_is_gone(qwen):
    """`qwen` comes with its class unpatched, as if loaded before the import (test_loading_patch: patched at load)."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'enable'"):
        enable(qwen)
    patch(qwen)
    enable(qwen)
    assert checkpointing_on(qwen)


@pytest.mark.behaviour("kwargs")
@needs_kwargs
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_requested_mode_reaches_torch(qwen, use_reentrant):
    patch(qwen)
    enable(qwen, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert reentrant_in_effect(qwen) is use_reentrant
    assert checkpoint_settings(qwen).use_reentrant is use_reentrant


@pytest.mark.behaviour("kwargs")
def test_no_preference_anywhere_means_non_reentrant(qwen):
    patch(qwen)
    enable(qwen)  # transformers >= 4.38 fills in use_reentrant=True here; nobody asked for it
    assert reentrant_in_effect(qwen) is False


@pytest.mark.behaviour("kwargs")
@needs_kwargs
def test_kwargs_without_use_reentrant_are_passed_on(qwen):
    patch(qwen)
    enable(qwen, gradient_checkpointing_kwargs={"preserve_rng_state": False})
    assert checkpoint_settings(qwen).kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    assert reentrant_in_effect(qwen) is False


@pytest.mark.behaviour("kwargs")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_prepare_for_lora_kwargs_take_effect_on_every_release(qwen, use_reentrant):
    """Also on <= 4.34, whose enable method takes no kwargs at all."""
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert reentrant_in_effect(qwen) is use_reentrant
    # A later enable without kwargs (what Trainer does) keeps the prepared choice.
    enable(qwen)
    assert reentrant_in_effect(qwen) is use_reentrant


@needs_kwargs
def test_explicit_kwargs_win_over_prepared_defaults(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    enable(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert reentrant_in_effect(qwen) is False


@pytest.fixture
def four_blocks(tmp_path):
    """A tiny Qwen v1 model with four decoder blocks (unpatched afterwards)."""
    from helpers import load_qwen

    from qwen_ckpt_compat import unpatch
    from qwen_ckpt_compat.testing import write_tiny_qwen

    model = load_qwen(write_tiny_qwen(tmp_path / "four_blocks", num_hidden_layers=4))
    yield model
    unpatch(model)


def _runs_per_block(model) -> list:
    with count_block_calls(model) as counts:
        step_grads(model)
    return [counts[i] for i in range(4)]


@pytest.mark.behaviour("every_n_layers")
def test_every_n_layers_checkpoints_only_those_blocks(four_blocks):
    prepare_for_lora(four_blocks, every_n_layers=2)
    assert _runs_per_block(four_blocks) == [2, 1, 2, 1]
    enable(four_blocks)  # a later enable without options keeps the prepared choice
    assert _runs_per_block(four_blocks) == [2, 1, 2, 1]


@pytest.mark.behaviour("every_n_layers")
def test_every_n_layers_through_transformers_api_where_it_exists(four_blocks):
    from qwen_ckpt_compat import capabilities

    if not capabilities().every_n_layers:
        pytest.skip(f"transformers {capabilities().transformers} has no every_n_layers")
    patch(four_blocks)
    enable(four_blocks, every_n_layers=2)
    assert _runs_per_block(four_blocks) == [2, 1, 2, 1]
    enable(four_blocks, every_n_layers=3)
    assert _runs_per_block(four_blocks) == [2, 1, 1, 2]


@pytest.mark.behaviour("offload")
def test_offload_saves_block_inputs_on_the_host(qwen, monkeypatch):
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def spy(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    prepare_for_lora(qwen, offload=True)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert len(entered) == 2, "one save_on_cpu context per checkpointed block"
    assert set(counts.values()) == {2}
    assert checkpoint_settings(qwen).offload is True


@pytest.mark.behaviour("grads_equal")
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("order", ["prepare_then_peft", "peft_then_prepare"])
def test_lora_grads_with_checkpointing_equal_those_without(qwen, use_reentrant, order):
    inputs = batch()
    if order == "prepare_then_peft":
        prepare_for_lora(qwen, use_gradient_checkpointing=False)
        model = lora(qwen)
    else:
        model = lora(qwen)
    reference = step_grads(model, inputs)
    prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with count_block_calls(model) as counts:
        checkpointed = step_grads(model, inputs)
    assert set(counts.values()) == {2}
    assert len(checkpointed) == 5 * 2 * 2, "lora_A and lora_B of c_attn, both c_proj, w1 and w2, in both blocks"
    assert max_relative_difference(checkpointed, reference) <= 1e-5


@pytest.mark.behaviour("enables")
def test_use_cache_is_off_while_training_checkpointed(qwen, caplog):
    prepare_for_lora(qwen)
    qwen.config.use_cache = True  # as if the user turned it back on
    with caplog.at_level(logging.WARNING):
        out = qwen(**batch(), use_cache=True)
    assert out.past_key_values is None or len(out.past_key_values) == 0
    assert "use_cache=False" in caplog.text
    qwen.eval()
    with torch.no_grad():
        out = qwen(**batch(), use_cache=True)
    assert out.past_key_values is not None and len(out.past_key_values) == 2


@pytest.mark.behaviour("enables")
def test_disable_brings_back_the_plain_forward(qwen):
    prepare_for_lora(qwen)
    assert checkpointing_on(qwen)
    disable(qwen)
    assert not checkpointing_on(qwen)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {1}
    enable(qwen)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {2}


def test_no_checkpointing_in_eval_or_without_grad(qwen):
    prepare_for_lora(qwen)
    qwen.eval()
    with count_block_calls(qwen) as counts:
        qwen(**batch()).loss.backward()
    assert set(counts.values()) == {1}
    qwen.train()
    with torch.no_grad(), count_block_calls(qwen) as counts:
        qwen(**batch())
    assert set(counts.values()) == {1}


@pytest.mark.skipif(HAS_CHECKPOINTING_KWARGS, reason="only releases without checkpointing kwargs")
def test_old_releases_enable_with_the_prepared_defaults(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    qwen.gradient_checkpointing_disable()
    qwen.gradient_checkpointing_enable()
    assert reentrant_in_effect(qwen) is True
