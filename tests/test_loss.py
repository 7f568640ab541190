"""chunked_loss=: the LM head and the cross-entropy by chunks of tokens, equal to the remote code's own loss."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import batch, family_lora, lora, lora_grads
from test_trainer import _Rows, _training_arguments
from torch.overrides import TorchFunctionMode

from qwen_ckpt_compat import CompatWarning, checkpoint_settings, describe, prepare_for_lora, unpatch
from qwen_ckpt_compat.speed import loss as loss_module
from qwen_ckpt_compat.speed.loss import ChunkedLinearCrossEntropy, chunked_cross_entropy

VOCAB = 256  # the tiny Qwen's


def _padded_batch(batch_size: int = 3, length: int = 16) -> dict:
    inputs = batch(batch_size=batch_size, length=length)
    inputs["labels"][0, :5] = -100  # a prompt whose tokens are not trained on
    inputs["labels"][2, 11:] = -100  # right padding
    inputs["attention_mask"][2, 11:] = 0
    return inputs


class _LargestLogits(TorchFunctionMode):
    """The most rows of any [rows, vocab] (or [batch, tokens, vocab]) tensor an operator returned."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dim() >= 2 and result.shape[-1] == VOCAB:
            self.rows = max(self.rows, result.numel() // VOCAB)
        return result


@contextlib.contextmanager
def _head_calls(model):
    """Counts the calls of the model's lm_head module (the remote code's path calls it; the chunked loss does not)."""
    calls = []
    head = next(m for name, m in model.named_modules() if name.endswith("lm_head"))
    handle = head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    try:
        yield calls
    finally:
        handle.remove()


def _step(model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    with _LargestLogits() as largest, _head_calls(model) as calls:
        out = model(**inputs)
        out.loss.backward()
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return out, grads, largest.rows, calls


def _max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


# 3 rows x 16 tokens = 48 tokens: chunks of 1, of 5 (not a divisor), of 16, of exactly 48 and of more.
@pytest.mark.parametrize("tokens", [1, 5, 16, 48, 1000])
@pytest.mark.parametrize(
    "options",
    [{"use_gradient_checkpointing": False}, {}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}],
    ids=["no-checkpointing", "non-reentrant", "reentrant"],
)
def test_chunked_loss_equals_the_remote_loss_and_lora_grads(tiny_qwen_dir, tokens, options):
    from helpers import load_qwen

    inputs = _padded_batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(reference, fused_attention=False, **options)
    expected, expected_grads, reference_rows, reference_calls = _step(reference, inputs)
    assert reference_calls == [(3, 16, VOCAB)] and reference_rows == 48, "the remote code computes every logit"

    model = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(model, fused_attention=False, chunked_loss=tokens, **options)
    out, grads, rows, calls = _step(model, inputs)
    assert calls == [], "the remote head never runs"
    assert rows == min(tokens, 48), "no operator ever holds more than one chunk of logits"
    assert out.logits is None
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5
    assert len(grads) == 20 and _max_abs(grads, expected_grads) <= 1e-5
    unpatch(reference)
    unpatch(model)


def test_tuple_outputs_and_past_key_values(qwen):
    inputs = _padded_batch()
    model = lora(qwen)
    prepare_for_lora(model, use_gradient_checkpointing=False, chunked_loss=7)
    model.train()
    expected = model(**inputs, use_cache=True)  # keeps its dict form; the owner's outputs are passed on
    as_tuple = model(**inputs, use_cache=True, return_dict=False)
    assert torch.equal(as_tuple[0], expected.loss) and as_tuple[1] is None
    assert len(as_tuple[2]) == 2 and torch.equal(as_tuple[2][0][0], expected.past_key_values[0][0])


def test_keep_logits_returns_the_logits_detached(tiny_qwen_dir):
    from helpers import load_qwen

    inputs = _padded_batch()
    reference = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(reference)
    expected, expected_grads, _, _ = _step(reference, inputs)
    model = lora(load_qwen(tiny_qwen_dir))
    prepare_for_lora(model, chunked_loss=5, keep_logits=True)
    out, grads, _, calls = _step(model, inputs)
    assert calls == [] and out.logits.shape == (3, 16, VOCAB) and not out.logits.requires_grad
    assert (out.logits - expected.logits).abs().max().item() <= 1e-5
    assert _max_abs(grads, expected_grads) <= 1e-5
    unpatch(reference)
    unpatch(model)


def test_every_other_call_runs_the_remote_forward(qwen):
    inputs = _padded_batch()
    model = lora(qwen)
    prepare_for_lora(model, chunked_loss=True)
    assert checkpoint_settings(model).chunked_loss == 1024
    model.train()
    with _head_calls(model) as calls:
        assert model(**{k: v for k, v in inputs.items() if k != "labels"}).logits is not None  # no labels
        with torch.no_grad():
            assert model(**inputs).logits is not None  # no grad (Trainer's evaluation)
        model.eval()
        assert model(**inputs).logits is not None  # eval mode
        ids = inputs["input_ids"][:1, :4]
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    assert len(calls) == 3 + 3, "three forwards with labels or without grad, three generation steps: the remote head"


def test_a_trainable_or_wrapped_head_keeps_the_remote_path(qwen):
    """LoRA on the head (or modules_to_save) makes it a peft layer, not a plain nn.Linear: the remote code runs."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(qwen, LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
    prepare_for_lora(model, chunked_loss=8)
    with _LargestLogits() as largest:
        out = model(**_padded_batch())
    assert out.logits is not None and largest.rows == 48


@pytest.mark.parametrize("tokens", [1, 5, 7, 48, 100])
@pytest.mark.parametrize("head_requires_grad", [False, True])
def test_the_function_gives_the_hidden_and_weight_gradients_of_the_plain_loss(tokens, head_requires_grad):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 16, 8, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=generator).requires_grad_(head_requires_grad)
    labels = torch.randint(0, VOCAB, (3, 16), generator=generator)
    labels[1, :6] = -100

    logits = F.linear(hidden, weight)
    expected = F.cross_entropy(logits[..., :-1, :].reshape(-1, VOCAB), labels[..., 1:].reshape(-1))
    expected.backward()
    expected_grads = hidden.grad.clone(), (weight.grad.clone() if head_requires_grad else None)
    hidden.grad, weight.grad = None, None

    loss, no_logits = chunked_cross_entropy(hidden, weight, labels, tokens)
    (loss * 1.0).backward()
    assert no_logits is None
    assert abs(loss.item() - expected.item()) <= 1e-5
    assert (hidden.grad - expected_grads[0]).abs().max().item() <= 1e-5
    if head_requires_grad:
        assert (weight.grad - expected_grads[1]).abs().max().item() <= 1e-5
    else:
        assert weight.grad is None


def test_every_label_ignored_gives_nan_as_the_plain_loss_does():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss, _ = chunked_cross_entropy(hidden, torch.randn(VOCAB, 8), labels, 2)
    plain = F.cross_entropy(F.linear(hidden, torch.randn(VOCAB, 8))[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.isnan(loss) and torch.isnan(plain)


def test_the_function_saves_no_logits():
    """What autograd keeps for the backward pass: the hidden states, the weight, the labels and the count."""
    saved: list = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    hidden = torch.randn(64, 8, requires_grad=True)
    weight, labels = torch.randn(VOCAB, 8), torch.randint(0, VOCAB, (64,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ChunkedLinearCrossEntropy.apply(hidden, weight, labels, 16, torch.float32, False)
    assert sorted(saved) == sorted([(64, 8), (VOCAB, 8), (64,), ()])


@pytest.mark.behaviour("trainer")
def test_trainer_trains_with_the_chunked_loss_and_the_same_losses(tiny_qwen_dir, tmp_path):
    from helpers import load_qwen

    def train(**options) -> list:
        model = lora(load_qwen(tiny_qwen_dir))
        prepare_for_lora(model, **options)
        with _head_calls(model) as calls:
            trainer = transformers.Trainer(model=model, args=_training_arguments(tmp_path / str(len(options))),
                                           train_dataset=_Rows())
            trainer.train()
        assert checkpoint_settings(model).chunked_loss == options.get("chunked_loss"), "kept through the re-enable"
        unpatch(model)
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], calls

    expected, expected_calls = train()
    losses, calls = train(chunked_loss=6)
    assert len(expected_calls) == 2 and calls == [], "two steps: the remote head, then never"
    assert len(losses) == 2 and all(abs(a - b) <= 1e-5 for a, b in zip(losses, expected))


def test_unpatch_removes_it_and_prepare_without_it_turns_it_off(qwen):
    model = lora(qwen)
    prepare_for_lora(model, chunked_loss=4)
    assert any("QWenLMHeadModel.forward: chunked loss" in line for line in describe(model).patches)
    assert model(**_padded_batch()).logits is None
    prepare_for_lora(model)
    assert checkpoint_settings(model).chunked_loss is None
    assert model(**_padded_batch()).logits is not None
    prepare_for_lora(model, chunked_loss=4)
    unpatch(model)
    assert not any("chunked loss" in line for line in describe(model).patches)
    assert model(**_padded_batch()).logits is not None


@pytest.mark.parametrize("family_model", ["internlm", "qwen_vl"], indirect=True)
def test_families_with_the_same_loss_get_it(family_model, tmp_path):

    family, model, inputs = family_model
    inputs["labels"][0, :4] = -100
    model = family_lora(model, family)
    prepare_for_lora(model, fused_attention=False)
    expected, expected_grads, _, expected_calls = _step(model, inputs)
    prepare_for_lora(model, fused_attention=False, chunked_loss=5)
    out, grads, _, calls = _step(model, inputs)
    assert expected_calls and calls == [] and out.logits is None
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5
    assert _max_abs(grads, expected_grads) <= 1e-5


@pytest.mark.parametrize("family_model", ["chatglm", "baichuan"], indirect=True)
def test_families_with_a_loss_of_their_own_keep_it_with_a_warning(family_model):
    family, model, inputs = family_model
    with pytest.warns(CompatWarning, match="chunked_loss=True.*runs unchanged"):
        prepare_for_lora(model, chunked_loss=True)
    assert checkpoint_settings(model).chunked_loss is None
    assert model(**inputs).logits is not None


def test_native_models_warn(native_llama):
    with pytest.warns(CompatWarning, match="chunked_loss: only for old remote-code models"):
        prepare_for_lora(native_llama, chunked_loss=True)


@pytest.mark.parametrize(
    "value, error, message",
    [("yes", TypeError, "chunked_loss must be a bool or a number"), (1.5, TypeError, "chunked_loss must be"),
     (0, ValueError, "positive number of tokens"), (-8, ValueError, "positive number of tokens")],
)
def test_bad_chunked_loss_values(qwen, value, error, message):
    with pytest.raises(error, match=message):
        prepare_for_lora(qwen, chunked_loss=value)
    with pytest.raises(TypeError, match="keep_logits must be a bool"):
        prepare_for_lora(qwen, chunked_loss=True, keep_logits="yes")
    assert checkpoint_settings(qwen) is None


def test_liger_kernel_is_asked_on_cuda_only(monkeypatch):
    """A stand-in Liger module: its loss is used through the adapter (tuple results too), and never on the CPU."""
    calls: list = []

    class FakeLoss:
        def __init__(self, ignore_index, reduction):
            assert (ignore_index, reduction) == (-100, "mean")

        def __call__(self, weight, hidden, labels):
            calls.append((tuple(weight.shape), tuple(hidden.shape), tuple(labels.shape)))
            return F.cross_entropy(F.linear(hidden, weight), labels), torch.zeros(())

    fake = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    fake.LigerFusedLinearCrossEntropyLoss = FakeLoss
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    loss_module._liger_loss.cache_clear()
    try:
        fused = loss_module._liger_loss()
        hidden, weight, labels = torch.randn(6, 8), torch.randn(VOCAB, 8), torch.randint(0, VOCAB, (6,))
        assert torch.equal(fused(weight, hidden, labels), F.cross_entropy(F.linear(hidden, weight), labels))
        calls.clear()
        chunked_cross_entropy(hidden.view(2, 3, 8), weight, labels.view(2, 3), 4)
        assert calls == [], "the CPU takes the chunked loss"
    finally:
        loss_module._liger_loss.cache_clear()


def test_an_installed_liger_that_cannot_import_warns_and_falls_back(monkeypatch):
    """Not installed: silence (an optional extra); installed but broken (its triton missing): a CompatWarning."""
    real_import = importlib.import_module

    def missing(module):
        def fake(name, *args, **kwargs):
            if name.startswith("liger_kernel"):
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
            return real_import(name, *args, **kwargs)

        return fake

    loss_module._liger_loss.cache_clear()
    try:
        monkeypatch.setattr(importlib, "import_module", missing("liger_kernel"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompatWarning)
            assert loss_module._liger_loss() is None
        loss_module._liger_loss.cache_clear()
        monkeypatch.setattr(importlib, "import_module", missing("triton"))
        with pytest.warns(CompatWarning, match="Liger-Kernel is installed but cannot be used.*triton"):
            assert loss_module._liger_loss() is None
    finally:
        loss_module._liger_loss.cache_clear()


def test_no_warning_on_qwen(qwen):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(qwen, chunked_loss=True, keep_logits=True)
