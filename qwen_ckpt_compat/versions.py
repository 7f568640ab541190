"""Installed versions and the transformers behaviours this library depends on.

Each flag is named after the behaviour it stands for. Where the behaviour can be seen on the installed
transformers (a parameter in a signature, a method that exists) it is detected; the few that cannot be
detected are version gates, kept together in :data:`_VERSION_GATES` with the reason for each.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Optional

from packaging.version import Version

__all__ = ["Capabilities", "capabilities", "installed_version"]

# Behaviours that leave no trace in a signature, so only the version tells. (release, reason)
_VERSION_GATES = {
    # 4.36 added the branch that looks for "value" in `_set_gradient_checkpointing`'s signature and falls
    # back to `self.apply(partial(..., value=True))`; 4.35.x always calls `(enable=..., gradient_checkpointing_func=...)`.
    "old_format_fallback": Version("4.36.0"),
    # 4.38 made `gradient_checkpointing_enable()` fill in `{"use_reentrant": True}` when no kwargs are given.
    "default_reentrant_true": Version("4.38.0"),
    # 5.0 changed that default to `{"use_reentrant": False}`.
    "default_reentrant_false": Version("5.0.0"),
    # 5.0's enable method calls `enable_input_require_grads()` itself for `input_ids` models, on the old-format
    # path too; before, only for models with an adapter loaded through transformers' own PEFT integration.
    "enable_adds_input_grads": Version("5.0.0"),
}


def installed_version(distribution: str) -> Optional[Version]:
    """Returns the installed version of ``distribution`` (without a local ``+cpu`` part), or ``None``."""
    try:
        raw = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Version(Version(raw).public)


@dataclass(frozen=True)
class Capabilities:
    """What the installed transformers does with gradient checkpointing.

    Attributes:
        transformers (`Version`): installed transformers release.
        torch (`Version`): installed torch release (local build tag dropped).
        peft (`Version`, *optional*): installed peft release, ``None`` when peft is absent.
        new_set_gradient_checkpointing_call (`bool`): transformers calls
            ``_set_gradient_checkpointing(enable=..., gradient_checkpointing_func=...)`` (4.35+) instead of
            ``self.apply(partial(_set_gradient_checkpointing, value=...))`` (up to 4.34).
        old_format_fallback (`bool`): an old-form ``_set_gradient_checkpointing(module, value)`` is detected
            and called the old way, ignoring the checkpointing kwargs (4.36+).
        checkpointing_kwargs (`bool`): the enable method takes checkpointing kwargs for ``torch.utils.checkpoint``.
        every_n_layers (`bool`): the enable method takes ``every_n_layers``.
        offload (`bool`): the enable method takes ``offload``.
        activation_checkpointing_api (`bool`): ``activation_checkpointing_enable`` exists (5.23+); the
            ``gradient_checkpointing_*`` names are deprecated aliases.
        native_default_use_reentrant (`bool`, *optional*): what native models get when no kwargs are given:
            ``None`` (torch's own default, reentrant with a warning), ``True`` (4.38+) or ``False`` (5.0+).
        enable_adds_input_grads (`bool`): the enable method makes the input embeddings' output require grad
            itself (5.0+), so reentrant checkpointing enabled after ``get_peft_model`` still reaches the adapters.
    """

    transformers: Version
    torch: Version
    peft: Optional[Version]
    new_set_gradient_checkpointing_call: bool
    old_format_fallback: bool
    checkpointing_kwargs: bool
    every_n_layers: bool
    offload: bool
    activation_checkpointing_api: bool
    native_default_use_reentrant: Optional[bool]
    enable_adds_input_grads: bool = False

    @property
    def enable_method_name(self) -> str:
        """The preferred name of the enable method on this release."""
        return "activation_checkpointing_enable" if self.activation_checkpointing_api else "gradient_checkpointing_enable"


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    """Detects (once) what the installed transformers does; imports transformers' modeling utilities."""
    from transformers.modeling_utils import PreTrainedModel

    transformers_version = installed_version("transformers")
    torch_version = installed_version("torch")
    if transformers_version is None or torch_version is None:  # pragma: no cover - both are dependencies
        raise ImportError("qwen-ckpt-compat needs torch and transformers installed")

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None) or PreTrainedModel.gradient_checkpointing_enable
    enable_params = set(inspect.signature(enable).parameters)
    # Up to 4.34 only the models define `_set_gradient_checkpointing`; PreTrainedModel has none.
    set_gc = getattr(PreTrainedModel, "_set_gradient_checkpointing", None)
    set_params = set(inspect.signature(set_gc).parameters) if set_gc is not None else set()

    if transformers_version >= _VERSION_GATES["default_reentrant_false"]:
        native_default: Optional[bool] = False
    elif transformers_version >= _VERSION_GATES["default_reentrant_true"]:
        native_default = True
    else:
        native_default = None

    return Capabilities(
        transformers=transformers_version,
        torch=torch_version,
        peft=installed_version("peft"),
        new_set_gradient_checkpointing_call="enable" in set_params,
        old_format_fallback=transformers_version >= _VERSION_GATES["old_format_fallback"],
        checkpointing_kwargs=bool(enable_params & {"gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"}),
        every_n_layers="every_n_layers" in enable_params,
        offload="offload" in enable_params,
        activation_checkpointing_api=hasattr(PreTrainedModel, "activation_checkpointing_enable"),
        native_default_use_reentrant=native_default,
        enable_adds_input_grads=transformers_version >= _VERSION_GATES["enable_adds_input_grads"],
    )
