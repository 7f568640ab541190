"""Routes each decoder block of an old remote-code model through the caller's checkpoint function.

Old remote code (Qwen v1 and its era) calls ``torch.utils.checkpoint.checkpoint`` itself, so the function
transformers builds from the user's kwargs never reaches it. Here the remote model's own checkpointing flag
stays off, so its forward takes the plain path, and each decoder block checkpoints itself in ``__call__``,
the way transformers' native ``GradientCheckpointingLayer`` does:

* a block runs ``_gradient_checkpointing_func(partial(block.__call__, **kwargs), *args)`` when its
  ``gradient_checkpointing`` flag is set, it is training and grad mode is on;
* the module that owns the blocks (``QWenModel``) gets ``use_cache=False`` while routing is on, it is
  training and grad mode is on, the duty its forward performs when checkpointing itself (without grad
  nothing is checkpointed, so generation in training mode keeps its KV cache);
* a block whose engine prepares its inputs in forward pre-hooks (FSDP2 casts them to the mixed-precision
  dtype) checkpoints its ``forward`` instead, inside those hooks, so that the recompute sees the same inputs;
* a block that an engine's own activation checkpointing already wraps (FSDP's ``activation_checkpointing``)
  is left to it, with a warning: no block is checkpointed twice.

The ``__call__`` wrappers are installed once per class by :mod:`qwen_ckpt_compat.patching`; the per-instance
state lives in the module attributes named below (``FLAG`` and ``FUNC`` have the same names and meaning as on
native layers).
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.autograd.graph
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it

from . import engines
from .errors import CompatWarning
from .versions import SAVE_ON_CPU_DEVICE_TYPE_RELEASE, installed_version, save_on_cpu_takes_device_type

__all__ = ["CheckpointSettings", "build_checkpoint_function", "route", "route_blocks", "unroute", "clear"]

logger = logging.getLogger(__name__)

FLAG = "gradient_checkpointing"
FUNC = "_gradient_checkpointing_func"
OWNER_FLAG = "_qcc_routes_checkpointing"
INPUT_GRADS_HOOK = "_qcc_input_grads_hook"
_WARNED_CACHE = "_qcc_warned_use_cache"
_SAVED = "_qcc_saved_attributes"  # what a block had under FLAG/FUNC before it was first routed
PLANNER = "_qcc_planner"  # on the first block: the memory-budget planner to call before each training forward
BUDGET = "_qcc_budget_planner"  # on the model: that planner, kept (with its plans) while checkpointing is off
_CHECKPOINT_FORWARD = "_qcc_checkpoint_forward"  # set by __call__ for the forward inside an engine's hooks
_ENGINE_CHECKPOINTS = "_qcc_engine_checkpoints"  # an engine's own activation checkpointing wraps this block
_WARNED_ENGINE = "_qcc_warned_engine_checkpoints"


@dataclass(frozen=True)
class CheckpointSettings:
    """How a model checkpoints its blocks.

    Attributes:
        function (`Callable`): the checkpoint function, called as ``function(run, *tensors)``.
        use_reentrant (`bool`, *optional*): the mode it runs in; ``None`` when it cannot be known (a custom
            function), which is treated as reentrant for the sake of input gradients.
        every_n_layers (`int`): checkpoint blocks ``0, n, 2n, ...`` and keep the activations of the others.
        offload (`bool`): the saved block inputs live in (pinned) host memory.
        kwargs (`dict`): the kwargs given to ``torch.utils.checkpoint.checkpoint``, for display.
        memory_budget (`int`, *optional*): bytes; which blocks are checkpointed is then planned during training
            (see :mod:`qwen_ckpt_compat.budget` and ``memory_plan(model)``).
        selective (`bool`): checkpointed blocks keep their attention and projection outputs (``kwargs["context_fn"]``).
    """

    function: Callable[..., Any]
    use_reentrant: Optional[bool]
    every_n_layers: int = 1
    offload: bool = False
    kwargs: Optional[dict] = None
    memory_budget: Optional[int] = None
    selective: bool = False


def _offload_device_type() -> Optional[str]:
    """The accelerator whose memory offloading frees, or ``None`` on a host without one."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is not None:
        return current.type
    return "cuda" if torch.cuda.is_available() else None


def _save_on_cpu_options() -> dict:
    """What ``save_on_cpu`` gets: pinned host memory for the accelerator, as far as the installed torch can."""
    device_type = _offload_device_type()
    if device_type is None:
        # Without an accelerator the tensors already live on the host: nothing is copied or pinned.
        return {"pin_memory": False}
    if save_on_cpu_takes_device_type():
        return {"pin_memory": True, "device_type": device_type}
    if device_type == "cuda":
        return {"pin_memory": True}  # what an older save_on_cpu pins for
    warnings.warn(
        f"offload=True: pinned host memory for {device_type!r} needs torch >= {SAVE_ON_CPU_DEVICE_TYPE_RELEASE} "
        f"(torch.autograd.graph.save_on_cpu(device_type=...)); torch {installed_version('torch')} pins for CUDA "
        "only, so the saved block inputs go to ordinary (unpinned) host memory, which copies back more slowly.",
        CompatWarning,
        stacklevel=2,
    )
    return {"pin_memory": False}


def _checkpoint_offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # Looked up at call time, so that tests (and users) can observe or replace them.
    with torch.autograd.graph.save_on_cpu(**_save_on_cpu_options()):
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def _checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def build_checkpoint_function(kwargs: dict, offload: bool = False) -> Callable[..., Any]:
    """``torch.utils.checkpoint.checkpoint`` with ``kwargs`` bound, optionally under ``save_on_cpu``."""
    return functools.partial(_checkpoint_offloaded if offload else _checkpoint, **kwargs)


def reentrancy_of(function: Callable[..., Any]) -> Optional[bool]:
    """The ``use_reentrant`` a checkpoint function will pass to torch, when it can be read off a partial."""
    keywords = getattr(function, "keywords", None)
    if isinstance(keywords, dict) and "use_reentrant" in keywords:
        return bool(keywords["use_reentrant"])
    return None


# --------------------------------------------------------------------------------------------- wrappers


def checkpointed_block_call(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for a decoder block's ``__call__``: checkpoint it when its flag says so."""
    state = instance.__dict__
    planner = state.get(PLANNER)
    if planner is not None and instance.training and torch.is_grad_enabled():
        planner.before_first_block(instance, wrapped, args, kwargs)  # may re-flag every block
    if not (state.get(FLAG) and instance.training and torch.is_grad_enabled()) or state.get(_ENGINE_CHECKPOINTS):
        return wrapped(*args, **kwargs)
    if not _gradient_can_flow(instance, args, kwargs):
        return wrapped(*args, **kwargs)  # nothing would be saved for a backward pass: nothing to recompute
    if engines.checkpoints_inside_hooks(instance):
        # The hooks run first and `checkpointed_block_forward` checkpoints what they hand to `forward`.
        state[_CHECKPOINT_FORWARD] = True
        try:
            return wrapped(*args, **kwargs)
        finally:
            state.pop(_CHECKPOINT_FORWARD, None)
    # Keyword arguments are bound here: the reentrant variant of torch's checkpoint takes positional tensors
    # only, and gradients flow through those (the hidden states come first).
    return state[FUNC](functools.partial(wrapped, **kwargs), *args)


def _gradient_can_flow(block: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a gradient can flow through this call: a parameter of the block or a tensor input requires one.

    A frozen block fed with inputs that need no gradient (a frozen vision tower) keeps no activations for the
    backward pass, so checkpointing it would only run it twice for nothing (and torch's reentrant variant warns).
    A block whose parameters are not visible on it (an engine holds them flattened) is assumed to need one.
    """
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
        return True
    parameters = list(block.parameters())
    return not parameters or any(parameter.requires_grad for parameter in parameters)


def checkpointed_block_forward(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for a decoder block's ``forward``: checkpoints it when ``__call__`` asked for that."""
    if not instance.__dict__.pop(_CHECKPOINT_FORWARD, False):
        return wrapped(*args, **kwargs)
    return instance.__dict__[FUNC](functools.partial(wrapped, **kwargs), *args)


@functools.lru_cache(maxsize=None)
def _use_cache_position(forward: Callable) -> Optional[int]:
    try:
        parameters = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return None
    return parameters.index("use_cache") - 1 if "use_cache" in parameters else None  # minus `self`


def owner_call(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for the block owner's ``__call__``: no KV cache while its blocks are checkpointed.

    Without grad (``generate``, ``model.chat()``, evaluation under ``torch.no_grad()``) no block checkpoints,
    so the cache is kept even in training mode: otherwise every new token would recompute the whole prefix.
    """
    if not (instance.__dict__.get(OWNER_FLAG) and instance.training and torch.is_grad_enabled()):
        return wrapped(*args, **kwargs)
    _leave_blocks_to_engine_checkpointing(instance)
    position = _use_cache_position(type(instance).forward)
    if position is not None and position < len(args):
        requested = args[position]
        args = args[:position] + (False,) + args[position + 1 :]
    else:
        requested = kwargs.get("use_cache")
        kwargs = {**kwargs, "use_cache": False}
    if requested is None:
        requested = getattr(getattr(instance, "config", None), "use_cache", False)
    if requested and not instance.__dict__.get(_WARNED_CACHE):
        instance.__dict__[_WARNED_CACHE] = True
        logger.warning("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
    return wrapped(*args, **kwargs)


def _leave_blocks_to_engine_checkpointing(owner: torch.nn.Module) -> None:
    """Marks the routed blocks that an engine's own activation checkpointing wraps, and warns once."""
    covered = [block for block in engines.outer_checkpointed_blocks(owner) if block.__dict__.get(FLAG)]
    for block in covered:
        block.__dict__[_ENGINE_CHECKPOINTS] = True
    if covered and not owner.__dict__.get(_WARNED_ENGINE):
        owner.__dict__[_WARNED_ENGINE] = True
        warnings.warn(
            f"{len(covered)} decoder block(s) of {type(owner).__qualname__} are already checkpointed by the "
            "training engine (torch's checkpoint_wrapper, as FSDP's `activation_checkpointing` applies it); "
            "the engine's checkpointing wins for those blocks and qwen-ckpt-compat does not checkpoint them a "
            "second time. To have qwen-ckpt-compat checkpoint them instead (honouring use_reentrant, "
            "every_n_layers and offload), turn the engine's activation checkpointing off.",
            CompatWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------------------------------ per model


def without_context_fn(kwargs: Any) -> dict:
    """Checkpoint kwargs without ``context_fn``, which selective recompute adds (an option of its own)."""
    return {name: value for name, value in (kwargs or {}).items() if name != "context_fn"}


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
        _set_input_grads(model, False)
    output.requires_grad_(True)


def _set_input_grads(model: Any, wanted: bool) -> None:
    """Adds (once) or removes this library's input-embedding hook.

    A hook that transformers or peft added (``_require_grads_hook``) already does the job: ours goes then, or at
    its next run when theirs came later.
    """
    theirs = has_live_input_grads_hook(model)
    handle = model.__dict__.get(INPUT_GRADS_HOOK)
    if not wanted or theirs:
        if handle is not None:
            handle.remove()
            del model.__dict__[INPUT_GRADS_HOOK]
        return
    if handle is not None:
        return
    embeddings = model.get_input_embeddings()
    hook = functools.partial(_make_inputs_require_grad, weakref.ref(model))
    model.__dict__[INPUT_GRADS_HOOK] = embeddings.register_forward_hook(hook)


def route(
    model: torch.nn.Module,
    owners: list[torch.nn.Module],
    blocks: list[torch.nn.Module],
    settings: CheckpointSettings,
) -> None:
    """Turns routed checkpointing on for ``blocks`` (in model order), with ``settings``."""
    for owner in owners:
        owner.__dict__[FLAG] = False  # the remote forward must not call torch's checkpoint itself
        owner.__dict__[OWNER_FLAG] = True
    route_blocks(blocks, settings)
    if settings.memory_budget is not None and blocks:
        from .budget import attach

        attach(model, blocks, settings)  # sets each block's flag and function from its plan
    else:
        _detach_planner(model, blocks, forget=True)
    # Reentrant checkpointing only propagates gradients to inputs that require them; with a frozen base the
    # embeddings' output does not, so LoRA weights inside the blocks would get none.
    _set_input_grads(model, settings.use_reentrant is not False)


def route_blocks(blocks: list[torch.nn.Module], settings: CheckpointSettings) -> None:
    """Flags ``blocks`` (in model order) to checkpoint through ``settings``: every ``every_n_layers``-th one.

    :func:`route` does it for the decoder blocks; a family's extra blocks (Qwen-VL's vision transformer) are
    flagged alone, counted on their own and outside any memory-budget plan.
    """
    every = max(1, int(settings.every_n_layers))
    for index, block in enumerate(blocks):
        block.__dict__.setdefault(_SAVED, {name: block.__dict__[name] for name in (FLAG, FUNC) if name in block.__dict__})
        block.__dict__[FUNC] = settings.function
        block.__dict__[FLAG] = index % every == 0


def unroute(model: torch.nn.Module, owners: list[torch.nn.Module], blocks: list[torch.nn.Module]) -> None:
    """Turns routed checkpointing off: the blocks run their plain forward again."""
    for owner in owners:
        owner.__dict__[OWNER_FLAG] = False
    for block in blocks:
        block.__dict__[FLAG] = False
    _detach_planner(model, blocks, forget=False)  # the plans stay for a later re-enable (Trainer's)
    _set_input_grads(model, False)


def _detach_planner(model: torch.nn.Module, blocks: list[torch.nn.Module], forget: bool) -> None:
    for block in blocks:
        block.__dict__.pop(PLANNER, None)
    if forget:
        model.__dict__.pop(BUDGET, None)


def clear(model: torch.nn.Module) -> None:
    """Removes every attribute and hook this module put on ``model`` and its submodules."""
    _set_input_grads(model, False)
    for module in model.modules():
        for name in (OWNER_FLAG, _WARNED_CACHE, _WARNED_ENGINE, _ENGINE_CHECKPOINTS, _CHECKPOINT_FORWARD, PLANNER, BUDGET):
            module.__dict__.pop(name, None)
        if _SAVED in module.__dict__:
            saved = module.__dict__.pop(_SAVED)
            module.__dict__.pop(FLAG, None)
            module.__dict__.pop(FUNC, None)
            module.__dict__.update(saved)
