"""Every option is checked where it is given: nothing invalid reaches the first training step.

Before, ``gradient_checkpointing_kwargs={"bogus": 1}`` failed in the first step with a ``TypeError`` that blamed
the model's forward, ``{"context_fn": 5}`` with ``'int' object is not callable``, ``{"use_reentrant": "no"}``
reached torch as a truthy string (the reentrant variant, silently), and ``use_gradient_checkpointing="no"`` turned
checkpointing on.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lora, needs_kwargs, reentrant_in_effect, step_grads

from qwen_ckpt_compat import checkpoint_settings, patch, prepare_for_lora
from qwen_ckpt_compat._versions import checkpoint_keywords


@pytest.mark.behaviour("kwargs")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bogus": 1}, r"takes no 'bogus'; it takes .*use_reentrant"),
        ({"use_reentrant": False, "context_fn": 5}, r"\['context_fn'\] must be callable, got int"),
        ({"use_reentrant": "no"}, r"\['use_reentrant'\] must be a bool, got str: 'no'"),
        ({"use_reentrant": 1}, r"\['use_reentrant'\] must be a bool, got int"),
        ({"preserve_rng_state": "yes"}, r"\['preserve_rng_state'\] must be a bool"),
        (["use_reentrant", False], r"must be a dict or None, got list"),
    ],
)
def test_bad_checkpoint_kwargs_are_refused_at_prepare_time(qwen, kwargs, message):
    if isinstance(kwargs, dict) and "context_fn" in kwargs and "context_fn" not in checkpoint_keywords():
        pytest.skip("this torch has no context_fn (refused as a newer torch's keyword, tested elsewhere)")
    with pytest.raises(TypeError, match=message):
        prepare_for_lora(qwen, gradient_checkpointing_kwargs=kwargs)
    assert checkpoint_settings(qwen) is None, "nothing was enabled"


_BOOLEAN_OPTIONS = ["use_gradient_checkpointing", "offload", "selective", "fused_attention", "keep_logits"]


# None is fused_attention's default (not given: on in training calls), hence not refused there.
@pytest.mark.parametrize(
    "name, value",
    [(name, value) for name in _BOOLEAN_OPTIONS for value in ("no", 0, None) if (name, value) != ("fused_attention", None)],
)
def test_every_boolean_option_takes_a_bool_only(qwen, name, value):
    with pytest.raises(TypeError, match=rf"{name} must be a bool \(True or False\), got {type(value).__name__}"):
        prepare_for_lora(qwen, **{name: value})
    assert checkpoint_settings(qwen) is None


def test_use_gradient_checkpointing_no_string_does_not_turn_it_on(qwen):
    with pytest.raises(TypeError):
        prepare_for_lora(qwen, use_gradient_checkpointing="no")
    assert not any(getattr(m, "gradient_checkpointing", False) for m in qwen.modules())


@needs_kwargs
def test_bad_kwargs_of_an_enable_call_are_refused_there(qwen):
    """Trainer passes TrainingArguments.gradient_checkpointing_kwargs to gradient_checkpointing_enable."""
    patch(qwen)
    with pytest.raises(TypeError, match="takes no 'bogus'"):
        qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"bogus": 1})
    with pytest.raises(TypeError, match=r"\['use_reentrant'\] must be a bool"):
        qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": "False"})


def test_valid_options_still_reach_torch(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    settings = checkpoint_settings(qwen)
    assert settings.kwargs == {"use_reentrant": True, "preserve_rng_state": False}
    model = lora(qwen)
    assert reentrant_in_effect(model) is True
    grads = step_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
