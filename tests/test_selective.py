"""selective=True: checkpointed blocks keep their expensive outputs (attention, projections) and recompute the rest."""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    OpCounts,
    batch,
    count_block_calls,
    enable,
    lora,
    max_relative_difference,
    needs_kwargs,
    needs_selective,
    step_grads,
)

from qwen_ckpt_compat import CompatWarning, UnsupportedTorchError, checkpoint_settings, prepare_for_lora
from qwen_ckpt_compat.speed.selective import SelectiveRecompute, attention_ops, keeps_output


def _counted_step(model, inputs) -> tuple[dict, OpCounts, Counter]:
    with OpCounts() as ops, count_block_calls(model) as blocks:
        grads = step_grads(model, inputs)
    return grads, ops, blocks


@needs_selective
def test_selective_serves_attention_and_projections_and_recomputes_the_rest_with_equal_grads(qwen, tiny_qwen_dir):
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
    assert ops.attention() == 2, "selective recompute serves it in the recompute"
    assert set(blocks.values()) == {2}, "each block's forward still runs twice: the rest is recomputed"
    # Projections and LoRA's A products (inner dimension >= width / 8): served, so they run as often as without
    # checkpointing; LoRA's B products (inner dimension = the rank): recomputed, as with full checkpointing.
    # Older peft adds LoRA's output to the base layer's in place (``result += ...``): those base outputs changed
    # after they were kept, so they are recomputed, one per in-place add.
    changed_in_place = plain_ops.counts["aten.add_.Tensor"]
    assert full_ops.kept_kind[True] > plain_ops.kept_kind[True] + changed_in_place == ops.kept_kind[True]
    assert plain_ops.kept_kind[False] < full_ops.kept_kind[False] == ops.kept_kind[False]
    assert max_relative_difference(grads, reference) <= 1e-5
    settings = checkpoint_settings(model)
    assert settings.selective is True and isinstance(settings.kwargs["context_fn"], SelectiveRecompute)


def test_which_outputs_are_kept():
    aten = torch.ops.aten
    x, base, lora_a, lora_b = torch.ones(16, 64), torch.ones(64, 192), torch.ones(64, 4), torch.ones(4, 192)
    assert keeps_output(aten.mm.default, (x, base)), "a projection"
    assert keeps_output(aten.mm.default, (x, lora_a)), "LoRA's A product: small output, full inner dimension"
    assert not keeps_output(aten.mm.default, (torch.ones(16, 4), lora_b)), "LoRA's B product: the rank is inner"
    assert keeps_output(aten.addmm.default, (torch.ones(192), x, base))
    assert keeps_output(aten.bmm.default, (torch.ones(2, 16, 64), torch.ones(2, 64, 192)))
    assert not keeps_output(aten.mul.Tensor, (x, x)), "elementwise work is recomputed"
    on_meta = (torch.ones(16, 64, device="meta"), torch.ones(64, 192, device="meta"))
    assert not keeps_output(aten.mm.default, on_meta), "no host memory beside this device: recomputed"
    for op in attention_ops():
        assert keeps_output(op, ())


class _Block(torch.nn.Module):
    """A projection whose output the forward changes in place, as peft's ``result += ...`` once did. Its input is
    3-d and it has no bias, so ``F.linear`` returns another tensor on the product's storage, and the product's
    own output object is gone by the time of the write."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(32, 32) / 8)

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight)
        y += 1.0
        return torch.tanh(y) @ self.weight


@needs_selective
def test_an_output_changed_in_place_is_recomputed_not_served():
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(2, 4, 32, requires_grad=True)
    block(x).square().sum().backward()
    reference = (x.grad.clone(), block.weight.grad.clone())
    x.grad = block.weight.grad = None
    with OpCounts() as ops:
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=SelectiveRecompute())
        out.square().sum().backward()
    assert torch.allclose(x.grad, reference[0], rtol=1e-6) and torch.allclose(block.weight.grad, reference[1], rtol=1e-6)
    # Forward: 2 products; recompute: the changed one again (the other is served); backward: 2 per product.
    assert ops.matmuls() == 2 + 1 + 4


@needs_selective
def test_nothing_is_kept_without_grad():
    recompute, block = SelectiveRecompute(), _Block()
    with torch.no_grad():
        torch.utils.checkpoint.checkpoint(block, torch.randn(2, 4, 32), use_reentrant=False, context_fn=recompute)
    assert not recompute._order, "no graph, no recompute: a forward without grad keeps nothing"
    torch.utils.checkpoint.checkpoint(block, torch.randn(2, 4, 32), use_reentrant=False, context_fn=recompute)
    assert len(recompute._order) == 1, "with grad it does"


def _compile_works() -> bool:
    dynamo = getattr(torch, "_dynamo", None)
    return hasattr(torch, "compile") and dynamo is not None and dynamo.is_dynamo_supported()


@needs_selective
@pytest.mark.skipif(not _compile_works(), reason="torch.compile does not run on this Python/torch")
def test_a_compiled_checkpoint_gets_torchs_own_selective_checkpointing():
    """dynamo takes a context_fn only as a function or a functools.partial of torch's own: it gets the latter."""
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(2, 4, 32, requires_grad=True)
    block(x).square().sum().backward()
    reference = block.weight.grad.clone()
    block.weight.grad = None
    recompute = SelectiveRecompute()

    def checkpointed(inputs):
        return torch.utils.checkpoint.checkpoint(block, inputs, use_reentrant=False, context_fn=recompute)

    torch._dynamo.reset()
    torch.compile(checkpointed, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    assert torch.allclose(block.weight.grad, reference, rtol=1e-5)
    assert not recompute._order, "the compiled graph did not run this library's dispatch modes"


@needs_selective
def test_the_context_fn_copies_and_pickles_as_a_fresh_one():
    original = SelectiveRecompute()
    for twin in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert isinstance(twin, SelectiveRecompute) and twin is not original


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


# ------------------------------------------------------------------------------- the decision per shape


@needs_selective
@pytest.mark.parametrize(("threshold", "used"), [(64, False), (32, True), (33, False)])
def test_selective_recompute_is_used_from_its_threshold_on(qwen, monkeypatch, threshold, used):
    """Below the threshold the blocks are recomputed whole (cheaper there); from it on, attention is kept."""
    from qwen_ckpt_compat._model_state import state_of
    from qwen_ckpt_compat.speed import selective as selective_module

    monkeypatch.setenv(selective_module.MIN_TOKENS_ENV, str(threshold))
    model = lora(qwen)
    prepare_for_lora(model, selective=True)
    _, ops, _ = _counted_step(model, batch(batch_size=2, length=16))  # 32 tokens
    assert ops.attention() == (2 if used else 4), "attention runs once per block, or again in each recompute"
    assert state_of(qwen).planner.decisions == {32: used}
    assert checkpoint_settings(qwen).selective is True, "the option stays on; the plan decides per shape"


@needs_selective
def test_the_decision_is_made_again_for_each_new_shape_and_gradients_stay_equal(qwen, tiny_qwen_dir, monkeypatch):
    from helpers import load_qwen

    from qwen_ckpt_compat._model_state import state_of
    from qwen_ckpt_compat.speed import selective as selective_module

    monkeypatch.setenv(selective_module.MIN_TOKENS_ENV, "40")
    plain = lora(load_qwen(tiny_qwen_dir))
    model = lora(qwen)
    prepare_for_lora(model, selective=True)
    for length, used in ((16, False), (24, True), (16, False)):
        inputs = batch(batch_size=2, length=length)
        reference, _, _ = _counted_step(plain, inputs)
        grads, ops, _ = _counted_step(model, inputs)
        assert ops.attention() == (2 if used else 4)
        assert max_relative_difference(grads, reference) <= 1e-5
    assert state_of(qwen).planner.decisions == {32: False, 48: True}
