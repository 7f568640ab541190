"""The remote-code families this library knows, each in a module of its own, plugged into one registry.

The generic mechanism (patching, routing, the removed-API repairs) works on any remote class with the old
``_set_gradient_checkpointing(self, module, value=False)``; every repair is detected on the classes. A family
module adds what only that family needs, and its facts:

* ``title``, ``model_types``, ``identify``: how its classes are recognised (``config.model_type``, and for
  families that share one, something only their code has);
* ``extra_blocks``: checkpointable blocks outside ``_no_split_modules`` (Qwen-VL's vision transformer);
* ``prepare_class`` / ``prepare_model``: repairs for that family alone, on a class when transformers loads it,
  on a model after loading;
* ``checkpointed``, ``caveats``: what the docs say about it.

Adding a family means adding a module with a ``FAMILY`` and one line in :data:`_MODULES`, plus a fixture in
:mod:`qwen_ckpt_compat.testing` and its tests.

This module also runs the per-class and per-model preparation the import hook and :func:`~qwen_ckpt_compat.patch`
apply: :func:`prepare_class`, :func:`prepare_loaded_model` and :func:`prepare_model`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["Family", "families", "family_of", "prepare_class", "prepare_loaded_model", "prepare_model"]

# Registry: one line per family, most specific first (Qwen-VL before Qwen: both are model_type "qwen").
_MODULES = ("qwen_vl", "qwen", "chatglm", "baichuan", "internlm")


@dataclass(frozen=True)
class Family:
    """One remote-code family with the old checkpointing API.

    Attributes:
        name (`str`): short name (the module's), e.g. ``"chatglm"``.
        title (`str`): the models, as the docs name them.
        model_types (`tuple[str, ...]`): ``config.model_type`` values of this family.
        checkpointed (`str`): what is checkpointed, and why, for the docs.
        caveats (`tuple[str, ...]`): what users should know (one sentence each).
        identify (`Callable[[type], bool]`, *optional*): a further test on a model class, for families sharing a
            ``model_type``.
        extra_blocks (`tuple[str, ...]`): class names of blocks to route besides those of ``_no_split_modules``.
        prepare_class (`Callable[[type], list[str]]`, *optional*): family repairs on a loaded model class.
        prepare_model (`Callable[[Any], list[str]]`, *optional*): family repairs on a loaded model.
    """

    name: str
    title: str
    model_types: tuple
    checkpointed: str
    caveats: tuple = ()
    identify: Optional[Callable[[type], bool]] = None
    extra_blocks: tuple = ()
    prepare_class: Optional[Callable[[type], list]] = None
    prepare_model: Optional[Callable[[Any], list]] = None


def families() -> tuple:
    """Every registered :class:`Family`, most specific first."""
    return tuple(importlib.import_module(f"{__name__}.{name}").FAMILY for name in _MODULES)


def _model_type(cls: type) -> Optional[str]:
    from transformers import PretrainedConfig

    if issubclass(cls, PretrainedConfig):
        return getattr(cls, "model_type", None)
    return getattr(getattr(cls, "config_class", None), "model_type", None)


def family_of(model_or_class: Any) -> Optional[Family]:
    """The registered family of a model, a model class or a config class; ``None`` when none matches."""
    from transformers import PretrainedConfig

    if isinstance(model_or_class, type):
        cls = model_or_class
    elif isinstance(model_or_class, PretrainedConfig):
        cls = type(model_or_class)
    else:
        from ..detection import unwrap_model

        cls = type(unwrap_model(model_or_class))
    model_type = _model_type(cls)
    is_config = issubclass(cls, PretrainedConfig)
    for family in families():
        if model_type not in family.model_types:
            continue
        if is_config or family.identify is None or family.identify(cls):
            return family
    return None


def module_of(cls: type) -> Any:
    """The module a class was defined in (``None`` if it is gone)."""
    return sys.modules.get(getattr(cls, "__module__", ""))


# ------------------------------------------------------------------------------------------ preparation


def prepare_class(cls: type) -> list:
    """What a remote class gets when transformers loads it (the import hook of :mod:`qwen_ckpt_compat.loading`).

    * a config class of a registered family: the config attributes ``PretrainedConfig`` carried before 5.0;
    * an old-API model class (and a Qwen-style one): the class-level patch
      (:func:`qwen_ckpt_compat.patching.patch_class`), the removed-API repairs, the recording of how its
      buffer-holding modules are built, the per-model repairs after ``from_pretrained``, and its family's own.

    Native classes and new-API remote code are left alone.

    Returns:
        `list[str]`: what was installed now.
    """
    from transformers import PretrainedConfig, PreTrainedModel

    from .. import removed_apis
    from ..loading import is_qwen_style_module
    from ..patching import patch_class

    if not isinstance(cls, type) or removed_apis._is_transformers_class(cls):
        return []
    if issubclass(cls, PretrainedConfig):
        return removed_apis.restore_config_attributes(cls) if family_of(cls) is not None else []
    if not issubclass(cls, PreTrainedModel):
        return []
    old_api = patch_class(cls) is not None
    if not (old_api or is_qwen_style_module(getattr(module_of(cls), "__file__", None))):
        return []
    installed = removed_apis.restore_removed_apis(cls)
    installed += removed_apis.record_construction(cls)
    installed += removed_apis.repair_after_loading(cls, prepare_loaded_model)
    family = family_of(cls)
    if family is not None and family.prepare_class is not None:
        installed += family.prepare_class(cls)
    return installed


def prepare_model(model: Any) -> list:
    """Per-model repairs, in :func:`~qwen_ckpt_compat.patch` and after loading (:func:`prepare_loaded_model`).

    The removed-API repairs of its classes (for a model loaded before the import hook), the config attributes,
    and its family's own repairs. Idempotent.

    Returns:
        `list[str]`: what was repaired now.
    """
    from .. import removed_apis

    repaired = removed_apis.restore_removed_apis(type(model))
    config = getattr(model, "config", None)
    if config is not None and family_of(type(config)) is not None:
        repaired += removed_apis.restore_config_attributes(type(config))
    family = family_of(model)
    if family is not None and family.prepare_model is not None:
        repaired += family.prepare_model(model)
    return repaired


def prepare_loaded_model(model: Any) -> list:
    """What ``from_pretrained`` of a prepared class runs on each model it loads (before anyone ran it).

    The non-persistent buffers that loading left uninitialised get their ``__init__`` values again (only here:
    later, a buffer may hold what the forward made of it), the auto class is recorded where transformers
    4.45-4.52 forgot it (so that ``save_pretrained`` copies the remote code), then :func:`prepare_model`.

    Returns:
        `list[str]`: what was repaired now.
    """
    from .. import removed_apis

    repaired = removed_apis.recompute_non_persistent_buffers(model)
    repaired += removed_apis.restore_auto_class(model)
    return repaired + prepare_model(model)
