"""fused_attention=True: SDPA's causal kernel where Qwen v1's mask is purely causal, the remote path elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import batch, lora, max_relative_difference, needs_selective
from torch.overrides import TorchFunctionMode

from qwen_ckpt_compat import CompatWarning, patch, prepare_for_lora, unpatch
from qwen_ckpt_compat._model_state import ATTRIBUTE as STATE
from qwen_ckpt_compat.speed import attention
from qwen_ckpt_compat.speed.attention import _causal_arguments

SDPA = torch.nn.functional.scaled_dot_product_attention


class SdpaCalls(TorchFunctionMode):
    """Records how SDPA is called: ("causal", None) for is_causal=True, else ("mask", dtype of the mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            self.calls.append(("causal", None) if causal and mask is None else ("mask", getattr(mask, "dtype", None)))
        return func(*args, **kwargs)


def _outputs_and_grads(model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    with SdpaCalls() as spy:
        out = model(**inputs)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads, spy.calls


def _padded_batch() -> dict:
    inputs = batch()
    inputs["attention_mask"][0, :5] = 0  # left padding in the first row
    return inputs


@pytest.mark.parametrize(
    "options",
    [
        {"use_gradient_checkpointing": False},
        {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
        {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
        pytest.param({"selective": True}, marks=needs_selective),
    ],
    ids=["no-checkpointing", "non-reentrant", "reentrant", "selective"],
)
def test_fused_kernel_gives_the_same_outputs_and_lora_grads(tiny_qwen_dir, options):
    from helpers import load_qwen

    inputs = batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(reference, **options)
    logits, grads, calls = _outputs_and_grads(reference, inputs)
    assert calls and {kind for kind, _ in calls} == {"mask"}, "without the option the remote code's mask reaches SDPA"

    fused = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(fused, fused_attention=True, **options)
    fused_logits, fused_grads, fused_calls = _outputs_and_grads(fused, inputs)
    assert fused_calls == [("causal", None)] * len(calls), "every call (recomputes included) takes the fused kernel"
    assert ((fused_logits - logits).norm() / logits.norm()).item() <= 1e-5
    assert len(fused_grads) == 5 * 2 * 2
    assert max_relative_difference(fused_grads, grads) <= 1e-5
    unpatch(reference)
    unpatch(fused)


def test_padded_batch_takes_the_masked_path(qwen, tiny_qwen_dir):
    from helpers import load_qwen

    inputs = _padded_batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    logits, grads, _ = _outputs_and_grads(reference, inputs)
    model = lora(qwen)
    prepare_for_lora(model, fused_attention=True)
    fused_logits, fused_grads, calls = _outputs_and_grads(model, inputs)
    assert calls and all(kind == "mask" and dtype.is_floating_point for kind, dtype in calls)
    assert torch.allclose(fused_logits, logits, rtol=1e-5, atol=1e-6)
    assert max_relative_difference(fused_grads, grads) <= 1e-5
    # The same model with an unpadded batch right after: the fused kernel again (the padding check is per mask).
    _, _, calls = _outputs_and_grads(model, batch())
    assert {kind for kind, _ in calls} == {"causal"}


def test_kv_cache_takes_the_masked_path(qwen):
    prepare_for_lora(qwen, fused_attention=True)
    qwen.eval()
    ids = batch(batch_size=1, length=12)["input_ids"]
    with torch.no_grad():
        full = qwen(input_ids=ids).logits
        with SdpaCalls() as prompt_calls:
            past = qwen(input_ids=ids[:, :8], use_cache=True).past_key_values
        with SdpaCalls() as cached_calls:
            step = qwen(input_ids=ids[:, 8:], past_key_values=past, use_cache=True).logits
    assert {kind for kind, _ in prompt_calls.calls} == {"causal"}, "the prompt itself has no past: fused"
    assert cached_calls.calls and {kind for kind, _ in cached_calls.calls} == {"mask"}
    assert torch.allclose(step, full[:, 8:], rtol=1e-4, atol=1e-5)


def test_only_the_opted_in_model_changes_and_unpatch_undoes_it(tiny_qwen_dir):
    from helpers import load_qwen

    function_before = torch.nn.functional.scaled_dot_product_attention
    fused, plain = load_qwen(tiny_qwen_dir), load_qwen(tiny_qwen_dir)
    attention_class = type(fused.transformer.h[0].attn)
    original_call = attention_class.__dict__.get("__call__")
    prepare_for_lora(fused, fused_attention=True)
    prepare_for_lora(plain)
    assert torch.nn.functional.scaled_dot_product_attention is function_before, "torch's function is never replaced"
    assert {kind for kind, _ in _outputs_and_grads(fused, batch())[2]} == {"causal"}
    assert {kind for kind, _ in _outputs_and_grads(plain, batch())[2]} == {"mask"}, "same class, not opted in"
    unpatch(fused)
    assert attention_class.__dict__.get("__call__") is original_call
    assert not any(STATE in m.__dict__ for m in fused.modules()), "no state of the library is left on any module"
    patch(fused)
    assert {kind for kind, _ in _outputs_and_grads(fused, batch())[2]} == {"mask"}
    unpatch(fused)


def test_fused_attention_is_per_call_of_prepare(qwen):
    prepare_for_lora(qwen, fused_attention=True)
    prepare_for_lora(qwen, fused_attention=False)
    assert {kind for kind, _ in _outputs_and_grads(qwen, batch())[2]} == {"mask"}


def _qkv(length: int) -> tuple:
    return tuple(torch.randn(1, 2, length, 4) for _ in range(3))


def _tril(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)


def test_only_the_causal_pattern_is_rewritten(monkeypatch):
    """Each pattern at its own length: the values are checked once per mask shape, dtype and device."""
    monkeypatch.setattr(attention, "_CHECKED_MASKS", {})  # forget the shapes other tests have shown it
    assert _causal_arguments(_qkv(6), {"attn_mask": _tril(6), "dropout_p": 0.0})[1] == {
        "attn_mask": None, "is_causal": True, "dropout_p": 0.0,
    }
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~_tril(7), torch.finfo(torch.float32).min)
    assert _causal_arguments((*_qkv(7), additive), {})[1] == {"attn_mask": None, "is_causal": True}
    sliding = _tril(8) & torch.ones(8, 8, dtype=torch.bool).triu(-2)
    assert _causal_arguments(_qkv(8), {"attn_mask": sliding}) is None
    padded = torch.zeros(1, 1, 9, 9).masked_fill(~_tril(9), torch.finfo(torch.float32).min)
    padded[..., 0] = torch.finfo(torch.float32).min
    assert _causal_arguments(_qkv(9), {"attn_mask": padded}) is None
    q, k, v = _qkv(6)
    assert _causal_arguments((q[..., :4, :], k, v), {"attn_mask": _tril(6)[..., :4, :]}) is None, "queries != keys"
    assert _causal_arguments(_qkv(6), {"attn_mask": None, "is_causal": True}) is None, "nothing to rewrite"


def test_native_models_keep_their_attention(native_llama):
    with pytest.warns(CompatWarning, match="fused_attention"):
        prepare_for_lora(native_llama, fused_attention=True)


def test_bad_option_type(qwen):
    with pytest.raises(TypeError, match="fused_attention must be a bool"):
        prepare_for_lora(qwen, fused_attention="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(qwen, fused_attention=True)  # a Qwen model: no warning
