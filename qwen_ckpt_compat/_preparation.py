"""Preparing old remote code: what a class gets when transformers loads it, and what a loaded model gets.

* :func:`prepare_class`, called by the import hook (:mod:`qwen_ckpt_compat._loading`) for every class loaded
  from remote code;
* :func:`prepare_loaded_model`, run by the prepared class's ``from_pretrained`` on each model it loads;
* :func:`patch`, the public entry for a model loaded before the import (or with the hook off).

Each applies the class patch (:mod:`qwen_ckpt_compat._class_patch`), the repairs (:mod:`qwen_ckpt_compat._repairs`)
and the model's family's own repairs (:mod:`qwen_ckpt_compat._family_registry`), in that order. Native classes and
new-API remote code are left alone.

Preparing holds a lock: two threads loading remote code at once (the same folder, or two folders of one code)
never interleave their checks and installs on a class, and a thread never goes on with a class that another
thread is still preparing.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from . import _class_patch
from ._detection import unwrap_model
from ._family_registry import family_of
from ._repairs._classes import is_transformers_class, remote_classes
from ._repairs.config import restore_config_attributes, restore_rope_scaling
from ._repairs.generation import (
    restore_generation_mixin,
    restore_legacy_caches,
    restore_past_key_values_argument,
    restore_position_ids_of_new_tokens,
)
from ._repairs.model_api import (
    declare_loss_kwargs,
    restore_auto_class,
    restore_missing_methods,
    restore_post_init,
)
from ._repairs.streaming import is_qwen_style_module, wrap_chat_stream
from ._repairs.tokenizers import is_remote_tokenizer_class, prepare_tokenizer_class
from ._repairs.weights import (
    protect_loaded_weights,
    recompute_non_persistent_buffers,
    record_construction,
    repair_after_loading,
    tie_output_embeddings,
)

__all__ = ["patch", "prepare_class", "prepare_loaded_model", "prepare_model", "restore_removed_apis"]

_PREPARING = threading.RLock()


def restore_removed_apis(cls: type) -> list[str]:
    """Gives the remote-code classes of ``cls`` what they rely on and this transformers removed or changed.

    Args:
        cls (`type`): a loaded model class from remote code. Pass the most derived class (``type(model)``):
            the generation fixes go on the classes that define ``prepare_inputs_for_generation``, the others
            on the outermost remote class (``QWenPreTrainedModel``).

    Returns:
        `list[str]`: what was installed now (empty when nothing was missing, e.g. on a second call).
    """
    classes = remote_classes(cls)
    if not classes:
        return []  # a transformers class: never touched
    base = classes[-1]
    installed = restore_missing_methods(base)
    installed += restore_generation_mixin(classes)
    installed += restore_legacy_caches(classes, base)
    installed += restore_past_key_values_argument(classes)
    installed += restore_position_ids_of_new_tokens(classes)
    installed += protect_loaded_weights(classes, base)
    installed += restore_post_init(classes)
    installed += declare_loss_kwargs(classes)
    return installed


def prepare_class(cls: type) -> list:
    """What a remote class gets when transformers loads it.

    * a remote config class: ``rope_scaling`` as it stores it (5.x standardises it); one of a registered family
      also gets the config attributes ``PretrainedConfig`` carried before 5.0;
    * an old-API model class (and a Qwen-style one): the class patch, the removed-API repairs, the recording of
      how its buffer-holding modules are built, the per-model repairs after ``from_pretrained``, and its
      family's own;
    * a slow tokenizer class (a ``PreTrainedTokenizer`` subclass from remote code): the tokenizer repairs its
      code needs (:mod:`qwen_ckpt_compat._repairs.tokenizers`), of any family.

    Returns:
        `list[str]`: what was installed now.
    """
    with _PREPARING:
        return _prepare_class(cls)


def _prepare_class(cls: type) -> list:
    from transformers import PretrainedConfig, PreTrainedModel

    if not isinstance(cls, type) or is_transformers_class(cls):
        return []
    if issubclass(cls, PretrainedConfig):
        installed = restore_rope_scaling(cls)  # every remote config that stores it
        return installed + (restore_config_attributes(cls) if family_of(cls) is not None else [])
    if is_remote_tokenizer_class(cls):
        return prepare_tokenizer_class(cls)
    if not issubclass(cls, PreTrainedModel):
        return []
    old_api = _class_patch.patch_class(cls) is not None
    module = sys.modules.get(cls.__module__)
    family = family_of(cls)
    # A registered family's class gets its repairs whatever its checkpointing API (GLM-4-9B's latest revision
    # leaves checkpointing to transformers, but its construction still needs ChatGLM's repairs on 5.x).
    if not (old_api or family is not None or is_qwen_style_module(getattr(module, "__file__", None))):
        return []
    installed = restore_removed_apis(cls)
    installed += record_construction(cls)
    installed += repair_after_loading(cls, prepare_loaded_model)
    installed += wrap_chat_stream(cls)
    if family is not None and family.prepare_class is not None:
        installed += family.prepare_class(cls)
    return installed


def prepare_model(model: Any) -> list:
    """Per-model repairs, in :func:`patch` and after loading (:func:`prepare_loaded_model`). Idempotent.

    The removed-API repairs of its classes (for a model loaded before the import hook), the config attributes,
    and its family's own repairs.

    Returns:
        `list[str]`: what was repaired now.
    """
    with _PREPARING:
        return _prepare_model(model)


def _prepare_model(model: Any) -> list:
    repaired = restore_removed_apis(type(model))
    config = getattr(model, "config", None)
    if config is not None and family_of(type(config)) is not None:
        repaired += restore_config_attributes(type(config))
    family = family_of(model)
    if family is not None and family.prepare_model is not None:
        repaired += family.prepare_model(model)
    return repaired


def prepare_loaded_model(model: Any) -> list:
    """What ``from_pretrained`` of a prepared class runs on each model it loads (before anyone ran it).

    The non-persistent buffers that loading left uninitialised get their ``__init__`` values again (only here:
    later, a buffer may hold what the forward made of it), a head tied by default only is tied to the input
    embeddings again (5.x left it random), the auto class is recorded where transformers
    4.45-4.52 forgot it (so that ``save_pretrained`` copies the remote code), then :func:`prepare_model`.

    Returns:
        `list[str]`: what was repaired now.
    """
    repaired = recompute_non_persistent_buffers(model)
    repaired += tie_output_embeddings(model)
    repaired += restore_auto_class(model)
    return repaired + prepare_model(model)


def patch(model: Any) -> Any:
    """Patches the classes of ``model`` so that every transformers release can checkpoint it.

    Only models whose remote code uses the old ``_set_gradient_checkpointing(self, module, value=False)``
    form are touched; native transformers models are returned unchanged. If checkpointing was already
    enabled through the remote code's own path, it is switched over to the routed blocks.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`): a loaded model.

    Returns:
        The same ``model``.

    Raises:
        `UnsupportedModelError`: ``model`` is not a transformers model (or a peft model around one).
    """
    root = unwrap_model(model)
    if _class_patch.patch_class(type(root)) is None:
        return model
    prepare_model(root)  # removed-API and family repairs, when loaded before the import hook
    restore_auto_class(root)  # so that save_pretrained copies the remote code (4.45-4.52 forgot it)
    _class_patch.switch_over(root)
    return model
