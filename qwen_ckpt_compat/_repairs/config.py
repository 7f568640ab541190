"""Config classes: the attributes ``PretrainedConfig`` carried before 5.0, and ``rope_scaling`` as it was stored.

* The generation defaults ``PretrainedConfig`` carried before 5.0 (``max_length=20``, ``num_beams=1``, ...):
  ChatGLM2/3 reads ``config.max_length`` while the model is built. They are answered, where the config has no
  such attribute, by a ``__getattr__`` on the remote config class, never stored on the instance, so that 5.x's
  checks for generation parameters in a model config (``save_pretrained``, ``generate``) do not see them.
* ``_attn_implementation``, which ``PretrainedConfig`` has carried since 4.36 and 2024 remote code reads while the
  model is built (GLM-4-9B picks its attention class with it): on 4.31-4.35 it is answered with ``"eager"``, what
  4.36 gives a config built without one, the same way (docs/facts/glm4.md).
* ``use_cache`` given to ``PretrainedConfig.__init__`` (from ``config.json``): 5.x drops it as a generation
  parameter, so a config class that does not set it itself (ChatGLM2/3's) has none; it is kept, as before 5.0.
* ``rope_scaling`` stored by a remote config (``null`` in ``config.json``): 5.x standardises it into a dict, so
  code testing ``rope_scaling is None`` takes its scaling branch; it is read back as stored, for every remote
  config class that sets it (:func:`restore_rope_scaling`), not only those of a registered family.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from .._patches import registry
from ._classes import INSTALLED_MARK, REPAIRS, code_names, is_transformers_class

__all__ = ["LATER_CONFIG_DEFAULTS", "PRE_5_CONFIG_DEFAULTS", "restore_config_attributes", "restore_rope_scaling"]


#: What ``PretrainedConfig.__init__`` gave every config before 5.0 (transformers 4.55.4's generation defaults),
#: plus ``use_cache``, which config classes of that era received from ``config.json`` and GenerationConfig
#: defaults to ``True``. Served only for names the installed ``PretrainedConfig`` no longer carries.
PRE_5_CONFIG_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "use_cache": True,
}

#: What ``PretrainedConfig`` carries from a later release on, which remote code written for that release reads:
#: served, as :data:`PRE_5_CONFIG_DEFAULTS`, where the installed ``PretrainedConfig`` lacks it (4.31-4.35).
LATER_CONFIG_DEFAULTS: dict[str, Any] = {"_attn_implementation": "eager"}

_KEPT_FROM_INIT = ("use_cache",)

_MISSING = object()

def _dropped_config_defaults() -> dict:
    """The names of :data:`PRE_5_CONFIG_DEFAULTS` a fresh ``PretrainedConfig`` no longer has, with their values."""
    from transformers import PretrainedConfig

    fresh = PretrainedConfig()
    defaults = {**PRE_5_CONFIG_DEFAULTS, **LATER_CONFIG_DEFAULTS}
    return {name: value for name, value in defaults.items() if not hasattr(fresh, name)}

def _is_remote_config_class(cls: type) -> bool:
    from transformers import PretrainedConfig

    return isinstance(cls, type) and issubclass(cls, PretrainedConfig) and not is_transformers_class(cls)

def _served_name(config: Any, name: str) -> bool:
    """``name`` is answered by the library's ``__getattr__`` (neither the instance nor its class has it)."""
    return name not in vars(config) and inspect.getattr_static(type(config), name, _MISSING) is _MISSING

def _make_config_getattr(served: dict, inherited: Optional[Callable]) -> Callable:
    def __getattr__(self: Any, name: str) -> Any:
        """Answers the attributes ``PretrainedConfig`` carried before 5.0 with their old defaults."""
        if name in served:
            return served[name]
        if inherited is not None:
            return inherited(self, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    __getattr__.__dict__[INSTALLED_MARK] = True
    return __getattr__

def _without_served_defaults(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``_get_generation_parameters`` that does not count the old defaults answered by ``__getattr__``."""
    found = wrapped(*args, **kwargs)
    return {name: value for name, value in found.items() if not _served_name(instance, name)}

def _keep_init_values(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """The remote config's ``__init__``: ``use_cache`` given to it stays on the config, as before 5.0."""
    result = wrapped(*args, **kwargs)
    for name in _KEPT_FROM_INIT:
        if name in kwargs and name not in vars(instance):
            setattr(instance, name, kwargs[name])
    return result

def restore_config_attributes(cls: type) -> list[str]:
    """Gives a remote config class the attributes ``PretrainedConfig`` carried before 5.0 (see the module doc).

    Detected: only the names a fresh ``PretrainedConfig`` of the installed transformers lacks are answered, and
    only on remote config classes (never on transformers' own). Idempotent.

    Args:
        cls (`type`): a config class loaded from remote code.

    Returns:
        `list[str]`: what was installed now.
    """
    if not _is_remote_config_class(cls) or INSTALLED_MARK in getattr(cls.__dict__.get("__getattr__"), "__dict__", {}):
        return []  # a transformers class, or done already
    served = _dropped_config_defaults()
    if not served:
        return []  # this PretrainedConfig still carries every one of them
    installed = []
    inherited = getattr(cls, "__getattr__", None)
    if registry.set(cls, "__getattr__", _make_config_getattr(served, inherited), group=REPAIRS, what="pre-5.0 defaults"):
        installed.append(f"{cls.__qualname__}.__getattr__({', '.join(sorted(served))})")
    what = "without the served defaults"
    if hasattr(cls, "_get_generation_parameters") and registry.wrap(
        cls, "_get_generation_parameters", _without_served_defaults, group=REPAIRS, what=what
    ):
        installed.append(f"{cls.__qualname__}._get_generation_parameters ({what})")
    what = f"keeps {', '.join(_KEPT_FROM_INIT)}"
    if "__init__" in cls.__dict__ and any(name in served for name in _KEPT_FROM_INIT):
        if registry.wrap(cls, "__init__", _keep_init_values, group=REPAIRS, what=what):
            installed.append(f"{cls.__qualname__}.__init__ ({what})")
    return installed


def _plain_rope_scaling() -> property:
    def get(self: Any) -> Any:
        try:
            return self.__dict__["rope_scaling"]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'rope_scaling'") from None

    def set_(self: Any, value: Any) -> None:
        self.__dict__["rope_scaling"] = value

    rope_scaling = property(get, set_, doc="What the remote config stored, as before 5.0 (never standardised).")
    get.__dict__[INSTALLED_MARK] = True
    return rope_scaling


def restore_rope_scaling(cls: type) -> list[str]:
    """``rope_scaling`` as a plain attribute again, for a remote config class that sets it itself.

    5.x's ``PretrainedConfig`` turns ``rope_scaling`` into a property over ``rope_parameters`` and standardises what
    is stored there: a remote config that stores ``rope_scaling = None`` (``"rope_scaling": null`` in
    ``config.json``) reads back ``{"rope_theta": ..., "rope_type": "default"}``, and 2023 code that tests
    ``config.rope_scaling is None`` takes its scaling branch (``KeyError: 'type'``). Detected on the classes: only
    where the installed ``PretrainedConfig`` has such a property, and only on remote config classes whose own code
    assigns ``rope_scaling`` and defines neither it nor ``rope_parameters``. The value lives in the instance's
    ``__dict__`` under its own name, so ``to_dict`` and ``save_pretrained`` write it back as it was. Idempotent.

    Returns:
        `list[str]`: what was installed now.
    """
    from transformers import PretrainedConfig

    if not _is_remote_config_class(cls) or not isinstance(inspect.getattr_static(PretrainedConfig, "rope_scaling", None), property):
        return []  # transformers' own config, or a PretrainedConfig that stores rope_scaling as it is given
    remote = [klass for klass in cls.__mro__ if _is_remote_config_class(klass)]
    if any("rope_scaling" in klass.__dict__ or "rope_parameters" in klass.__dict__ for klass in remote):
        return []  # defined by the remote code itself (or by this repair already)
    if not any("rope_scaling" in code_names(klass.__dict__.get("__init__")) for klass in remote):
        return []  # the remote code never sets it: what transformers makes of it is not its concern
    if not registry.set(cls, "rope_scaling", _plain_rope_scaling(), group=REPAIRS, what="rope_scaling as stored (pre-5.0)"):
        return []
    return [f"{cls.__qualname__}.rope_scaling (as stored, pre-5.0)"]
