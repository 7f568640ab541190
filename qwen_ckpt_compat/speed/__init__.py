"""The speed wing: options that trade memory for time, plugged into the core's checkpoint layer.

* :mod:`.budget`: ``memory_budget=`` plans which decoder blocks to checkpoint from measurements;
* :mod:`.selective`: ``selective=True`` keeps the outputs of a checkpointed block's expensive operators;
* :mod:`.attention`: ``fused_attention`` (on by default) lets Qwen v1's attention use SDPA's fused causal kernel;
* :mod:`.loss`: ``chunked_loss=`` computes the LM head and the cross-entropy by chunks of tokens.

The core never imports this package: it asks :class:`qwen_ckpt_compat._hooks.SpeedHooks`, which this package
fills in when it is imported (the package ``__init__`` names it among the wings).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import _hooks
from . import attention, budget, loss, selective

__all__ = ["attention", "budget", "loss", "selective"]


class _Speed(_hooks.SpeedHooks):
    """The core's questions about the speed options, answered by this wing."""

    def validate(self, model: Any, memory_budget: Any, selective_recompute: bool) -> Optional[int]:
        budget_bytes = None
        if memory_budget is not None:
            budget_bytes = budget.parse_memory_budget(memory_budget)
            budget.check_budget(model, budget_bytes)
        if selective_recompute:
            selective.require_selective_checkpointing()
        return budget_bytes

    def selective_available(self) -> bool:
        return selective.selective_checkpointing_available()

    def attention_class_names(self) -> tuple:
        return attention.ATTENTION_CLASS_NAMES

    def selective_context(self) -> Optional[Callable[..., Any]]:
        return selective.SelectiveRecompute() if selective.selective_checkpointing_available() else None

    def selective_unavailable(self) -> str:
        return f"torch {torch.__version__} < 2.5"

    def plan_blocks(self, model: Any, blocks: list, settings: Any) -> None:
        if blocks and settings.memory_budget is not None:
            budget.attach(model, blocks, settings)  # the budget's plan decides selective recompute too
        elif blocks and settings.selective:
            selective.attach(model, blocks, settings)
        else:
            budget.detach(model, blocks, forget=True)

    def stop_planning(self, model: Any, blocks: list, forget: bool) -> None:
        budget.detach(model, blocks, forget)

    def set_fused_attention(
        self, model: Any, mode: Optional[str], wrap: Callable[[type, str, Callable], None]
    ) -> int:
        return attention.set_fused_attention(model, mode, wrap)

    def set_chunked_loss(
        self, model: Any, tokens: Optional[int], keep_logits: bool, wrap: Callable[[type, str, Callable], None]
    ) -> bool:
        return loss.set_chunked_loss(model, tokens, keep_logits, wrap)


_hooks.set_speed_hooks(_Speed())
