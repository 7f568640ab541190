"""Installed versions and the transformers and torch behaviours this library depends on.

Each flag is named after the behaviour it stands for. Where the behaviour can be seen on the installed
transformers (a parameter in a signature, a method that exists) it is detected; the few that cannot be
detected are version gates, kept together in :data:`_VERSION_GATES` with the reason for each.

torch's optional features are always detected; :data:`CHECKPOINT_KEYWORD_RELEASES` and
:data:`SAVE_ON_CPU_DEVICE_TYPE_RELEASE` only name the release that brought each one, for error messages.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from packaging.version import Version

from .errors import UnsupportedTorchError

__all__ = [
    "CHECKPOINT_KEYWORD_RELEASES",
    "Capabilities",
    "capabilities",
    "checkpoint_keywords",
    "installed_version",
    "require_checkpoint_keywords",
    "save_on_cpu_takes_device_type",
]

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


# ------------------------------------------------------------------------------------------------ torch

#: Keyword arguments of ``torch.utils.checkpoint.checkpoint`` that not every supported torch takes, with the
#: first release that does (read off each release's ``torch/utils/checkpoint.py``). torch 2.0 raises
#: "Unexpected keyword arguments" for the others; later releases pass unknown keywords on to the
#: checkpointed function, where they fail far from the cause.
CHECKPOINT_KEYWORD_RELEASES = {
    "context_fn": "2.1",
    "determinism_check": "2.1",
    "debug": "2.1",
    "early_stop": "2.9",
    "respect_saved_tensors_hooks": "2.14",
}
#: ``torch.autograd.graph.save_on_cpu(device_type=...)``: torch 2.0 pins host memory for CUDA only.
SAVE_ON_CPU_DEVICE_TYPE_RELEASE = "2.1"


def _keyword_parameters(function: object, *, after: int = 0) -> Optional[frozenset]:
    """Names ``function`` takes by keyword, past its first ``after`` parameters; ``None`` when it names none
    there (a ``*args, **kwargs`` wrapper does not say what it takes)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    named = [p.name for p in parameters[after:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return frozenset(named) if named else None


def checkpoint_keywords() -> frozenset:
    """The keyword arguments the installed ``torch.utils.checkpoint.checkpoint`` takes.

    ``use_reentrant`` and ``preserve_rng_state`` are taken by every torch 2.x. When the function does not show
    its keywords (a wrapper with ``**kwargs`` only), every keyword of :data:`CHECKPOINT_KEYWORD_RELEASES` is
    assumed to be taken.
    """
    import torch.utils.checkpoint

    named = _keyword_parameters(torch.utils.checkpoint.checkpoint, after=1)  # after `function`
    if named is None:
        named = frozenset(CHECKPOINT_KEYWORD_RELEASES)
    return named | {"use_reentrant", "preserve_rng_state"}


def require_checkpoint_keywords(keywords: Iterable[str]) -> None:
    """Raises `UnsupportedTorchError` for checkpoint keywords that only a newer torch takes.

    Keywords that no torch release in :data:`CHECKPOINT_KEYWORD_RELEASES` knows are left to torch itself.
    """
    missing = [k for k in keywords if k in CHECKPOINT_KEYWORD_RELEASES and k not in checkpoint_keywords()]
    if not missing:
        return
    needed = max((CHECKPOINT_KEYWORD_RELEASES[k] for k in missing), key=Version)
    raise UnsupportedTorchError(
        f"torch {installed_version('torch')}'s torch.utils.checkpoint.checkpoint does not take "
        f"{', '.join(missing)} (gradient_checkpointing_kwargs); that needs torch >= {needed}. Upgrade torch, or "
        "leave these keywords out."
    )


def save_on_cpu_takes_device_type() -> bool:
    """Whether ``torch.autograd.graph.save_on_cpu`` takes ``device_type`` (torch >= 2.1)."""
    import torch.autograd.graph

    named = _keyword_parameters(torch.autograd.graph.save_on_cpu)  # the class: its __init__ without self
    return named is None or "device_type" in named

