"""torch's own wrappers: ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile``'s ``OptimizedModule``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._imported import loaded_class

__all__ = ["wrapped_module"]


def wrapped_module(obj: Any) -> Optional[torch.nn.Module]:
    """The module inside a DDP / DataParallel / compiled wrapper, else ``None``."""
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return obj.module
    optimized = loaded_class("torch._dynamo.eval_frame", "OptimizedModule")
    if optimized is not None and isinstance(obj, optimized):
        return obj._orig_mod
    return None
