"""FSDP: the ``FullyShardedDataParallel`` wrapper (FSDP1), ``fully_shard`` (FSDP2) and torch's ``checkpoint_wrapper``.

* **FSDP1** wraps each block in a ``FullyShardedDataParallel`` module whose ``forward`` unshards, casts and then
  calls the block: the block's own ``__call__``, where the routing checkpoints, sits inside all of that.
* **FSDP2** (``fully_shard``, what transformers 5.x's ``Trainer`` uses) keeps the block and swaps its class for
  ``FSDP<Name>(FSDPModule, <Name>)``. Its forward pre-hook casts floating inputs to the mixed-precision
  ``param_dtype``; when the block's forward is recomputed during backward, some torch releases (2.11, measured
  on a GPU) skip that cast, while 2.13 does it. Checkpointing around ``__call__`` then saves float32 inputs (Qwen v1's rotary cos/sin) in the forward
  and recomputes with different dtypes: ``CheckpointError: ... different metadata``. So FSDP2 blocks checkpoint
  their ``forward``, inside the hooks, as torch's ``checkpoint_wrapper`` under ``fully_shard`` does.
* FSDP's own ``activation_checkpointing`` wraps blocks in torch's ``CheckpointWrapper``
  (``_checkpoint_wrapped_module``, ``checkpoint_fn``); the routing steps aside for blocks it covers.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from ._imported import loaded_class

__all__ = ["checkpoint_wrapped_modules", "has_input_casting_hooks", "original_class", "wrapped_module"]

# torch's CheckpointWrapper keeps the module it checkpoints under this attribute (and the function in checkpoint_fn).
_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def _fsdp2_class() -> Optional[type]:
    # `FSDPModule` is public in torch.distributed.fsdp from torch 2.6; torch 2.4-2.5 keep it under _composable.
    # Looked up in imported modules only: a model can only have been sharded if one of them is imported.
    for module in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        found = loaded_class(module, "FSDPModule")
        if found is not None:
            return found
    return None


def wrapped_module(obj: Any) -> Optional[torch.nn.Module]:
    """The module inside an FSDP1 ``FullyShardedDataParallel`` wrapper, else ``None``."""
    fsdp1 = loaded_class("torch.distributed.fsdp", "FullyShardedDataParallel")
    if fsdp1 is not None and isinstance(obj, fsdp1):
        return obj.module
    return None


def original_class(cls: type) -> type:
    """The class ``fully_shard`` replaced (``QWenBlock`` for ``FSDPQWenBlock``); ``cls`` when none was."""
    fsdp2 = _fsdp2_class()
    while fsdp2 is not None and issubclass(cls, fsdp2) and cls is not fsdp2:
        bases = [base for base in cls.__bases__ if not issubclass(base, fsdp2)]
        if len(bases) != 1:
            break
        cls = bases[0]
    return cls


def has_input_casting_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` is managed by FSDP2, whose forward pre-hook may change its inputs."""
    fsdp2 = _fsdp2_class()
    return fsdp2 is not None and isinstance(module, fsdp2)


def checkpoint_wrapped_modules(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Modules under ``root`` held by torch's ``CheckpointWrapper`` (FSDP's ``activation_checkpointing``)."""
    for module in root.modules():
        inner = module._modules.get(_CHECKPOINT_WRAPPED)
        if inner is not None and callable(getattr(module, "checkpoint_fn", None)):
            yield inner
