"""The per-block checkpoint layer: each decoder block of an old remote-code model checkpoints itself.

Old remote code (Qwen v1 and its era) calls ``torch.utils.checkpoint.checkpoint`` itself, so the function
transformers builds from the user's kwargs never reaches it. Here the remote model's own checkpointing flag
stays off, so its forward takes the plain path, and each decoder block checkpoints itself in ``__call__``, the
contract of transformers' native ``GradientCheckpointingLayer`` (which cannot be reused: old remote blocks do not
inherit it, and it exists from 4.54 only):

* a block runs ``_gradient_checkpointing_func(partial(block.__call__, **kwargs), *args)`` when its
  ``gradient_checkpointing`` flag is set, it is training and grad mode is on;
* the module that owns the blocks (``QWenModel``) gets ``use_cache=False`` while routing is on, it is
  training and grad mode is on, the duty its forward performs when checkpointing itself (without grad
  nothing is checkpointed, so generation in training mode keeps its KV cache);
* a block whose engine prepares its inputs in forward pre-hooks (FSDP2 casts them to the mixed-precision
  dtype) checkpoints its ``forward`` instead, inside those hooks, so that the recompute sees the same inputs;
* a block that an engine's own activation checkpointing already wraps (FSDP's ``activation_checkpointing``)
  is left to it, with a warning: no block is checkpointed twice.

Engines are asked through :func:`qwen_ckpt_compat._hooks.engine_hooks`, a memory budget through
:func:`qwen_ckpt_compat._hooks.speed_hooks` (its planner runs before the first block of each training forward).
The ``__call__`` wrappers are installed once per class by :mod:`qwen_ckpt_compat._class_patch`; the per-instance
state is the module's :class:`~qwen_ckpt_compat._model_state.State` and the two attributes native layers carry
(``FLAG`` and ``FUNC``, same names and meaning).
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from typing import Any, Callable, Optional

import torch

from ._hooks import engine_hooks, speed_hooks
from ._input_grads import set_input_grads
from ._model_state import existing_state, state_of
from ._settings import CheckpointSettings
from .errors import CompatWarning

__all__ = [
    "FLAG",
    "FUNC",
    "checkpointed_block_call",
    "checkpointed_block_forward",
    "clear",
    "compiling",
    "owner_call",
    "route",
    "route_blocks",
    "unroute",
]

logger = logging.getLogger(__name__)

FLAG = "gradient_checkpointing"
FUNC = "_gradient_checkpointing_func"


# --------------------------------------------------------------------------------------------- wrappers

_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch 2.3+
# Under torch.compile a block is checkpointed in its `forward`, not its `__call__`: torch 2.5's dynamo traces a
# module's `_call_impl` and never sees a `__call__` its class defines (2.13's sees both). torch 2.1's dynamo
# cannot trace that `forward` checkpoint (its `__call__` one it can). Measured on 2.1.1, 2.5.1 and 2.13 (2026-12-03).
_COMPILED_IN_FORWARD = tuple(int(part) for part in torch.__version__.split(".")[:2] if part.isdigit()) >= (2, 2)


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the current call.

    Code that only logs, or that reads tensor data to choose a path, steps aside there: either one breaks the
    graph, and a break inside a checkpointed block makes the compiled model keep every activation.
    """
    return _IS_COMPILING is not None and _IS_COMPILING()


def checkpointed_block_call(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for a decoder block's ``__call__``: checkpoint it when its flag says so."""
    state = existing_state(instance)
    training = instance.training and torch.is_grad_enabled()
    if state is not None and state.before_blocks is not None and training:
        state.before_blocks(instance, wrapped, args, kwargs)  # may re-flag every block
    if (_COMPILED_IN_FORWARD and compiling()) or not _checkpoints(instance, state, training, args, kwargs):
        return wrapped(*args, **kwargs)
    if engine_hooks().checkpoints_inside_hooks(instance):
        # The hooks run first and `checkpointed_block_forward` checkpoints what they hand to `forward`.
        state = state_of(instance)
        state.checkpoint_forward = True
        try:
            return wrapped(*args, **kwargs)
        finally:
            state.checkpoint_forward = False
    # Keyword arguments are bound here: the reentrant variant of torch's checkpoint takes positional tensors
    # only, and gradients flow through those (the hidden states come first).
    return getattr(instance, FUNC)(_bound(wrapped, kwargs), *_inputs_for(instance, state, args))


def _checkpoints(instance: torch.nn.Module, state: Any, training: bool, args: tuple, kwargs: dict) -> bool:
    """Whether this call of a block is checkpointed: flagged, a training call, no engine's checkpointing in its
    place, and a gradient to flow through it."""
    # Attribute reads (not `__dict__` lookups): torch.compile guards them (see `existing_state`).
    if not (getattr(instance, FLAG, False) and training) or (state is not None and state.engine_checkpoints):
        return False
    return _gradient_can_flow(instance, args, kwargs)  # else nothing is saved for backward: nothing to recompute


def _inputs_for(block: torch.nn.Module, state: Any, args: tuple) -> tuple:
    """``args``, with the first floating-point tensor made to require a gradient where reentrant checkpointing
    needs one for the block's own trainable parameters.

    torch's reentrant checkpoint gives gradients only through inputs that require one: a block with trainable
    parameters (LoRA inside a vision or audio encoder) whose inputs need none (the first block of a frozen-stemmed
    encoder) would run once, without its graph, and its parameters would get no gradient. The input is detached
    first: nothing upstream of it needs a gradient. Non-reentrant checkpointing needs none of this.
    """
    if state is None or not state.reentrant or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return args
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return (*args[:index], value.detach().requires_grad_(True), *args[index + 1 :])
    return args


def _bound(function: Callable, kwargs: dict) -> Callable:
    """``function`` with ``kwargs`` bound: a closure, which torch 2.1's dynamo traces into a checkpoint (a partial it
    does not)."""

    def call(*args: Any) -> Any:
        return function(*args, **kwargs)

    return call


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
    """wrapt wrapper for a decoder block's ``forward``: checkpoints it when ``__call__`` asked for that, and under
    ``torch.compile`` (see ``_COMPILED_IN_FORWARD``)."""
    state = existing_state(instance)
    if state is not None and state.checkpoint_forward:
        state.checkpoint_forward = False
        return getattr(instance, FUNC)(_bound(wrapped, kwargs), *_inputs_for(instance, state, args))
    if _COMPILED_IN_FORWARD and compiling():
        training = instance.training and torch.is_grad_enabled()
        if _checkpoints(instance, state, training, args, kwargs):
            return getattr(instance, FUNC)(_bound(wrapped, kwargs), *args)
    return wrapped(*args, **kwargs)


_USE_CACHE_POSITIONS: dict = {}  # forward -> position; a plain dict, which torch.compile reads without tracing


def _use_cache_position(forward: Callable) -> Optional[int]:
    """Where ``use_cache`` sits among the positional arguments of ``forward`` (without ``self``), or ``None``."""
    if forward in _USE_CACHE_POSITIONS:
        return _USE_CACHE_POSITIONS[forward]
    try:
        parameters = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        parameters = []
    position = parameters.index("use_cache") - 1 if "use_cache" in parameters else None  # minus `self`
    _USE_CACHE_POSITIONS[forward] = position
    return position


@functools.lru_cache(maxsize=None)
def _takes_use_cache(forward: Callable) -> bool:
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return True
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def owner_call(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for the block owner's ``__call__``: no KV cache while its blocks are checkpointed.

    Without grad (``generate``, ``model.chat()``, evaluation under ``torch.no_grad()``) no block checkpoints,
    so the cache is kept even in training mode: otherwise every new token would recompute the whole prefix.
    """
    state = existing_state(instance)
    if state is None or not (state.routes and instance.training and torch.is_grad_enabled()):
        return wrapped(*args, **kwargs)
    _leave_blocks_to_engine_checkpointing(instance)
    if not _takes_use_cache(type(instance).forward):
        return wrapped(*args, **kwargs)  # an owner without a cache (its blocks return hidden states alone)
    position = _use_cache_position(type(instance).forward)
    if position is not None and position < len(args):
        requested = args[position]
        args = args[:position] + (False,) + args[position + 1 :]
    else:
        requested = kwargs.get("use_cache")
        kwargs = {**kwargs, "use_cache": False}
    if requested is None:
        requested = getattr(getattr(instance, "config", None), "use_cache", False)
    if requested and not compiling() and state.warn_once("use_cache"):  # logging would break a compiled graph
        logger.warning("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
    return wrapped(*args, **kwargs)


def _leave_blocks_to_engine_checkpointing(owner: torch.nn.Module) -> None:
    """Marks the routed blocks that an engine's own activation checkpointing wraps, and warns once."""
    covered = [block for block in engine_hooks().outer_checkpointed_blocks(owner) if block.__dict__.get(FLAG)]
    for block in covered:
        state_of(block).engine_checkpoints = True
    if covered and state_of(owner).warn_once("engine_checkpoints"):
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


def route(
    model: torch.nn.Module,
    owners: list[torch.nn.Module],
    blocks: list[torch.nn.Module],
    settings: CheckpointSettings,
) -> None:
    """Turns routed checkpointing on for ``blocks`` (in model order), with ``settings``."""
    for owner in owners:
        owner.__dict__[FLAG] = False  # the remote forward must not call torch's checkpoint itself
        state_of(owner).routes = True
        _use_cache_position(type(owner).forward)  # read here, where it is not traced by torch.compile
    route_blocks(blocks, settings)
    # A plan (a memory budget; selective recompute per batch shape) sets each block's flag and function.
    speed_hooks().plan_blocks(model, blocks, settings)
    # Reentrant checkpointing only propagates gradients to inputs that require them; with a frozen base the
    # embeddings' output does not, so LoRA weights inside the blocks would get none.
    set_input_grads(model, settings.use_reentrant is not False)


def route_blocks(blocks: list[torch.nn.Module], settings: CheckpointSettings) -> None:
    """Flags ``blocks`` (in model order) to checkpoint through ``settings``: every ``every_n_layers``-th one.

    :func:`route` does it for the decoder blocks; a family's extra blocks (Qwen-VL's vision transformer) are
    flagged alone, counted on their own and outside any memory-budget plan.
    """
    every = max(1, int(settings.every_n_layers))
    for index, block in enumerate(blocks):
        state = state_of(block)
        if state.saved is None:
            state.saved = {name: block.__dict__[name] for name in (FLAG, FUNC) if name in block.__dict__}
        block.__dict__[FUNC] = settings.function
        block.__dict__[FLAG] = index % every == 0
        state.reentrant = settings.use_reentrant is not False


def unroute(model: torch.nn.Module, owners: list[torch.nn.Module], blocks: list[torch.nn.Module]) -> None:
    """Turns routed checkpointing off: the blocks run their plain forward again."""
    for owner in owners:
        state = existing_state(owner)
        if state is not None:
            state.routes = False
    for block in blocks:
        block.__dict__[FLAG] = False
    speed_hooks().stop_planning(model, blocks, False)  # the plans stay for a later re-enable (Trainer's)
    set_input_grads(model, False)


def clear(model: torch.nn.Module) -> None:
    """Removes every attribute and hook the checkpoint layer put on ``model`` and its submodules."""
    for module in model.modules():
        state = existing_state(module)
        if state is None:
            continue
        set_input_grads(module, False)
        if state.saved is not None:
            module.__dict__.pop(FLAG, None)
            module.__dict__.pop(FUNC, None)
            module.__dict__.update(state.saved)
