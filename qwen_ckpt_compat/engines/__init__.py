"""What training engines do to a model, asked in one place.

What engines do to a model comes in four kinds, and the rest of the library only needs four answers:

* **A wrapper around it** (DDP, ``DataParallel``, FSDP1's ``FullyShardedDataParallel``, the DeepSpeed engine,
  ``torch.compile``'s ``OptimizedModule``; accelerate's ``prepare`` returns one of these): :func:`unwrap_engines`
  gives the module inside.
* **The same object with a new class** (FSDP2's ``fully_shard`` swaps ``QWenBlock`` for ``FSDPQWenBlock``, a
  subclass of ``FSDPModule`` and the original class): :func:`own_class` gives the class the model defined.
* **Layers whose activations non-reentrant checkpointing cannot free** (bitsandbytes 8-bit):
  :func:`non_reentrant_keeps_activations` makes reentrant checkpointing their default, and a warning says so
  when non-reentrant is asked for.
* **Hooks on a block** that prepare its inputs before ``forward`` (FSDP2 casts floating inputs to the
  mixed-precision dtype in its forward pre-hook): :func:`checkpoints_inside_hooks` tells the routing to
  checkpoint ``forward`` inside those hooks, so that the recompute sees the inputs the forward saw. And an
  engine's own activation checkpointing around a block (torch's ``checkpoint_wrapper``, which FSDP's
  ``activation_checkpointing`` applies): :func:`outer_checkpointed_blocks` finds the blocks it already covers.

Each engine has a module of its own (:mod:`.torch_parallel`, :mod:`.fsdp`, :mod:`.deepspeed`,
:mod:`.bitsandbytes`); each recognises
its objects with ``isinstance`` against the engine's own classes, looked up only in modules that are already
imported (an object cannot be an instance of a class that was never imported), or by the attributes the
engine's public API documents. Nothing here imports an engine.

This wing plugs into the core through :class:`qwen_ckpt_compat._hooks.EngineHooks`: the core asks its five
questions there and never imports this package.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch

from .. import _hooks
from . import bitsandbytes, deepspeed, fsdp, torch_parallel

__all__ = [
    "checkpoints_inside_hooks",
    "non_reentrant_keeps_activations",
    "outer_checkpointed_blocks",
    "own_class",
    "unwrap_engines",
]

# Each returns the module an engine object wraps, or None when the object is not that engine's wrapper.
_UNWRAPPERS: tuple[Callable[[Any], Optional[torch.nn.Module]], ...] = (
    torch_parallel.wrapped_module,
    fsdp.wrapped_module,
    deepspeed.wrapped_module,
)
_MAX_DEPTH = 8  # wrappers nest (a compiled DDP, say); never loop on a cycle


def unwrap_engines(obj: Any) -> Any:
    """Strips every engine wrapper around ``obj``; returns ``obj`` itself when it wears none."""
    for _ in range(_MAX_DEPTH):
        inner = next((found for unwrap in _UNWRAPPERS if (found := unwrap(obj)) is not None), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def own_class(model_or_class: Any) -> type:
    """The class the model's code defined, under any class an engine swapped in (FSDP2)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return fsdp.original_class(cls)


def checkpoints_inside_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` must checkpoint its ``forward`` inside its hooks rather than around ``__call__``."""
    return fsdp.has_input_casting_hooks(module)


def outer_checkpointed_blocks(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules under ``root`` that an engine's own activation checkpointing already wraps."""
    return fsdp.checkpoint_wrapped_modules(root)


def non_reentrant_keeps_activations(model: torch.nn.Module) -> bool:
    """Whether layers of ``model`` keep their inputs outside torch's saved-tensor hooks (bitsandbytes 8-bit)."""
    return bitsandbytes.has_int8_layers(model)


class _Engines(_hooks.EngineHooks):
    """The core's questions about engines, answered by this wing."""

    def unwrap(self, obj: Any) -> Any:
        return unwrap_engines(obj)

    def own_class(self, cls: type) -> type:
        return own_class(cls)

    def checkpoints_inside_hooks(self, module: Any) -> bool:
        return checkpoints_inside_hooks(module)

    def outer_checkpointed_blocks(self, root: Any) -> Iterator[Any]:
        return outer_checkpointed_blocks(root)

    def non_reentrant_keeps_activations(self, model: Any) -> bool:
        return non_reentrant_keeps_activations(model)


_hooks.set_engine_hooks(_Engines())
