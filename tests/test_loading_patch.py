"""Old-API remote classes are patched when transformers loads them, before any instance exists.

Once ``import qwen_ckpt_compat`` has run, nothing else needs calling: an enable call made while the model is
being built (``post_init``) works on every release, and any later request (peft's
``prepare_model_for_kbit_training`` makes one) is routed as asked. Reversible: ``unpatch`` takes a class, the
hook can be switched off, and classes loaded while it is off are left alone.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
from helpers import (
    count_block_calls,
    fresh_dir,
    load_qwen,
    lora,
    needs_kwargs,
    reentrant_in_effect,
    spy_checkpoint,
    step_grads,
)

from qwen_ckpt_compat import CompatWarning, checkpoint_settings, is_patched, prepare_for_lora, unpatch
from qwen_ckpt_compat._loading import remote_code_loading_disabled
from qwen_ckpt_compat.testing import write_tiny_qwen

ENABLE_NAMES = ("_set_gradient_checkpointing", "gradient_checkpointing_enable", "activation_checkpointing_enable")


def _checkpointing_class(model) -> type:
    return next(k for k in type(model).__mro__ if "_set_gradient_checkpointing" in vars(k))


@pytest.mark.behaviour("loads")
def test_old_api_classes_are_patched_when_loaded(tmp_path):
    model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
    try:
        assert is_patched(type(model)) and is_patched(model)
        assert "value" not in inspect.signature(model._set_gradient_checkpointing).parameters
        # Only the class is patched: no instance holds any routing state until checkpointing is enabled.
        assert not [a for m in model.modules() for a in vars(m) if a.startswith("_qcc")]
        assert not any(m.__dict__.get("gradient_checkpointing") for m in model.modules())
    finally:
        unpatch(model)


@pytest.mark.behaviour("enables")
def test_a_model_enabling_checkpointing_while_built_loads_routes_and_warns(tmp_path):
    """`gradient_checkpointing=True` in config.json: post_init enables it (4.35.x raised TypeError there)."""
    path = fresh_dir(tmp_path, write_tiny_qwen, gradient_checkpointing=True)
    with pytest.warns(CompatWarning, match=r"turned gradient checkpointing on by itself.*use_gradient_checkpointing=False"):
        model = load_qwen(path)
    try:
        assert checkpoint_settings(model).use_reentrant is False
        with count_block_calls(model) as counts:
            step_grads(model)
        assert set(counts.values()) == {2}
        assert reentrant_in_effect(model) is False
        prepare_for_lora(model, use_gradient_checkpointing=False)  # the user's explicit choice wins
        with count_block_calls(model) as counts:
            step_grads(model)
        assert set(counts.values()) == {1}
    finally:
        unpatch(model)


def test_a_model_loaded_without_it_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
    unpatch(model)


@pytest.mark.behaviour("kwargs")
@needs_kwargs
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_import_alone_honours_the_request(tmp_path, monkeypatch, use_reentrant):
    """No patch(), no prepare_for_lora(): what peft's prepare_model_for_kbit_training calls reaches torch."""
    model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 5.23+: a deprecated alias, still honoured
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        peft_model = lora(model)
        with spy_checkpoint(monkeypatch) as calls, count_block_calls(model) as counts:
            grads = step_grads(peft_model)
        assert [c.get("use_reentrant") for c in calls] == [use_reentrant] * 2, calls
        assert set(counts.values()) == {2}
        assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())
    finally:
        unpatch(model)


@pytest.mark.behaviour("kwargs")
@needs_kwargs
def test_import_alone_honours_peft_prepare_model_for_kbit_training(tmp_path, monkeypatch):
    from peft import prepare_model_for_kbit_training

    if "gradient_checkpointing_kwargs" not in inspect.signature(prepare_model_for_kbit_training).parameters:
        pytest.skip("this peft's prepare_model_for_kbit_training takes no gradient_checkpointing_kwargs")
    model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
    # peft enables checkpointing for quantized models only; this flag is what it reads to tell (bitsandbytes sets
    # it). Everything else is peft's own code: it inspects the enable method's signature and passes the kwargs.
    model.is_loaded_in_8bit = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        del model.is_loaded_in_8bit  # float layers after all: get_peft_model must not look for bitsandbytes ones
        peft_model = lora(model)
        with spy_checkpoint(monkeypatch) as calls:
            grads = step_grads(peft_model)
        assert [c.get("use_reentrant") for c in calls] == [False, False]
        assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())
    finally:
        unpatch(model)


@pytest.mark.behaviour("unpatch")
def test_unpatch_of_a_class_puts_back_the_exact_originals(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic_module_utils

    with remote_code_loading_disabled(), monkeypatch.context() as patched:
        # transformers' own loader, without its import check (Qwen v1 does not load on 4.57+ otherwise)
        patched.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)
        pristine_model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
    cls = _checkpointing_class(pristine_model)
    before = dict(vars(cls))
    assert not is_patched(cls), "a class loaded while the hook is off is left alone"
    assert not any(hasattr(v, "__wrapped__") for v in before.values())
    from qwen_ckpt_compat._class_patch import patch_class

    assert patch_class(type(pristine_model)) is cls
    assert patch_class(type(pristine_model)) is cls  # idempotent
    assert {n for n in ENABLE_NAMES if hasattr(cls, n)} <= {n for n in vars(cls) if hasattr(vars(cls)[n], "__wrapped__")}
    unpatch(type(pristine_model))
    assert dict(vars(cls)) == before and not is_patched(cls)
    assert cls.__dict__["_set_gradient_checkpointing"] is before["_set_gradient_checkpointing"]


def test_the_environment_variable_turns_the_hook_off(tmp_path, monkeypatch):
    """What `import qwen_ckpt_compat` runs (`enable_on_import`), with QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    from qwen_ckpt_compat import _loading as loading

    monkeypatch.setenv("QWEN_CKPT_COMPAT_NO_IMPORT_HOOK", "1")
    loading.disable_remote_code_loading()
    try:
        loading.enable_on_import()
        assert not loading.is_remote_code_loading_enabled()
        assert not hasattr(dynamic_module_utils.get_class_in_module, "__wrapped__")
        with monkeypatch.context() as patched:  # Qwen v1 does not load on 4.57+ otherwise
            patched.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)
            model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen))
        assert not is_patched(type(model))
    finally:
        loading.enable_remote_code_loading()
    assert hasattr(dynamic_module_utils.get_class_in_module, "__wrapped__")
