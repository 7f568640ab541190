"""fused_attention (on by default in training forwards): SDPA's causal kernel where Qwen v1's mask is purely causal,
the remote path elsewhere (padding, KV cache, evaluation, generate, chat)."""

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


def _max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


# How the kernel is asked for: by default (nothing passed: training forwards only) or explicitly (every call).
FUSED = [{}, {"fused_attention": True}]
FUSED_IDS = ["default", "explicit"]


@pytest.mark.parametrize("fused_option", FUSED, ids=FUSED_IDS)
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
def test_fused_kernel_gives_the_same_outputs_and_lora_grads(tiny_qwen_dir, options, fused_option):
    from helpers import load_qwen

    inputs = batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(reference, fused_attention=False, **options)
    logits, grads, calls = _outputs_and_grads(reference, inputs)
    assert calls and {kind for kind, _ in calls} == {"mask"}, "with fused_attention=False the remote code's mask reaches SDPA"

    fused = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(fused, **fused_option, **options)
    fused_logits, fused_grads, fused_calls = _outputs_and_grads(fused, inputs)
    assert fused_calls == [("causal", None)] * len(calls), "every call (recomputes included) takes the fused kernel"
    assert (fused_logits - logits).abs().max().item() <= 1e-5
    assert len(fused_grads) == 5 * 2 * 2
    assert _max_abs(fused_grads, grads) <= 1e-5
    assert max_relative_difference(fused_grads, grads) <= 1e-5
    unpatch(reference)
    unpatch(fused)


@pytest.mark.parametrize("fused_option", FUSED, ids=FUSED_IDS)
def test_padded_batch_takes_the_masked_path(qwen, tiny_qwen_dir, fused_option):
    from helpers import load_qwen

    inputs = _padded_batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    logits, grads, _ = _outputs_and_grads(reference, inputs)
    model = lora(qwen)
    prepare_for_lora(model, **fused_option)
    fused_logits, fused_grads, calls = _outputs_and_grads(model, inputs)
    assert calls and all(kind == "mask" and dtype.is_floating_point for kind, dtype in calls)
    assert torch.equal(fused_logits, logits), "the remote code's own path: bit for bit"
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
    prepare_for_lora(fused)
    prepare_for_lora(plain, fused_attention=False)
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


def test_native_models_keep_their_attention(native_llama, native_model_factory):
    with pytest.warns(CompatWarning, match="fused_attention"):
        prepare_for_lora(native_llama, fused_attention=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_lora(native_model_factory())  # the default: nothing to say about attention
    # (transformers 4.31-4.34 warn about gradient_checkpointing_kwargs their native models cannot take: not this)
    assert [str(w.message) for w in caught if "fused_attention" in str(w.message)] == []


def test_bad_option_type(qwen):
    with pytest.raises(TypeError, match="fused_attention must be a bool"):
        prepare_for_lora(qwen, fused_attention="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(qwen, fused_attention=True)  # a Qwen model: no warning


# ------------------------------------------------------------- the default: fused in training calls, off elsewhere


def test_by_default_inference_takes_the_remote_path(qwen, tiny_qwen_dir):
    """Evaluation, KV-cache calls, generate and chat() run the remote code's own masked path; training is fused."""
    from test_generation_in_training import _tokenizer

    model = lora(prepare_for_lora(qwen))
    ids = batch(batch_size=1, length=12)["input_ids"]
    model.eval()
    with SdpaCalls() as evaluation, torch.no_grad():
        model(input_ids=ids)
    with SdpaCalls() as generation:
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    model.train()  # chat() right after trainer.train(): training mode, no grad inside generate
    with SdpaCalls() as chat:
        model.chat(_tokenizer(tiny_qwen_dir), "hi", history=None, max_new_tokens=3)
    with SdpaCalls() as cached:  # a training-mode call with a KV cache, grad on
        with torch.no_grad():
            past = model(input_ids=ids[:, :8], use_cache=True).past_key_values
        model(input_ids=ids[:, 8:], past_key_values=past, use_cache=True)
    assert generated.shape == (1, 15)
    assert len(evaluation.calls) == 2 and len(generation.calls) == 2 * 3 and len(chat.calls) >= 2 * 2
    for calls in (evaluation.calls, generation.calls, chat.calls, cached.calls):
        assert {kind for kind, _ in calls} == {"mask"}
    _, _, training = _outputs_and_grads(model, batch())
    assert {kind for kind, _ in training} == {"causal"}


def test_attention_dropout_keeps_the_masked_path_by_default(tiny_qwen_dir):
    """Another kernel draws other dropout masks: not exact, so only an explicit fused_attention=True fuses it."""
    from helpers import load_qwen

    model = load_qwen(tiny_qwen_dir, attn_dropout_prob=0.1)
    assert model.transformer.h[0].attn.attn_dropout.p == 0.1
    prepare_for_lora(model)
    assert {kind for kind, _ in _outputs_and_grads(model, batch())[2]} == {"mask"}
    prepare_for_lora(model, fused_attention=True)
    assert {kind for kind, _ in _outputs_and_grads(model, batch())[2]} == {"causal"}
    unpatch(model)


def _padding_masks_seen(model, inputs) -> list:
    """The ``attention_mask`` each attention forward of a training step received (None or its dtype)."""
    seen: list = []
    handles = [
        module.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(getattr(kwargs.get("attention_mask"), "dtype", None)),
            with_kwargs=True,
        )
        for module in attention.attention_modules(model)
    ]
    try:
        _outputs_and_grads(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_a_padding_mask_that_masks_nothing_is_not_passed_to_a_fused_call(tiny_qwen_dir):
    """An all-ones attention_mask (what a collator gives) reaches the remote attention as None in a fused call: the
    remote code then builds no (q x q) additive mask. Outputs and gradients stay the masked path's (the test above);
    a padded batch, the unfused path and an active attention dropout keep the mask."""
    from helpers import load_qwen

    model = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(model)
    assert set(_padding_masks_seen(model, batch())) == {None}, "forward and recompute: no padding mask"
    assert None not in _padding_masks_seen(model, _padded_batch()), "padding is passed on"
    prepare_for_lora(model, fused_attention=False)
    assert None not in _padding_masks_seen(model, batch())
    unpatch(model)

    dropping = load_qwen(tiny_qwen_dir, attn_dropout_prob=0.1)
    prepare_for_lora(dropping)
    assert None not in _padding_masks_seen(dropping, batch()), "the masked path keeps its own mask"
    prepare_for_lora(dropping, fused_attention=True)
    assert set(_padding_masks_seen(dropping, batch())) == {None}
    unpatch(dropping)


@pytest.mark.parametrize("fused_option, expected", [({}, True), ({"fused_attention": True}, True),
                                                    ({"fused_attention": False}, False)])
def test_the_choice_is_visible(qwen, fused_option, expected):
    from qwen_ckpt_compat import checkpoint_settings, describe

    prepare_for_lora(qwen, **fused_option)
    assert checkpoint_settings(qwen).fused_attention is expected
    assert any("QWenAttention.__call__: fused causal attention" in line for line in describe(qwen).patches) is expected


@pytest.mark.parametrize("family_model", ["qwen_vl"], indirect=True)
def test_qwen_vl_default_gives_the_same_outputs_and_lora_grads(family_model, tmp_path):
    """Image+text batches: the language model's attention is fused, the vision tower's SDPA calls are untouched."""
    from helpers import family_blocks, family_lora, fresh_dir, load_family

    family, model, inputs = family_model
    reference = family_lora(load_family(family, fresh_dir(tmp_path, family.write, "reference")), family)
    prepare_for_lora(reference, fused_attention=False)
    logits, grads, calls = _outputs_and_grads(reference, inputs)
    model = family_lora(model, family)
    prepare_for_lora(model)
    fused_logits, fused_grads, fused_calls = _outputs_and_grads(model, inputs)
    language = len([c for c in calls if c[1] is not None])  # the vision tower's SDPA calls pass no mask
    assert language >= len(family_blocks(model, "QWenBlock"))
    assert [c for c in calls if c[1] is not None] == [("mask", torch.float32)] * language, "padding mask: all ones"
    assert [c for c in fused_calls if c[0] == "causal"] == [("causal", None)] * language
    vision = [c for c in calls if c[1] is None]
    assert vision and [c for c in fused_calls if c[0] != "causal"] == vision, "the vision tower's calls: as they were"
    assert (fused_logits - logits).abs().max().item() <= 1e-5
    assert len(fused_grads) == len(grads) > 0 and _max_abs(fused_grads, grads) <= 1e-5
    unpatch(reference)


@pytest.mark.parametrize("family_model", ["internlm"], indirect=True)
def test_a_model_without_known_attention_warns_only_when_asked(family_model):
    _, model, _ = family_model
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(model)
    with pytest.warns(CompatWarning, match="fused_attention=True: InternLMForCausalLM has no attention module"):
        prepare_for_lora(model, fused_attention=True)
