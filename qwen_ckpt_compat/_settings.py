"""What checkpointing runs with: the caller's request, its validation, and the settings built from it.

A :class:`CheckpointRequest` is what a caller asked for (``prepare_for_lora``'s options, or an enable call's
arguments); ``None`` fields mean "no preference". :func:`resolve` turns the request in effect into
:class:`CheckpointSettings`: the checkpoint function (``torch.utils.checkpoint.checkpoint`` with the kwargs
bound, under ``save_on_cpu`` when offloading) and the options the checkpoint layer reads. Every option is
checked once, where it enters (:func:`validate_checkpoint_kwargs`, :func:`validate_bool`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.autograd.graph
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it

from ._hooks import engine_hooks, speed_hooks
from ._model_state import state_of
from ._offload import AsyncOffload
from ._versions import (
    SAVE_ON_CPU_DEVICE_TYPE_RELEASE,
    checkpoint_keywords,
    installed_version,
    require_checkpoint_keywords,
    save_on_cpu_takes_device_type,
)
from .errors import CompatWarning

__all__ = [
    "DEFAULT_CHECKPOINT_KWARGS",
    "CheckpointRequest",
    "CheckpointSettings",
    "build_checkpoint_function",
    "reentrancy_of",
    "resolve",
    "validate_bool",
    "validate_checkpoint_kwargs",
    "without_context_fn",
]

#: What ``prepare_for_lora`` asks for when given no kwargs: the modern, non-reentrant checkpoint. (An enable call
#: that names no ``use_reentrant`` gets non-reentrant too, except on models with bitsandbytes 8-bit layers, whose
#: activations only reentrant checkpointing frees.)
DEFAULT_CHECKPOINT_KWARGS: dict = {"use_reentrant": False}


@dataclass(frozen=True)
class CheckpointRequest:
    """What a caller asked for; ``None`` means "no preference".

    Attributes:
        kwargs (`dict`, *optional*): kwargs for ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` ...).
        every_n_layers (`int`, *optional*): checkpoint every n-th decoder block only.
        offload (`bool`, *optional*): keep the saved block inputs in host memory.
        memory_budget (`int`, *optional*): bytes; plan which blocks to checkpoint (the speed wing's budget).
        selective (`bool`, *optional*): checkpointed blocks keep their expensive outputs (selective recompute).
    """

    kwargs: Optional[dict] = None
    every_n_layers: Optional[int] = None
    offload: Optional[bool] = None
    memory_budget: Optional[int] = None
    selective: Optional[bool] = None

    def over(self, fallback: "CheckpointRequest") -> "CheckpointRequest":
        """This request, with its gaps filled from ``fallback``."""
        return CheckpointRequest(
            kwargs=self.kwargs if self.kwargs is not None else fallback.kwargs,
            every_n_layers=self.every_n_layers if self.every_n_layers is not None else fallback.every_n_layers,
            offload=self.offload if self.offload is not None else fallback.offload,
            memory_budget=self.memory_budget if self.memory_budget is not None else fallback.memory_budget,
            selective=self.selective if self.selective is not None else fallback.selective,
        )


@dataclass(frozen=True)
class CheckpointSettings:
    """How a model checkpoints its blocks.

    Attributes:
        function (`Callable`): the checkpoint function, called as ``function(run, *tensors)``.
        use_reentrant (`bool`, *optional*): the mode it runs in; ``None`` when it cannot be known (a custom
            function), which is treated as reentrant for the sake of input gradients.
        every_n_layers (`int`): checkpoint blocks ``0, n, 2n, ...`` and keep the activations of the others.
        offload (`bool`): the saved block inputs live in (pinned) host memory.
        kwargs (`dict`): the kwargs given to ``torch.utils.checkpoint.checkpoint``, for display.
        memory_budget (`int`, *optional*): bytes; which blocks are checkpointed is then planned during training
            (``memory_plan(model)``).
        selective (`bool`): checkpointed blocks keep their attention and projection outputs (``kwargs["context_fn"]``).
        fused_attention (`bool`): the fused causal attention kernel is on for the model's attention modules (as
            read by ``checkpoint_settings``).
        chunked_loss (`int`, *optional*): tokens per chunk of the chunked loss, when it is on (as read by
            ``checkpoint_settings``).
    """

    function: Callable[..., Any]
    use_reentrant: Optional[bool]
    every_n_layers: int = 1
    offload: bool = False
    kwargs: Optional[dict] = None
    memory_budget: Optional[int] = None
    selective: bool = False
    fused_attention: bool = False
    chunked_loss: Optional[int] = None


# ------------------------------------------------------------------------------------------ validation

# The types of the checkpoint keywords whose values torch does not check itself (a truthy string passed as
# `use_reentrant` silently selects the reentrant variant).
_KEYWORD_TYPES: dict = {
    "use_reentrant": (bool,),
    "preserve_rng_state": (bool,),
    "debug": (bool,),
    "early_stop": (bool,),
    "respect_saved_tensors_hooks": (bool,),
    "determinism_check": (str,),
}
_CALLABLE_KEYWORDS = ("context_fn",)


def validate_bool(name: str, value: Any) -> bool:
    """``value`` if it is a `bool`; else `TypeError` naming the option."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}: {value!r:.60}")
    return value


def validate_checkpoint_kwargs(kwargs: Any, name: str = "gradient_checkpointing_kwargs") -> Optional[dict]:
    """Checks ``kwargs`` for ``torch.utils.checkpoint.checkpoint`` against the installed torch; returns a copy.

    Raises:
        `TypeError`: not a dict, a key the installed torch's checkpoint does not take, or a value of the wrong type
            (``use_reentrant`` must be a bool, ``context_fn`` a callable).
        `UnsupportedTorchError`: a key only a newer torch takes.
    """
    if kwargs is None:
        return None
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict or None, got {type(kwargs).__name__}: {kwargs!r:.60}")
    require_checkpoint_keywords(kwargs)  # known keywords of a newer torch: "needs torch >= X"
    accepted = checkpoint_keywords()
    unknown = sorted(str(key) for key in kwargs if key not in accepted)
    if unknown:
        raise TypeError(
            f"{name}: torch {installed_version('torch')}'s torch.utils.checkpoint.checkpoint takes no "
            f"{', '.join(map(repr, unknown))}; it takes {', '.join(sorted(accepted))}."
        )
    for key, value in kwargs.items():
        types = _KEYWORD_TYPES.get(key)
        if types is not None and not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise TypeError(f"{name}[{key!r}] must be a {wanted}, got {type(value).__name__}: {value!r:.60}")
        if key in _CALLABLE_KEYWORDS and not callable(value):
            raise TypeError(f"{name}[{key!r}] must be callable, got {type(value).__name__}: {value!r:.60}")
    return dict(kwargs)


# ------------------------------------------------------------------------------- the checkpoint function


def _offload_device_type() -> Optional[str]:
    """The accelerator whose memory offloading frees, or ``None`` on a host without one."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is not None:
        return current.type
    return "cuda" if torch.cuda.is_available() else None


def _save_on_cpu_options() -> dict:
    """What ``save_on_cpu`` gets: pinned host memory for the accelerator, as far as the installed torch can."""
    device_type = _offload_device_type()
    if device_type is None:
        # Without an accelerator the tensors already live on the host: nothing is copied or pinned.
        return {"pin_memory": False}
    if save_on_cpu_takes_device_type():
        return {"pin_memory": True, "device_type": device_type}
    if device_type == "cuda":
        return {"pin_memory": True}  # what an older save_on_cpu pins for
    warnings.warn(
        f"offload=True: pinned host memory for {device_type!r} needs torch >= {SAVE_ON_CPU_DEVICE_TYPE_RELEASE} "
        f"(torch.autograd.graph.save_on_cpu(device_type=...)); torch {installed_version('torch')} pins for CUDA "
        "only, so the saved block inputs go to ordinary (unpinned) host memory, which copies back more slowly.",
        CompatWarning,
        stacklevel=2,
    )
    return {"pin_memory": False}


def _offload_context() -> Any:
    """Where a checkpointed block's saved inputs wait: on CUDA, pinned host memory with the copies on a side stream
    (:class:`~qwen_ckpt_compat._offload.AsyncOffload`); elsewhere torch's ``save_on_cpu``."""
    # Looked up at call time, so that tests (and users) can observe or replace them.
    if _offload_device_type() == "cuda" and torch.cuda.is_available():
        return AsyncOffload()
    return torch.autograd.graph.save_on_cpu(**_save_on_cpu_options())


def _checkpoint_offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with _offload_context():
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def _checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def build_checkpoint_function(kwargs: dict, offload: bool = False) -> Callable[..., Any]:
    """``torch.utils.checkpoint.checkpoint`` with ``kwargs`` bound, optionally under ``save_on_cpu``."""
    return functools.partial(_checkpoint_offloaded if offload else _checkpoint, **kwargs)


def reentrancy_of(function: Callable[..., Any]) -> Optional[bool]:
    """The ``use_reentrant`` a checkpoint function will pass to torch, when it can be read off a partial."""
    keywords = getattr(function, "keywords", None)
    if isinstance(keywords, dict) and "use_reentrant" in keywords:
        return bool(keywords["use_reentrant"])
    return None


def without_context_fn(kwargs: Any) -> dict:
    """Checkpoint kwargs without ``context_fn``, which selective recompute adds (an option of its own)."""
    return {name: value for name, value in (kwargs or {}).items() if name != "context_fn"}


# ------------------------------------------------------------------------------------------- resolving


def resolve(model: torch.nn.Module, request: CheckpointRequest, stacklevel: int) -> CheckpointSettings:
    """The settings for ``request`` (gaps already filled from the model's defaults) on ``model``.

    A request without ``use_reentrant`` gets non-reentrant checkpointing, unless the model has layers whose
    activations only reentrant checkpointing frees (bitsandbytes 8-bit).
    """
    kwargs = dict(request.kwargs) if request.kwargs is not None else {}
    if "use_reentrant" not in kwargs:  # a dict without it expresses no preference on the mode
        kwargs["use_reentrant"] = engine_hooks().non_reentrant_keeps_activations(model)
    elif kwargs["use_reentrant"] is False:
        _warn_if_non_reentrant_keeps_activations(model, stacklevel + 1)
    offload = bool(request.offload)
    selective = bool(request.selective) and _add_selective_context(model, kwargs, stacklevel + 1)
    return CheckpointSettings(
        function=build_checkpoint_function(kwargs, offload),
        use_reentrant=bool(kwargs["use_reentrant"]),
        every_n_layers=request.every_n_layers or 1,
        offload=offload,
        kwargs=kwargs,
        memory_budget=request.memory_budget,
        selective=selective,
    )


def settings_of_function(function: Callable[..., Any], every_n_layers: int) -> CheckpointSettings:
    """The settings of a checkpoint function given as it is (``_set_gradient_checkpointing(enable=True, f)``)."""
    return CheckpointSettings(function, reentrancy_of(function), every_n_layers, False, None)


def _add_selective_context(model: torch.nn.Module, kwargs: dict, stacklevel: int) -> bool:
    """Adds selective recompute's ``context_fn`` to ``kwargs`` where it can work; warns where it cannot."""
    context = None if kwargs["use_reentrant"] else speed_hooks().selective_context()
    if context is None:
        why = "the reentrant checkpoint was asked for" if kwargs["use_reentrant"] else speed_hooks().selective_unavailable()
        warnings.warn(
            f"selective recompute cannot be used on {type(model).__qualname__}: {why} (it needs the non-reentrant "
            "checkpoint of torch >= 2.5); checkpointed blocks are recomputed whole.",
            CompatWarning,
            stacklevel=stacklevel,
        )
        return False
    kwargs["context_fn"] = context
    return True


def _warn_if_non_reentrant_keeps_activations(model: torch.nn.Module, stacklevel: int) -> None:
    if not engine_hooks().non_reentrant_keeps_activations(model) or not state_of(model).warn_once("int8"):
        return
    warnings.warn(
        f"{type(model).__qualname__} has bitsandbytes 8-bit layers, which keep their inputs on their autograd "
        "context where non-reentrant checkpointing cannot free them: use_reentrant=False is honoured, but saves "
        "little memory (Qwen-7B, seq 1024: 19.6 GB peak against 15.4 GB reentrant). Pass "
        "gradient_checkpointing_kwargs={'use_reentrant': True} (or no use_reentrant at all: the library then picks "
        "reentrant for 8-bit models and makes the input embeddings require grad, so LoRA still gets gradients).",
        CompatWarning,
        stacklevel=stacklevel,
    )

