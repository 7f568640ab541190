"""Frameworks and tutorials that set up checkpointing themselves, in either order with prepare_for_lora.

* ``prepare_for_lora()`` without ``gradient_checkpointing_kwargs`` expresses no preference: what is in effect
  on the model stays (a framework's choice, an earlier enable call, an earlier ``prepare_for_lora``), else the
  library default ``{"use_reentrant": False}``; explicit kwargs win.
* A tutorial's own ``model.enable_input_require_grads()`` is harmless: the library never keeps its own hook
  beside transformers' or peft's, and the gradients are the same.

``framework_enables_checkpointing`` below imitates what fine-tuning frameworks' own helpers do (LLaMA-Factory's
``prepare_model_for_training``, for one): written here from that behaviour, no framework is installed.
"""

from __future__ import annotations

import functools
import inspect
import types

import pytest
import torch
from helpers import (
    enable,
    has_our_input_grads_hook,
    load_qwen,
    lora,
    needs_kwargs,
    reentrant_in_effect,
    step_grads,
)

from qwen_ckpt_compat import (
    CompatWarning,
    capabilities,
    checkpoint_settings,
    is_patched,
    patch,
    prepare_for_lora,
    unpatch,
)
from qwen_ckpt_compat.speed.selective import selective_checkpointing_available
from qwen_ckpt_compat.testing import watch_checkpointing


def framework_enables_checkpointing(model, *, use_reentrant: bool) -> list:
    """Sets up checkpointing the way a framework's own helper does; returns the list its function appends to.

    It puts its own ``gradient_checkpointing_enable`` on the instance, which wraps torch's checkpoint in a
    function of its own and picks the call form from ``_set_gradient_checkpointing``'s signature: with
    ``value`` (old remote code), the old form through ``apply`` plus ``enable_input_require_grads()``; without,
    the new form handing over its function. Then it calls it with its choice and turns the config's cache off.
    """
    calls: list = []

    def own_enable(self, gradient_checkpointing_kwargs=None):
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})

        def framework_checkpoint(function, *args, **extra):
            calls.append(kwargs)
            return torch.utils.checkpoint.checkpoint(function, *args, **kwargs, **extra)

        if "value" in inspect.signature(self._set_gradient_checkpointing).parameters:
            self.apply(functools.partial(self._set_gradient_checkpointing, value=True))
            self.enable_input_require_grads()
        else:
            self._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=framework_checkpoint)

    model.gradient_checkpointing_enable = types.MethodType(own_enable, model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.config.use_cache = False
    return calls


def _train_step(model):
    """One LoRA step; returns what torch's checkpoint received, per call."""
    with watch_checkpointing(model) as seen:
        grads = step_grads(model)
    assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())
    assert seen.every_block_recomputed() and seen.num_blocks == 2
    return [call.get("use_reentrant") for call in seen.checkpoint_calls]


def _input_hooks(model) -> int:
    return len(model.get_input_embeddings()._forward_hooks)


# ------------------------------------------------------------------------------ prepare_for_lora first


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_framework_after_prepare_for_lora_reaches_torch(qwen, use_reentrant):
    prepare_for_lora(qwen)
    calls = framework_enables_checkpointing(qwen, use_reentrant=use_reentrant)
    model = lora(qwen)
    assert _train_step(model) == [use_reentrant] * 2
    assert len(calls) == 2, "the framework's own function checkpointed each block"
    assert reentrant_in_effect(model) is use_reentrant


# ------------------------------------------------------------------------------------ framework first


def test_prepare_for_lora_after_the_framework_keeps_its_reentrant_checkpointing(qwen):
    """Before the patch the framework takes the old path: the remote code's own, reentrant checkpoint."""
    unpatch(qwen)  # a class loaded before the import (the import hook patches classes as they load)
    framework_enables_checkpointing(qwen, use_reentrant=True)
    assert not is_patched(qwen) and qwen.transformer.gradient_checkpointing is True
    model = lora(prepare_for_lora(qwen))
    assert qwen.transformer.gradient_checkpointing is False, "routed now, not the remote code's own call"
    assert checkpoint_settings(qwen).kwargs == {"use_reentrant": True}
    assert _train_step(model) == [True, True]


def test_before_the_patch_a_framework_cannot_ask_for_non_reentrant(qwen):
    """The old path drops the framework's kwargs; what was in effect (reentrant) is what prepare_for_lora keeps."""
    unpatch(qwen)  # a class loaded before the import (the import hook patches classes as they load)
    framework_enables_checkpointing(qwen, use_reentrant=False)
    model = lora(qwen)
    with watch_checkpointing(model) as before:
        step_grads(model)
    assert before.use_reentrant == {None}, "the remote code passes no use_reentrant: torch's default, reentrant"
    prepare_for_lora(model)
    assert _train_step(model) == [True, True]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_prepare_for_lora_after_the_framework_on_a_patched_class_keeps_its_function(qwen, use_reentrant):
    """Patched before (another model of the class, or patch()): the framework hands over its own function."""
    patch(qwen)
    calls = framework_enables_checkpointing(qwen, use_reentrant=use_reentrant)
    model = lora(prepare_for_lora(qwen))
    assert _train_step(model) == [use_reentrant] * 2
    assert len(calls) == 2, "still the framework's own function"


def test_options_that_would_replace_the_frameworks_function_are_refused_with_a_warning(qwen):
    patch(qwen)
    calls = framework_enables_checkpointing(qwen, use_reentrant=True)
    with pytest.warns(CompatWarning, match="QWenLMHeadModel already checkpoints through .*offload=True"):
        prepare_for_lora(qwen, offload=True)
    assert checkpoint_settings(qwen).offload is False
    _train_step(lora(qwen))
    assert len(calls) == 2


@pytest.mark.parametrize("order", ["framework_first", "prepare_first"])
def test_explicit_kwargs_win_in_either_order(qwen, order):
    if order == "framework_first":
        framework_enables_checkpointing(qwen, use_reentrant=True)
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
        expected = [False, False]
    else:
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
        framework_enables_checkpointing(qwen, use_reentrant=True)  # the later call
        expected = [True, True]
    assert _train_step(lora(qwen)) == expected


# --------------------------------------------------------------------- no kwargs: what is in effect stays


def test_without_anything_in_effect_the_default_is_non_reentrant(qwen):
    assert _train_step(lora(prepare_for_lora(qwen))) == [False, False]


def test_a_second_prepare_for_lora_without_kwargs_keeps_the_first_ones(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    prepare_for_lora(qwen)
    assert checkpoint_settings(qwen).kwargs == {"use_reentrant": True, "preserve_rng_state": False}
    assert _train_step(lora(qwen)) == [True, True]


def test_defaults_stored_without_enabling_are_kept(qwen):
    prepare_for_lora(qwen, use_gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": True})
    prepare_for_lora(qwen)
    assert _train_step(lora(qwen)) == [True, True]


@needs_kwargs
def test_an_enable_call_in_effect_is_kept(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
    enable(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})  # e.g. Trainer with its kwargs
    prepare_for_lora(qwen)
    assert _train_step(lora(qwen)) == [True, True]


@needs_kwargs
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_native_models_keep_transformers_kwargs_in_effect(native_model_factory, use_reentrant):
    model = native_model_factory()
    enable(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant, "preserve_rng_state": False})
    prepare_for_lora(model)
    functions = {id(m._gradient_checkpointing_func): m._gradient_checkpointing_func
                 for m in model.modules() if m.__dict__.get("gradient_checkpointing")}
    assert functions, "checkpointing is on"
    assert [f.keywords for f in functions.values()] == [{"use_reentrant": use_reentrant, "preserve_rng_state": False}]


@pytest.mark.skipif(not capabilities().offload, reason="transformers' enable takes no offload before 5.17")
def test_native_models_keep_the_kwargs_of_transformers_offloading_function(native_llama):
    enable(native_llama, gradient_checkpointing_kwargs={"use_reentrant": True}, offload=True)
    prepare_for_lora(native_llama)  # no kwargs, no offload: the kwargs stay, offload goes (as passed)
    functions = {m._gradient_checkpointing_func for m in native_llama.modules() if m.__dict__.get("gradient_checkpointing")}
    assert len(functions) == 1
    (function,) = functions
    assert function.keywords == {"use_reentrant": True} and function.func is torch.utils.checkpoint.checkpoint


@needs_kwargs
def test_native_models_keep_a_frameworks_function(native_model_factory):
    model = native_model_factory()
    calls = framework_enables_checkpointing(model, use_reentrant=True)
    prepare_for_lora(model)
    flagged = [m for m in model.modules() if m.__dict__.get("gradient_checkpointing")]
    assert flagged and {m._gradient_checkpointing_func.__name__ for m in flagged} == {"framework_checkpoint"}
    model.train()
    inputs = {"input_ids": torch.randint(0, 256, (2, 8)), "labels": torch.randint(0, 256, (2, 8))}
    model(**inputs).loss.backward()
    assert len(calls) == model.config.num_hidden_layers


# --------------------------------------------------------------- a tutorial's enable_input_require_grads


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_tutorials_own_enable_input_require_grads_is_harmless(qwen, tiny_qwen_dir, use_reentrant):
    kwargs = {"use_reentrant": use_reentrant}
    plain = load_qwen(tiny_qwen_dir)
    prepare_for_lora(plain, gradient_checkpointing_kwargs=kwargs)
    plain_model = lora(plain)
    expected = step_grads(plain_model)

    prepare_for_lora(qwen, gradient_checkpointing_kwargs=kwargs)
    qwen.enable_input_require_grads()  # the tutorial's own line
    model = lora(qwen)
    grads = step_grads(model)

    assert grads.keys() == expected.keys() and len(grads) == 20
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=0)
    assert not has_our_input_grads_hook(qwen), "the library's own hook went: transformers' does it"
    ours_in_plain = has_our_input_grads_hook(plain)
    assert _input_hooks(qwen) == _input_hooks(plain) + 1 - ours_in_plain, "only the tutorial's own hook is added"


def test_our_hook_leaves_at_its_next_run_when_transformers_hook_arrives(qwen):
    """Without a later enable call (a hand-written loop) nothing else would remove it."""
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    before = _input_hooks(qwen)
    qwen.enable_input_require_grads()
    assert _input_hooks(qwen) == before + 1
    qwen.train()
    qwen(input_ids=torch.randint(0, 256, (1, 4)))
    assert _input_hooks(qwen) == before, "ours removed itself; transformers' stays"
    assert not has_our_input_grads_hook(qwen)
    assert reentrant_in_effect(lora(qwen)) is True


@pytest.mark.skipif(not selective_checkpointing_available(), reason="selective recompute needs torch >= 2.4")
def test_selective_recompute_is_an_option_of_its_own_not_a_kwarg_in_effect(qwen):
    prepare_for_lora(qwen, selective=True)
    assert checkpoint_settings(qwen).selective and "context_fn" in checkpoint_settings(qwen).kwargs
    prepare_for_lora(qwen)  # selective=False, as passed; the kwargs in effect stay
    settings = checkpoint_settings(qwen)
    assert not settings.selective and settings.kwargs == {"use_reentrant": False}
