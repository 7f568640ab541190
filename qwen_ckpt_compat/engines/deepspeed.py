"""DeepSpeed: ``deepspeed.initialize`` (and ``TrainingArguments(deepspeed=...)``) hand back a ``DeepSpeedEngine``.

ZeRO-2 and ZeRO-3 need nothing else from the library: ZeRO-3's parameter fetching runs in forward pre-hooks of
every submodule, which a block's recompute calls again (the routing checkpoints around ``__call__``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._imported import loaded_class

__all__ = ["wrapped_module"]


def wrapped_module(obj: Any) -> Optional[torch.nn.Module]:
    """The model inside a ``DeepSpeedEngine`` (its ``module``), else ``None``."""
    engine = loaded_class("deepspeed", "DeepSpeedEngine")
    if engine is not None and isinstance(obj, engine):
        return obj.module
    return None
