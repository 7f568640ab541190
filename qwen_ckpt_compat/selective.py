"""Selective recompute: a checkpointed block keeps its attention output and recomputes everything else.

Full checkpointing saves a block's input and reruns the whole block in the backward pass. At long sequences
the attention kernel is the slowest part of that rerun, while its output is small (one hidden state and a
log-sum-exp per head and position: about 68 MB per Qwen-7B block at 8,192 tokens, against about 2 GB for all of
the block's activations). Selective recompute keeps exactly those outputs, with torch's selective activation
checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``, torch >= 2.5), passed to the
non-reentrant checkpoint as its ``context_fn``.

The matmuls are recomputed: their outputs (the LoRA layers' included) are what makes a block's activations
large, so saving them would give back most of what checkpointing saves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it

from .errors import UnsupportedTorchError

__all__ = [
    "SAVED_OP_NAMES",
    "require_selective_checkpointing",
    "saved_ops",
    "selective_checkpointing_available",
    "selective_context_fn",
]

#: The aten operators whose outputs selective recompute keeps: every fused attention kernel that
#: ``torch.nn.functional.scaled_dot_product_attention`` dispatches to (the names that exist in the installed
#: torch are used). The unfused "math" fallback decomposes into matmuls and a softmax, whose outputs grow with
#: the square of the sequence length: it is recomputed.
SAVED_OP_NAMES: tuple[str, ...] = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)

_API = "torch.utils.checkpoint.create_selective_checkpoint_contexts"


def selective_checkpointing_available() -> bool:
    """Whether the installed torch has selective activation checkpointing (torch >= 2.5; 2.4 has a private form only)."""
    return callable(getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None))


def require_selective_checkpointing() -> None:
    """Raises `UnsupportedTorchError` when the installed torch has no selective activation checkpointing."""
    if not selective_checkpointing_available():
        raise UnsupportedTorchError(
            f"selective recompute needs torch >= 2.5 ({_API}); torch {torch.__version__} is installed. "
            "Upgrade torch, or use memory_budget= / every_n_layers= to recompute fewer blocks instead."
        )


def saved_ops() -> tuple[Any, ...]:
    """The ``torch.ops.aten`` overloads of :data:`SAVED_OP_NAMES` that the installed torch has."""
    found = []
    for name in SAVED_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        overload = getattr(packet, "default", None) if packet is not None else None
        if overload is not None:
            found.append(overload)
    return tuple(found)


def selective_context_fn() -> Callable[[], Any]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that keeps the outputs
    of :func:`saved_ops` and recomputes every other operator.

    Raises:
        `UnsupportedTorchError` (a `RuntimeError`): torch < 2.5.
    """
    require_selective_checkpointing()
    return functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, list(saved_ops()))
