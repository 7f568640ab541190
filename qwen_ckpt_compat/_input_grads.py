"""Input gradients for reentrant checkpointing with a frozen base model.

Reentrant checkpointing only propagates gradients to inputs that require them; with a frozen base (LoRA) the
embeddings' output does not, so LoRA weights inside the blocks would get none. transformers' and peft's
``enable_input_require_grads()`` add a forward hook on the input embeddings for that; this library adds its own
(one it can remove again when checkpointing is turned off, without touching the user's), and only where none of
theirs is in place.

Both copy and pickle with the model: ours is a small object that follows the model into its copy, and the hook
transformers' ``enable_input_require_grads()`` registers (a function local to that method, which ``pickle``
refuses) is replaced on the patched classes by the module-level :func:`inputs_require_grad`, which does the same.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from ._model_state import existing_state, state_of

__all__ = ["has_live_input_grads_hook", "inputs_require_grad", "picklable_input_grads_hooks", "set_input_grads"]


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


class _MakeInputsRequireGrad:
    """This library's input-embedding hook: marks the output as requiring grad; leaves when theirs is in place.

    It holds its model weakly (the model holds it). A deep copy of the model gets a hook of its own, which serves
    the copy; a pickled model is stored with its hook.
    """

    def __init__(self, model: Any) -> None:
        self._model = weakref.ref(model) if model is not None else None

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        model = self._model() if self._model is not None else None
        if model is not None and has_live_input_grads_hook(model):
            # Added since ours (peft, or a tutorial's own `enable_input_require_grads()`): one hook is enough.
            set_input_grads(model, False)
        output.requires_grad_(True)

    def __deepcopy__(self, memo: dict) -> "_MakeInputsRequireGrad":
        model = self._model() if self._model is not None else None
        # The copy of the model when it is being copied; a copy of the embeddings alone serves no model.
        return type(self)(memo.get(id(model)) if model is not None else None)

    def __reduce__(self) -> tuple:
        return type(self), (self._model() if self._model is not None else None,)


def inputs_require_grad(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """The forward hook of transformers' ``enable_input_require_grads()``, defined where ``pickle`` can find it."""
    output.requires_grad_(True)


def picklable_input_grads_hooks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``enable_input_require_grads``: its hooks become :func:`inputs_require_grad`.

    transformers registers a function defined inside the method, which neither ``pickle`` nor a process that
    unpickles the model can find; peft calls the method on every model with checkpointing on.
    """
    result = wrapped(*args, **kwargs)
    handles = getattr(instance, "_require_grads_hooks", None) or [getattr(instance, "_require_grads_hook", None)]
    for handle in handles:
        hooks = handle.hooks_dict_ref() if hasattr(handle, "hooks_dict_ref") else None
        if hooks is None:
            continue
        if getattr(hooks.get(handle.id), "__qualname__", "").endswith("<locals>.make_inputs_require_grads"):
            hooks[handle.id] = inputs_require_grad
    return result


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
        state.input_grads_hook = model.get_input_embeddings().register_forward_hook(_MakeInputsRequireGrad(model))
