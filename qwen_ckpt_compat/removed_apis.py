"""Replacements for transformers APIs that old remote code calls and that transformers has removed.

Each replacement keeps the old semantics and is installed, only where the class lacks the API (detected on
the class, not by version), on the remote-code base class of a loaded model: never on transformers' own
classes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["REPLACEMENTS", "restore_removed_apis"]


def get_head_mask(
    self: Any, head_mask: Optional[torch.Tensor], num_hidden_layers: int, is_attention_chunked: bool = False
) -> Any:
    """Removed in transformers 5.0. Per-layer head masks: a list of ``None`` without a mask, else a 5-D tensor.

    ``head_mask`` of shape ``[num_heads]`` (the same for every layer) or ``[num_hidden_layers, num_heads]``
    becomes ``[num_hidden_layers, batch=1, num_heads, 1, 1]`` in the model's dtype (with a trailing axis when
    ``is_attention_chunked``); 1.0 keeps a head, 0.0 masks it.
    """
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if head_mask.dim() != 5:
        raise ValueError(f"head_mask must have 1 or 2 dimensions (or already 5), got shape {tuple(head_mask.shape)}")
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


#: name -> replacement, installed where the class does not have the name.
REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "get_head_mask": get_head_mask,
}


def _remote_base(cls: type) -> type:
    """The outermost remote-code class in ``cls``'s MRO (e.g. ``QWenPreTrainedModel``)."""
    remote = [k for k in cls.__mro__ if k.__module__.startswith("transformers_modules.")]
    return remote[-1] if remote else cls


def restore_removed_apis(cls: type) -> list[str]:
    """Installs the missing replacements on ``cls``'s remote base class; returns the names installed."""
    base = _remote_base(cls)
    installed = []
    for name, function in REPLACEMENTS.items():
        if not hasattr(base, name):
            setattr(base, name, function)
            installed.append(name)
    return installed
