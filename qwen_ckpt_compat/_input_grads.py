"""Input gradients for reentrant checkpointing with a frozen base model.

Reentrant checkpointing only propagates gradients to inputs that require them; with a frozen base (LoRA) the
embeddings' output does not, so LoRA weights inside the blocks would get none. transformers' and peft's
``enable_input_require_grads()`` add a forward hook on the input embeddings for that; this library adds its own
(one it can remove again when checkpointing is turned off, without touching the user's), and only where none of
theirs is in place.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from ._model_state import existing_state, state_of

__all__ = ["has_live_input_grads_hook", "set_input_grads"]


def has_live_input_grads_hook(model: Any) -> bool:
    """Whether the input-embedding hook of transformers' (or peft's) ``enable_input_require_grads()`` is in place.

    transformers 4.x's ``disable_input_require_grads()`` removes the hook but keeps the ``_require_grads_hook``
    attribute naming it, so the attribute alone does not say; the handle's hook dictionary does.
    """
    handle = getattr(model, "_require_grads_hook", None)
    if handle is None:
        return False
    registry = getattr(handle, "hooks_dict_ref", None)
    if registry is None:  # not a torch RemovableHandle: taken at its word
        return True
    hooks = registry()
    return hooks is not None and getattr(handle, "id", None) in hooks


def _make_inputs_require_grad(
    model_ref: weakref.ref, module: torch.nn.Module, inputs: Any, output: torch.Tensor
) -> None:
    model = model_ref()
    if model is not None and has_live_input_grads_hook(model):
        # Added since ours (peft, or a tutorial's own `enable_input_require_grads()`): one hook is enough.
        set_input_grads(model, False)
    output.requires_grad_(True)


def set_input_grads(model: Any, wanted: bool) -> None:
    """Adds (once) or removes this library's input-embedding hook.

    A hook that transformers or peft added (``_require_grads_hook``) already does the job: ours goes then, or at
    its next run when theirs came later.
    """
    existing = existing_state(model)
    if not wanted or has_live_input_grads_hook(model):
        if existing is not None and existing.input_grads_hook is not None:
            existing.input_grads_hook.remove()
            existing.input_grads_hook = None
        return
    state = state_of(model)
    if state.input_grads_hook is None:
        hook = functools.partial(_make_inputs_require_grad, weakref.ref(model))
        state.input_grads_hook = model.get_input_embeddings().register_forward_hook(hook)
