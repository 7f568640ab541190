"""bitsandbytes: 8-bit layers keep their inputs where non-reentrant checkpointing cannot free them.

``bitsandbytes.nn.Linear8bitLt`` (``load_in_8bit=True``) computes through an autograd function that stores its
input and the input's int8 copy as plain attributes of its autograd context (``ctx.tensors``), not through
``ctx.save_for_backward``. Non-reentrant checkpointing frees activations through torch's saved-tensor hooks, which
never see those: every 8-bit layer of every checkpointed block keeps its input until the backward pass, so
checkpointing saves little (measured on one H200, Qwen-7B shape, seq 1024, bitsandbytes 0.50.2: peak 19.56 GB
non-reentrant against 15.41 GB reentrant, and 17.90 GB for bf16 LoRA). Reentrant checkpointing runs the
block's forward under ``no_grad``, so no context is kept. 4-bit layers store only the weight: both modes are
equal there.
"""

from __future__ import annotations

from typing import Any

import torch

from ._imported import loaded_class

__all__ = ["has_int8_layers"]


def has_int8_layers(model: Any) -> bool:
    """Whether ``model`` holds bitsandbytes 8-bit linear layers (peft's LoRA wrappers around them included)."""
    int8 = loaded_class("bitsandbytes.nn", "Linear8bitLt")
    return isinstance(int8, type) and isinstance(model, torch.nn.Module) and any(isinstance(m, int8) for m in model.modules())
