"""The class patch: visible signature, both call forms, idempotence, exact restore, side-by-side classes."""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import pytest
import torch
from helpers import blocks, count_block_calls, disable, enable, fresh_dir, load_qwen, step_grads

from qwen_ckpt_compat import CompatWarning, describe, is_patched, patch, unpatch
from qwen_ckpt_compat.testing import write_tiny_qwen


def _classes(model):
    pretrained = describe(model).checkpointing_class
    cls = next(k for k in type(model).__mro__ if k.__qualname__ == pretrained)
    return cls, type(blocks(model)[0]), type(model.transformer)


def _block_runs(model) -> list:
    """How often each decoder block ran in one training step (2: forward and recompute)."""
    with count_block_calls(model) as counts:
        step_grads(model)
    return [counts[i] for i in range(len(blocks(model)))]


def test_visible_signature_leads_transformers_onto_the_new_path(qwen):
    patch(qwen)
    parameters = inspect.signature(qwen._set_gradient_checkpointing).parameters
    assert "value" not in parameters
    assert "enable" in parameters and "gradient_checkpointing_func" in parameters
    # transformers >= 4.36 looks for "value" here to choose its path; that the new path is then taken, with
    # the caller's kwargs reaching torch, is test_checkpointing.py::test_requested_mode_reaches_torch.


@pytest.mark.behaviour("enables")
def test_new_call_form_reaches_the_routed_blocks(qwen):
    patch(qwen)
    calls = []

    def recording_checkpoint(function, *args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    qwen._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=recording_checkpoint)
    step_grads(qwen)
    assert len(calls) == len(blocks(qwen))


@pytest.mark.behaviour("enables")
def test_old_call_form_through_apply_enables_and_disables(qwen):
    patch(qwen)
    qwen.apply(functools.partial(qwen._set_gradient_checkpointing, value=True))
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {2}, "every block runs again in the backward pass"
    qwen.apply(functools.partial(qwen._set_gradient_checkpointing, value=False))
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {1}


def test_future_keywords_are_accepted(qwen):
    patch(qwen)
    qwen._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=None, every_n_layers=1, some_later_option=3)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {2}


def test_patch_twice_is_a_silent_noop(qwen, recwarn):
    patch(qwen)
    cls, block_cls, owner_cls = _classes(qwen)
    installed = {k: dict(vars(k)) for k in (cls, block_cls, owner_cls)}
    patch(qwen)
    patch(qwen)
    for klass, before in installed.items():
        assert dict(vars(klass)) == before
    assert not [w for w in recwarn if "qwen_ckpt_compat" in str(w.filename)]
    # The block wrapper wraps the original __call__ once, not itself.
    assert not hasattr(inspect.getattr_static(block_cls, "__call__").__wrapped__, "__wrapped__")


@pytest.mark.behaviour("unpatch")
def test_unpatch_restores_the_exact_original_objects(qwen):
    cls, block_cls, owner_cls = _classes(qwen)
    unpatch(qwen)  # the class was patched when it was loaded (the import hook); this gives back the originals
    original = cls.__dict__["_set_gradient_checkpointing"]
    assert original is inspect.unwrap(original) and original.__module__ == cls.__module__
    before = {k: dict(vars(k)) for k in (cls, block_cls, owner_cls)}
    patch(qwen)
    assert is_patched(qwen) and is_patched(cls)
    assert cls.__dict__["_set_gradient_checkpointing"] is not original
    assert "__call__" in vars(block_cls) and "__call__" in vars(owner_cls)
    enable(qwen)
    unpatch(qwen)
    assert not is_patched(qwen)
    assert cls.__dict__["_set_gradient_checkpointing"] is original
    for klass, attributes in before.items():
        assert dict(vars(klass)) == attributes
    assert "value" in inspect.signature(qwen._set_gradient_checkpointing).parameters
    # No state of the library is left on the instance, and the plain forward is back.
    leftovers = [(n, a) for n, m in qwen.named_modules() for a in vars(m) if a.startswith("_qcc")]
    assert leftovers == []
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {1}


def test_unpatch_of_an_unpatched_model_is_harmless(qwen):
    cls, _, _ = _classes(qwen)
    unpatch(qwen)
    original = cls.__dict__["_set_gradient_checkpointing"]
    unpatch(qwen)
    assert cls.__dict__["_set_gradient_checkpointing"] is original


def test_several_remote_classes_side_by_side(qwen, tmp_path):
    other = load_qwen(write_tiny_qwen(tmp_path / "second_tiny_qwen", num_hidden_layers=3))
    cls_a, cls_b = _classes(qwen)[0], _classes(other)[0]
    assert cls_a is not cls_b, "two model directories give two remote modules"
    original_b = inspect.unwrap(cls_b.__dict__["_set_gradient_checkpointing"])
    patch(qwen)
    patch(other)
    assert is_patched(qwen) and is_patched(other)
    enable(qwen)
    enable(other)
    for model, n in ((qwen, 2), (other, 3)):
        with count_block_calls(model) as counts:
            step_grads(model)
        assert len(counts) == n and set(counts.values()) == {2}
    unpatch(qwen)
    assert is_patched(other) and not is_patched(qwen)
    with count_block_calls(other) as counts:
        step_grads(other)
    assert set(counts.values()) == {2}
    unpatch(other)
    assert cls_b.__dict__["_set_gradient_checkpointing"] is original_b


def test_a_model_built_before_its_remote_module_was_re_executed_still_checkpoints(qwen, monkeypatch):
    """transformers 4.40-4.43 re-execute a remote module when its folder is loaded again: the module's names then
    point at new classes, and the old method's ``isinstance`` checks no longer match a model built before. Every
    block of that earlier model must still be routed, and turned off again."""
    import sys

    module = sys.modules[type(qwen).__module__]
    # What the second from_pretrained does to the module on those releases (undone after the test).
    monkeypatch.setattr(module, "QWenModel", type("QWenModel", (module.QWenPreTrainedModel,), {}))
    assert not isinstance(qwen.transformer, module.QWenModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        patch(qwen)
        enable(qwen)
    assert _block_runs(qwen) == [2, 2]
    disable(qwen)
    assert qwen.transformer.gradient_checkpointing is False
    assert _block_runs(qwen) == [1, 1]


def test_patch_takes_over_checkpointing_enabled_by_the_remote_code(qwen):
    """Enabled the old way before patching (e.g. on <= 4.34): the remote code's own reentrant path is replaced."""
    unpatch(qwen)  # as if loaded before the import: the class was patched when it was loaded
    qwen.apply(functools.partial(qwen._set_gradient_checkpointing, value=True))  # the remote method itself
    assert qwen.transformer.gradient_checkpointing is True
    patch(qwen)
    assert qwen.transformer.gradient_checkpointing is False
    assert _block_runs(qwen) == [2, 2]


def test_native_models_are_left_alone(native_llama):
    cls = type(native_llama)
    before = {k: dict(vars(k)) for k in cls.__mro__ if k.__module__.startswith("transformers")}
    assert patch(native_llama) is native_llama
    assert not is_patched(native_llama)
    assert {k: dict(vars(k)) for k in before} == before


@pytest.mark.parametrize("bad", [None, "Qwen/Qwen-7B-Chat", 3, torch.nn.Linear(2, 2)])
def test_patch_rejects_what_is_not_a_model(bad):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(bad)
    with pytest.raises(TypeError, match=type(bad).__name__ if bad is not None else "None"):
        unpatch(bad)


def _no_block_warning(model) -> str:
    from qwen_ckpt_compat import prepare_for_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_lora(model)
    texts = [str(w.message) for w in caught if issubclass(w.category, CompatWarning)]
    assert len(texts) == 1, texts
    return texts[0]


@pytest.mark.parametrize(
    "names, says",
    [
        (None, r"sets no `_no_split_modules`"),
        ([], r"sets no `_no_split_modules`"),
    ],
)
def test_the_no_blocks_warning_says_what_is_the_case(qwen, names, says):
    """"Names no decoder blocks" was once said also where `_no_split_modules` names classes the model has elsewhere."""
    qwen._no_split_modules = names
    text = _no_block_warning(qwen)
    assert re.search(says, text), text
    assert "checkpoints itself, reentrantly and every layer" in text


@pytest.mark.parametrize("names", [["QWenLMHeadModel"], ["GoneBlock"]])
def test_blocks_come_from_the_owners_layer_list_where_the_named_classes_are_not_under_it(qwen, names):
    """A `_no_split_modules` naming classes that are not under the owner (renamed blocks, the model's own class):
    the blocks are the items of the owner's layer list, routed without a warning."""
    from qwen_ckpt_compat import prepare_for_lora

    qwen._no_split_modules = names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_lora(qwen)
    assert [str(w.message) for w in caught if issubclass(w.category, CompatWarning)] == []
    assert all(block.__dict__.get("gradient_checkpointing") for block in qwen.transformer.h)


def test_a_model_without_decoder_blocks_says_it_has_none(tmp_path):
    """Zero layers: `_no_split_modules` names QWenBlock, and the model has no QWenBlock at all."""
    model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen, num_hidden_layers=0))
    try:
        text = _no_block_warning(model)
        assert re.search(r"names QWenBlock, .*holds no module of (that|those) class", text), text
    finally:
        unpatch(model)
