"""torch's own wrappers: ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile``'s ``OptimizedModule``."""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch

__all__ = ["wrapped_module"]


def wrapped_module(obj: Any) -> Optional[torch.nn.Module]:
    """The module inside a DDP / DataParallel / compiled wrapper, else ``None``."""
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return obj.module
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is not None and isinstance(obj, optimized):
        return obj._orig_mod
    return None
