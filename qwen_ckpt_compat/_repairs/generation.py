"""Generation: what old remote code expects of ``generate`` and ``GenerationMixin``.

* ``GenerationMixin`` as a base of the generating class (5.x ``PreTrainedModel`` no longer inherits it).
  5.x's auto classes add it, to a subclass, on the first load only; a second ``from_pretrained`` of the same
  code in a process (a reload after ``save_pretrained``, the base model for ``PeftModel.from_pretrained``)
  gave a model without ``generate`` and without its ``generation_config``.
* Legacy tuple caches in ``generate``: up to 4.53 a model that did not set ``_supports_cache_class`` (no
  remote code of that era does) got no cache on the first step and its own tuple of ``(key, value)`` pairs
  after that. From 4.55 on ``generate`` hands it a ``DynamicCache``, which from 4.57 on is truthy while still
  empty, so the remote ``prepare_inputs_for_generation`` cuts the prompt to its last token; and the remote
  forward cannot index a 5.x cache (``past_key_values[0][0]``). The old answer, "no cache objects for this
  model", is given back on the class (``_supports_default_dynamic_cache``).
* The cache's keyword (5.24 renamed ``past_key_values`` to ``cache``): a ``prepare_inputs_for_generation``
  written for ``past_key_values`` gets the model's past under that name again, so that decoding uses it
  instead of recomputing the whole sequence at every step.
* Position ids of the tokens fed: later 5.x ``generate`` builds ``position_ids`` for the whole sequence and
  hands them to every step; a ``prepare_inputs_for_generation`` that passes ``position_ids`` on (LLaMA-era:
  InternLM's) cut only those it computed itself, so the last token came with every position. The positions
  returned are cut to the ids returned.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .._patches import registry
from ._classes import INSTALLED_MARK, REPAIRS, defines, generation_mixin, parameters

__all__ = [
    "restore_generation_mixin",
    "restore_legacy_caches",
    "restore_past_key_values_argument",
    "restore_position_ids_of_new_tokens",
]


def _legacy_cache_only(cls: type) -> bool:
    """``GenerationMixin._supports_default_dynamic_cache`` for remote code that never declared Cache support.

    Returns:
        `bool`: always `False`, the answer transformers <= 4.53 gave every model without
        ``_supports_cache_class = True``: ``generate`` hands the model no cache object, so its first step gets
        ``past_key_values=None`` and every later step the tuple of ``(key, value)`` pairs the model returned.
    """
    return False

_legacy_cache_only.__dict__[INSTALLED_MARK] = True

def _past_under_its_old_name(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper of a remote ``prepare_inputs_for_generation(input_ids, past_key_values=None, ...)``.

    transformers >= 5.24 passes the model's past as ``cache=``, a name this code does not know (it would land
    in ``**kwargs``, and the whole sequence would be recomputed at every step): it is passed on as
    ``past_key_values``.
    """
    if "cache" in kwargs and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
    return wrapped(*args, **kwargs)

def _positions_of_the_tokens_fed(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper of a remote ``prepare_inputs_for_generation`` that passes ``position_ids`` on as it gets them.

    ``generate`` of later 5.x releases builds ``position_ids`` for the whole sequence itself and hands them to every
    step, relying on the model's ``prepare_inputs_for_generation`` to keep those of the new tokens; code written
    when ``generate`` passed none (LLaMA-era: it cuts only the ids it computes itself from the attention mask)
    fed a whole sequence of positions with the last token alone. The positions returned are cut to the ids
    returned: the last ``input_ids.shape[-1]`` of them.
    """
    inputs = wrapped(*args, **kwargs)
    ids, positions = inputs.get("input_ids"), inputs.get("position_ids")
    if isinstance(ids, torch.Tensor) and isinstance(positions, torch.Tensor) and positions.shape[-1] > ids.shape[-1]:
        inputs = dict(inputs)
        inputs["position_ids"] = positions[..., -ids.shape[-1] :]
    return inputs

def restore_generation_mixin(classes: list) -> list:
    """Adds ``GenerationMixin`` to the bases of remote classes that generate but no longer inherit it."""
    mixin = generation_mixin()
    if mixin is None:
        return []
    installed = []
    for klass in reversed(classes):  # the outermost first: its subclasses then inherit the mixin
        generates = "prepare_inputs_for_generation" in klass.__dict__ or "generate" in klass.__dict__
        if generates and not issubclass(klass, mixin):
            # What transformers does for native models (`class XForCausalLM(XPreTrainedModel,
            # GenerationMixin)`) and, on the first load only, for remote ones (on a subclass).
            if registry.add_base(klass, mixin, group=REPAIRS, what="GenerationMixin as a base (5.x)"):
                installed.append(f"{klass.__qualname__}(GenerationMixin)")
    return installed

def restore_legacy_caches(classes: list, base: type) -> list:
    """Old remote code speaks legacy tuple caches: ``generate`` must hand it no cache object."""
    mixin = generation_mixin()
    name = "_supports_default_dynamic_cache"
    if mixin is None or not hasattr(mixin, name) or defines(classes, name):
        return []  # an older transformers only knows legacy caches; or the remote code decides itself
    if any(klass.__dict__.get("_supports_cache_class") for klass in classes):
        return []  # this remote code declared that it handles Cache objects
    if not registry.set(base, name, classmethod(_legacy_cache_only), group=REPAIRS, what="legacy tuple caches only"):
        return []
    return [name]

def restore_past_key_values_argument(classes: list) -> list:
    """``generate`` passes the past as ``cache=`` (5.24+): code that knows ``past_key_values`` gets it so."""
    mixin = generation_mixin()
    generic = parameters(getattr(mixin, "prepare_inputs_for_generation", None))
    if "cache" not in generic or "past_key_values" in generic:
        return []
    installed = []
    for klass in classes:
        function = klass.__dict__.get("prepare_inputs_for_generation")
        if function is None or INSTALLED_MARK in getattr(function, "__dict__", {}) or hasattr(function, "__wrapped__"):
            continue
        found = parameters(function)
        if "past_key_values" in found and "cache" not in found:
            what = "cache -> past_key_values (5.24+)"
            if registry.wrap(klass, "prepare_inputs_for_generation", _past_under_its_old_name, group=REPAIRS, what=what):
                installed.append(f"{klass.__qualname__}.prepare_inputs_for_generation(cache -> past_key_values)")
    return installed

def _passes_position_ids_on(function: Any) -> bool:
    """Whether a ``prepare_inputs_for_generation`` reads ``position_ids`` (a parameter, or from ``kwargs``)."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return code is not None and ("position_ids" in code.co_varnames or "position_ids" in code.co_consts)

def restore_position_ids_of_new_tokens(classes: list) -> list:
    """``generate`` hands whole-sequence ``position_ids`` to every step (later 5.x): keep those of the tokens fed."""
    mixin = generation_mixin()
    if mixin is None or not hasattr(mixin, "_prepare_position_ids_for_generation"):
        return []  # generate passes no position_ids of its own
    installed = []
    for klass in classes:
        function = klass.__dict__.get("prepare_inputs_for_generation")
        if function is None or not _passes_position_ids_on(function):
            continue
        what = "position_ids of the tokens fed (later 5.x)"
        if registry.wrap(klass, "prepare_inputs_for_generation", _positions_of_the_tokens_fed, group=REPAIRS, what=what):
            installed.append(f"{klass.__qualname__}.prepare_inputs_for_generation (position_ids of the tokens fed)")
    return installed
