"""The one-call entry point: ``model = prepare_for_lora(model)``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from .detection import is_old_checkpointing_api, unwrap_model
from .errors import CheckpointingNotSupportedError, CompatWarning
from .patching import (
    DEFAULT_CHECKPOINT_KWARGS,
    CheckpointRequest,
    enable_routed_checkpointing,
    patch,
    set_checkpointing_defaults,
)
from .versions import capabilities, require_checkpoint_keywords

__all__ = ["prepare_for_lora"]


def prepare_for_lora(
    model: Any,
    *,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[Mapping[str, Any]] = None,
    every_n_layers: int = 1,
    offload: bool = False,
) -> Any:
    """Gets a model ready for LoRA training with gradient checkpointing, on any transformers release.

    For old remote-code models (Qwen v1 and others whose ``_set_gradient_checkpointing`` takes
    ``(module, value)``) this patches the model's classes (see :func:`qwen_ckpt_compat.patch`), makes the
    given options the model's default for later enable calls that express no preference (``Trainer`` re-enables
    checkpointing itself), and enables checkpointing. Native transformers models are handed to transformers'
    own ``gradient_checkpointing_enable`` with the same options. In both cases ``config.use_cache`` is turned
    off and, when the checkpointing in effect is reentrant, the input embeddings' output is made to require
    grad so that gradients reach adapters behind a frozen base.

    Works before or after ``peft.get_peft_model``; calling it again is harmless (no second hook, no double
    wrapping; the latest options win).

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            The model to prepare; it is changed in place and returned.
        use_gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            Enable gradient checkpointing now. With `False` the model is only patched and given its defaults,
            so that a later ``gradient_checkpointing_enable()`` or ``Trainer(gradient_checkpointing=True)`` works.
        gradient_checkpointing_kwargs (`dict`, *optional*, defaults to `{"use_reentrant": False}`):
            Keyword arguments for ``torch.utils.checkpoint.checkpoint``. Without ``use_reentrant`` the
            non-reentrant variant is used.
        every_n_layers (`int`, *optional*, defaults to 1):
            Checkpoint decoder blocks ``0, n, 2n, ...`` only and keep the activations of the others: less
            recomputation for more memory. Honoured for old remote-code models on every release, and for
            native models where transformers supports it (5.16+); a warning says when it cannot be.
        offload (`bool`, *optional*, defaults to `False`):
            Keep the block inputs saved for the recompute in (pinned) host memory instead of on the accelerator.
            Same support as ``every_n_layers``.

    Returns:
        The same ``model``.

    Raises:
        `UnsupportedModelError` (a `TypeError`): ``model`` is not a transformers model or a peft model around one.
        `TypeError` / `ValueError`: an option has the wrong type or value.
        `CheckpointingNotSupportedError` (a `ValueError`): checkpointing was asked of a model that cannot do it.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> from qwen_ckpt_compat import prepare_for_lora

    >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-7B-Chat", trust_remote_code=True)
    >>> model = prepare_for_lora(model)
    >>> model = get_peft_model(model, LoraConfig(target_modules=["c_attn", "c_proj", "w1", "w2"]))
    ```
    """
    root = unwrap_model(model)
    request = _validated_request(gradient_checkpointing_kwargs, every_n_layers, offload)
    if use_gradient_checkpointing and not getattr(root, "supports_gradient_checkpointing", False):
        raise CheckpointingNotSupportedError(
            f"{type(root).__qualname__} (from {type(root).__module__}) does not support gradient checkpointing "
            "(its `supports_gradient_checkpointing` is False); pass use_gradient_checkpointing=False to prepare "
            "it without checkpointing."
        )
    if is_old_checkpointing_api(root):
        patch(root)
        set_checkpointing_defaults(root, request)
        if use_gradient_checkpointing:
            enable_routed_checkpointing(root)
    elif use_gradient_checkpointing:
        _call_enable(root, request)
        if _native_is_reentrant(request) and getattr(root, "_require_grads_hook", None) is None:
            root.enable_input_require_grads()
    config = getattr(root, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    return model


def _validated_request(kwargs: Optional[Mapping[str, Any]], every_n_layers: int, offload: bool) -> CheckpointRequest:
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got {type(kwargs).__name__}: {kwargs!r:.60}")
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be a bool, got {type(offload).__name__}: {offload!r:.60}")
    require_checkpoint_keywords(kwargs or {})  # e.g. context_fn on torch 2.0: refused now, not mid-training
    # A dict without `use_reentrant` expresses no preference on the mode: the non-reentrant default applies.
    return CheckpointRequest(
        kwargs={**DEFAULT_CHECKPOINT_KWARGS, **(kwargs or {})},
        every_n_layers=every_n_layers,
        offload=offload,
    )


def _call_enable(root: Any, request: CheckpointRequest) -> None:
    """Calls the installed transformers' enable method with the options its signature takes."""
    enable = getattr(root, capabilities().enable_method_name)
    parameters = inspect.signature(enable).parameters
    arguments: dict = {}
    unsupported = []
    kwargs_name = next((name for name in parameters if name.endswith("checkpointing_kwargs")), None)
    if kwargs_name is not None:
        arguments[kwargs_name] = request.kwargs
    else:
        unsupported.append(f"gradient_checkpointing_kwargs={request.kwargs}")
    for name, value, default in (("every_n_layers", request.every_n_layers, 1), ("offload", request.offload, False)):
        if value == default:
            continue
        if name in parameters:
            arguments[name] = value
        else:
            unsupported.append(f"{name}={value}")
    if unsupported:
        warnings.warn(
            f"transformers {capabilities().transformers}'s {type(root).__qualname__}.{enable.__name__}() does not take "
            f"{', '.join(unsupported)}; transformers' own behaviour applies instead (every layer, reentrant "
            "checkpointing where no kwargs can be given).",
            CompatWarning,
            stacklevel=3,
        )
    enable(**arguments)


def _native_is_reentrant(request: CheckpointRequest) -> bool:
    if capabilities().checkpointing_kwargs:
        return bool(request.kwargs and request.kwargs["use_reentrant"])
    return True  # no kwargs on this release: torch's default, which is reentrant
