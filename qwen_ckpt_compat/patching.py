"""The patch: make an old remote-code model accept every way transformers enables checkpointing.

:func:`patch` installs, on the classes of one loaded model (never process-wide):

* on the class that defines the old ``_set_gradient_checkpointing(self, module, value=False)``: a wrapper
  that accepts the old call ``(module, value)`` (transformers <= 4.34, and 4.36+'s fallback) and the new call
  ``(enable=..., gradient_checkpointing_func=..., every_n_layers=..., **anything_later)`` (4.35+). Its visible
  signature has no ``value`` parameter, so transformers >= 4.36 takes the new path and hands over the
  checkpoint function it built from the caller's kwargs;
* on the same class, wrappers around ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``
  that only note what the caller asked for (kwargs, ``every_n_layers``, ``offload``), so that "nothing was
  asked" can be told apart from transformers' filled-in defaults;
* on the same class, around ``_backward_compatibility_gradient_checkpointing`` (where transformers has it): a
  wrapper that marks an enable call made by transformers while the model is being built (a config that carries
  a truthy ``gradient_checkpointing``, as Baichuan2's does), so that it can be told from a request and warned about;
* on the decoder-block and block-owner classes: the ``__call__`` wrappers of :mod:`qwen_ckpt_compat.routing`.

The first three need the class alone (:func:`patch_class`, which :mod:`qwen_ckpt_compat.loading` calls when
transformers loads a remote class, before any instance exists); the block wrappers are installed when a model's
blocks are first routed. Every wrapper is recorded; :func:`unpatch` puts back the exact original objects.
Patching twice is a no-op.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import types
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import wrapt

from . import attention, engines, routing
from .detection import (
    bound_to_model_classes,
    checkpointing_owners,
    decoder_block_names,
    find_checkpointing_class,
    is_decoder_block,
    unwrap_model,
)
from .engines import own_class
from .errors import CompatWarning
from .removed_apis import restore_auto_class
from .versions import require_checkpoint_keywords

__all__ = [
    "CheckpointRequest",
    "checkpoint_settings",
    "checkpointing_defaults",
    "enable_routed_checkpointing",
    "disable_routed_checkpointing",
    "is_patched",
    "patch",
    "patch_class",
    "set_checkpointing_defaults",
    "set_fused_attention",
    "unpatch",
]

logger = logging.getLogger(__name__)

#: What ``prepare_for_lora`` asks for when given no kwargs: the modern, non-reentrant checkpoint. (An enable call
#: that names no ``use_reentrant`` gets non-reentrant too, except on models with bitsandbytes 8-bit layers, whose
#: activations only reentrant checkpointing frees: see :mod:`qwen_ckpt_compat.engines.bitsandbytes`.)
DEFAULT_CHECKPOINT_KWARGS: dict = {"use_reentrant": False}
_ENTRY_POINTS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")
# transformers' hook that enables checkpointing from a truthy `config.gradient_checkpointing` inside `post_init`.
_AUTOMATIC_ENTRY_POINT = "_backward_compatibility_gradient_checkpointing"
_DEFAULTS_ATTR = "_qcc_checkpointing_defaults"
_SETTINGS_ATTR = "_qcc_settings"  # the CheckpointSettings in effect, for checkpoint_settings()
_WARNED_INT8 = "_qcc_warned_int8_non_reentrant"
_ABSENT = object()


@dataclass(frozen=True)
class CheckpointRequest:
    """What a caller asked for; ``None`` means "no preference".

    Attributes:
        kwargs (`dict`, *optional*): kwargs for ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` ...).
        every_n_layers (`int`, *optional*): checkpoint every n-th decoder block only.
        offload (`bool`, *optional*): keep the saved block inputs in host memory.
        memory_budget (`int`, *optional*): bytes; plan which blocks to checkpoint (see :mod:`.budget`).
        selective (`bool`, *optional*): checkpointed blocks keep their expensive outputs (see :mod:`.selective`).
    """

    kwargs: Optional[dict] = None
    every_n_layers: Optional[int] = None
    offload: Optional[bool] = None
    memory_budget: Optional[int] = None
    selective: Optional[bool] = None

    def over(self, fallback: "CheckpointRequest") -> "CheckpointRequest":
        """This request, with its gaps filled from ``fallback``."""
        return CheckpointRequest(
            kwargs=self.kwargs if self.kwargs is not None else fallback.kwargs,
            every_n_layers=self.every_n_layers if self.every_n_layers is not None else fallback.every_n_layers,
            offload=self.offload if self.offload is not None else fallback.offload,
            memory_budget=self.memory_budget if self.memory_budget is not None else fallback.memory_budget,
            selective=self.selective if self.selective is not None else fallback.selective,
        )


@dataclass
class _Patch:
    """What was installed for one checkpointing class: (class, attribute, original raw attribute or _ABSENT)."""

    original: Callable
    records: list = field(default_factory=list)

    def wrap(self, cls: type, name: str, wrapper: Callable) -> None:
        """Wraps ``cls.name`` (resolved through the MRO) with a wrapt wrapper or a ``wrapt.decorator``."""
        if any(c is cls and n == name for c, n, _ in self.records):
            return
        self.records.append((cls, name, cls.__dict__.get(name, _ABSENT)))
        if isinstance(wrapper, wrapt.FunctionWrapper):  # a wrapt.decorator: it builds the wrapper itself
            wrapt.wrap_object(cls, name, wrapper)
        else:
            wrapt.wrap_function_wrapper(cls, name, wrapper)

    def restore(self) -> None:
        for cls, name, original in reversed(self.records):
            if original is _ABSENT:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        self.records.clear()


_PATCHES: dict = {}  # checkpointing class -> _Patch
# The request noted by the enable wrapper, for the `_set_gradient_checkpointing` call it makes: (model id, request).
_CURRENT_REQUEST: contextvars.ContextVar = contextvars.ContextVar("qcc_request", default=None)
# The model whose construction is enabling checkpointing by itself (`_backward_compatibility_gradient_checkpointing`).
_AUTOMATIC_ENABLE: contextvars.ContextVar = contextvars.ContextVar("qcc_automatic_enable", default=None)


# ---------------------------------------------------------------------------------------- the wrappers


def _request_from_call(wrapped: Callable, args: tuple, kwargs: dict) -> CheckpointRequest:
    try:
        signature = inspect.signature(wrapped)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return CheckpointRequest()
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
    checkpoint_kwargs = next((v for k, v in arguments.items() if k.endswith("checkpointing_kwargs")), None)
    every_n_layers = arguments.get("every_n_layers")
    offload = arguments.get("offload")
    # transformers' own defaults (Trainer passes them explicitly) are no preference either.
    return CheckpointRequest(
        kwargs=dict(checkpoint_kwargs) if checkpoint_kwargs is not None else None,
        every_n_layers=every_n_layers if every_n_layers not in (None, 1) else None,
        offload=True if offload else None,
    )


def _note_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper for the enable methods: remember what the caller asked for, then run transformers' code."""
    model = instance if instance is not None else args[0]
    call_args = args if instance is not None else args[1:]
    token = _CURRENT_REQUEST.set((id(model), _request_from_call(wrapped, call_args, kwargs)))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _CURRENT_REQUEST.reset(token)


def _note_automatic_enable(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper for ``_backward_compatibility_gradient_checkpointing``: an enable call inside is nobody's request."""
    model = instance if instance is not None else args[0]
    token = _AUTOMATIC_ENABLE.set(id(model))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _AUTOMATIC_ENABLE.reset(token)


def _visible_signature(self, enable: bool = True, gradient_checkpointing_func: Optional[Callable] = None, **kwargs):
    """What ``inspect.signature`` shows for the patched method: the new form, without ``value``."""


@wrapt.decorator(adapter=_visible_signature)
def _set_gradient_checkpointing(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> None:
    """Replacement of the old ``_set_gradient_checkpointing``: takes both call forms, routes the blocks."""
    if "value" in kwargs or (args and isinstance(args[0], torch.nn.Module)):
        # Old form, reached through `model.apply(partial(model._set_gradient_checkpointing, value=...))`:
        # once per module, children first. The whole model is handled once, when the root comes.
        module = args[0] if args else kwargs.get("module")
        value = kwargs.get("value", args[1] if len(args) > 1 else False)
        if module is instance:
            _toggle(instance, bool(value), None, None)
        return None
    enable = kwargs.pop("enable", args[0] if args else True)
    function = kwargs.pop("gradient_checkpointing_func", args[1] if len(args) > 1 else None)
    _toggle(instance, bool(enable), function, kwargs.get("every_n_layers"))
    return None


# ------------------------------------------------------------------------------------------- toggling


def _patch_of(model: torch.nn.Module) -> _Patch:
    cls = find_checkpointing_class(model)
    if cls is None or cls not in _PATCHES:  # pragma: no cover - only reachable through the wrappers
        raise RuntimeError(f"{type(model).__qualname__} is not patched by qwen-ckpt-compat")
    return _PATCHES[cls]


def _blocks_under(owners: list, names: set, seen: set) -> list:
    blocks = []
    for owner in owners:
        for module in owner.modules():
            if is_decoder_block(module, names) and id(module) not in seen:
                seen.add(id(module))
                blocks.append(module)
    return blocks


def _layout(model: torch.nn.Module, state: _Patch, original: Callable) -> tuple[list, list]:
    """The owners (what the remote code would flag) and the groups of blocks under them, in model order.

    The first group holds the decoder blocks (the classes of ``_no_split_modules``); a further group holds the
    blocks the model's family adds (:attr:`qwen_ckpt_compat.families.Family.extra_blocks`), counted on their own
    for ``every_n_layers``. ``original`` is the class's old method as :func:`bound_to_model_classes` gives it.
    """
    from .families import family_of

    owners = checkpointing_owners(model, original)
    family = family_of(type(model))
    seen: set = set()
    groups = [_blocks_under(owners, set(decoder_block_names(model)), seen)]
    if family is not None and family.extra_blocks:
        groups.append(_blocks_under(owners, set(family.extra_blocks), seen))
    # On the classes the model's code defined, also where an engine swapped in subclasses (FSDP2).
    for owner in owners:
        state.wrap(own_class(owner), "__call__", routing.owner_call)
    for block in (b for group in groups for b in group):
        state.wrap(own_class(block), "__call__", routing.checkpointed_block_call)
        state.wrap(own_class(block), "forward", routing.checkpointed_block_forward)
    return owners, groups


def _settings(model: torch.nn.Module, function: Optional[Callable], every_n_layers: Optional[int]) -> routing.CheckpointSettings:
    noted = _CURRENT_REQUEST.get()
    defaults = model.__dict__.get(_DEFAULTS_ATTR) or CheckpointRequest()
    if noted is not None and noted[0] == id(model):
        request = noted[1].over(defaults)
        if noted[1].every_n_layers is not None or noted[1].offload is not None:
            request = replace(request, memory_budget=None)  # the call chose the blocks itself
    elif function is not None:
        # `_set_gradient_checkpointing(enable=True, gradient_checkpointing_func=f)` called directly: use `f`.
        every = every_n_layers or defaults.every_n_layers or 1
        return routing.CheckpointSettings(function, routing.reentrancy_of(function), every, False, None)
    else:
        request = defaults
    request = request.over(CheckpointRequest(every_n_layers=every_n_layers))
    kwargs = dict(request.kwargs) if request.kwargs is not None else {}
    if "use_reentrant" not in kwargs:  # a dict without it expresses no preference on the mode
        # Non-reentrant, unless the model has layers whose activations only reentrant checkpointing frees.
        kwargs["use_reentrant"] = engines.non_reentrant_keeps_activations(model)
    elif kwargs["use_reentrant"] is False:
        _warn_if_non_reentrant_keeps_activations(model)
    require_checkpoint_keywords(kwargs)  # what this torch's checkpoint does not take is refused at enable time
    offload = bool(request.offload)
    selective = bool(request.selective) and _selective_context(model, kwargs)
    return routing.CheckpointSettings(
        function=routing.build_checkpoint_function(kwargs, offload),
        use_reentrant=bool(kwargs["use_reentrant"]),
        every_n_layers=request.every_n_layers or 1,
        offload=offload,
        kwargs=kwargs,
        memory_budget=request.memory_budget,
        selective=selective,
    )


def _selective_context(model: torch.nn.Module, kwargs: dict) -> bool:
    """Adds selective recompute's ``context_fn`` to ``kwargs`` where it can work; warns where it cannot."""
    from .selective import SelectiveRecompute, selective_checkpointing_available

    if kwargs["use_reentrant"] or not selective_checkpointing_available():
        why = "the reentrant checkpoint was asked for" if kwargs["use_reentrant"] else f"torch {torch.__version__} < 2.5"
        warnings.warn(
            f"selective recompute cannot be used on {type(model).__qualname__}: {why} (it needs the non-reentrant "
            "checkpoint of torch >= 2.5); checkpointed blocks are recomputed whole.",
            CompatWarning,
            stacklevel=5,
        )
        return False
    kwargs["context_fn"] = SelectiveRecompute()
    return True


def _warn_if_non_reentrant_keeps_activations(model: torch.nn.Module) -> None:
    if model.__dict__.get(_WARNED_INT8) or not engines.non_reentrant_keeps_activations(model):
        return
    model.__dict__[_WARNED_INT8] = True
    warnings.warn(
        f"{type(model).__qualname__} has bitsandbytes 8-bit layers, which keep their inputs on their autograd "
        "context where non-reentrant checkpointing cannot free them: use_reentrant=False is honoured, but saves "
        "little memory (Qwen-7B, seq 1024: 19.6 GB peak against 15.4 GB reentrant). Pass "
        "gradient_checkpointing_kwargs={'use_reentrant': True} (or no use_reentrant at all: the library then picks "
        "reentrant for 8-bit models and makes the input embeddings require grad, so LoRA still gets gradients).",
        CompatWarning,
        stacklevel=5,
    )


def _toggle(model: Any, enable: bool, function: Optional[Callable], every_n_layers: Optional[int]) -> None:
    state = _patch_of(model)
    original = bound_to_model_classes(state.original, model)
    owners, groups = _layout(model, state, original)
    if not enable:
        routing.unroute(model, owners, [block for group in groups for block in group])
        for owner in owners:
            original(model, owner, value=False)
        return
    settings = _settings(model, function, every_n_layers)
    model.__dict__[_SETTINGS_ATTR] = settings
    if _AUTOMATIC_ENABLE.get() == id(model):
        _warn_automatic_enable(model, settings)
    if groups[0]:
        routing.route(model, owners, groups[0], settings)
        for extra in groups[1:]:
            routing.route_blocks(extra, settings)
        return
    # No decoder blocks to route (no `_no_split_modules`): the remote code's own, reentrant checkpointing.
    for owner in owners:
        original(model, owner, value=True)
    routing.route(model, [], [], replace(settings, use_reentrant=True))
    if settings.use_reentrant is False or settings.every_n_layers != 1 or settings.offload or settings.memory_budget:
        warnings.warn(
            f"{type(model).__qualname__} names no decoder blocks in `_no_split_modules`, so its remote code "
            f"checkpoints itself, reentrantly and every layer; {settings.kwargs}, every_n_layers="
            f"{settings.every_n_layers}, offload={settings.offload} and memory_budget={settings.memory_budget} "
            "cannot be honoured.",
            CompatWarning,
            stacklevel=4,
        )


# Frames of these packages are not the caller's (transformers' loading, torch, the wrappers, the remote code).
_NOT_THE_CALLER = ("qwen_ckpt_compat", "transformers", "transformers_modules", "torch", "wrapt", "contextlib", "peft")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside the packages doing the loading."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and (frame.f_globals.get("__name__") or "").split(".")[0] in _NOT_THE_CALLER:
        frame, level = frame.f_back, level + 1
    return level


def _warn_automatic_enable(model: Any, settings: routing.CheckpointSettings) -> None:
    config = getattr(model, "config", None)
    warnings.warn(
        f"{type(model).__qualname__} turned gradient checkpointing on by itself while it was being built: its "
        f"config ({type(config).__qualname__}) carries a truthy `gradient_checkpointing`, which transformers' "
        "`post_init` turns into an enable call, although nobody asked for checkpointing. qwen-ckpt-compat routes it "
        f"({settings.kwargs}, every {settings.every_n_layers} block(s)). To turn it off: "
        "`prepare_for_lora(model, use_gradient_checkpointing=False)` or `model.gradient_checkpointing_disable()`.",
        CompatWarning,
        stacklevel=_caller_stacklevel(),
    )


def _clear_input_hooks(model: torch.nn.Module) -> None:
    """Removes this library's input-embedding hook wherever it sits (a sub-model enabled during construction)."""
    for module in model.modules():
        if routing.INPUT_GRADS_HOOK in module.__dict__:
            module.__dict__.pop(routing.INPUT_GRADS_HOOK).remove()


# ---------------------------------------------------------------------------------------- public API


def patch_class(cls: type) -> Optional[type]:
    """Installs the class-level part of :func:`patch` on an old-API remote class, before any instance exists.

    Wraps, on the class that defines the old ``_set_gradient_checkpointing(self, module, value=False)``:
    that method, the enable methods and transformers' ``_backward_compatibility_gradient_checkpointing``. The
    decoder blocks are laid out per instance, when checkpointing is first enabled. Idempotent; reversed by
    :func:`unpatch` (which accepts the class too).

    Args:
        cls (`type`): a model class loaded from remote code (any class of its MRO will do).

    Returns:
        `type` or `None`: the class that defines the old method (now patched), or `None` when ``cls`` does not
        use the old form (native transformers classes and new-API remote code are never touched).
    """
    checkpointing_class = find_checkpointing_class(cls)
    if checkpointing_class is None:
        return None
    if checkpointing_class not in _PATCHES:
        state = _Patch(original=checkpointing_class.__dict__["_set_gradient_checkpointing"])
        state.wrap(checkpointing_class, "_set_gradient_checkpointing", _set_gradient_checkpointing)
        for name in _ENTRY_POINTS:
            if hasattr(checkpointing_class, name):
                state.wrap(checkpointing_class, name, _note_request)
        if hasattr(checkpointing_class, _AUTOMATIC_ENTRY_POINT):
            state.wrap(checkpointing_class, _AUTOMATIC_ENTRY_POINT, _note_automatic_enable)
        _PATCHES[checkpointing_class] = state
    return checkpointing_class



def patch(model: Any) -> Any:
    """Patches the classes of ``model`` so that every transformers release can checkpoint it.

    Only models whose remote code uses the old ``_set_gradient_checkpointing(self, module, value=False)``
    form are touched; native transformers models are returned unchanged. If checkpointing was already
    enabled through the remote code's own path, it is switched over to the routed blocks.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`): a loaded model.

    Returns:
        The same ``model``.

    Raises:
        `UnsupportedModelError`: ``model`` is not a transformers model (or a peft model around one).
    """
    root = unwrap_model(model)
    cls = patch_class(type(root))
    if cls is None:
        return model
    from .families import prepare_model

    prepare_model(root)  # removed-API and family repairs, when loaded before the import hook
    restore_auto_class(root)  # so that save_pretrained copies the remote code (4.45-4.52 forgot it)
    state = _PATCHES[cls]
    owners, _ = _layout(root, state, bound_to_model_classes(state.original, root))
    if any(owner.__dict__.get(routing.FLAG) for owner in owners):
        _toggle(root, True, None, None)
    return model


def unpatch(model: Any) -> Any:
    """Undoes :func:`patch` (or :func:`patch_class`) and clears this library's state on ``model``.

    The original functions are put back as they were (the same objects). Checkpointing on ``model`` is
    off afterwards; other instances of the same classes lose their routed checkpointing too.

    Args:
        model (`PreTrainedModel`, `peft.PeftModel` or `type`): a model, or a remote model class (then only the
            class-level wrappers are removed).

    Returns:
        The same ``model``.
    """
    if isinstance(model, type):
        cls = find_checkpointing_class(model)
        state = _PATCHES.pop(cls, None) if cls is not None else None
        if state is not None:
            state.restore()
        return model
    root = unwrap_model(model)
    cls = find_checkpointing_class(root)
    state = _PATCHES.pop(cls, None) if cls is not None else None
    routing.clear(root)
    _clear_input_hooks(root)
    attention.clear(root)
    for module in root.modules():
        module.__dict__.pop(_DEFAULTS_ATTR, None)
        module.__dict__.pop(_SETTINGS_ATTR, None)
    root.__dict__.pop(_WARNED_INT8, None)
    if state is not None:
        state.restore()
    return model


def is_patched(model_or_class: Any) -> bool:
    """Whether :func:`patch` is in effect for this model (or class)."""
    if not isinstance(model_or_class, type):
        model_or_class = unwrap_model(model_or_class)
    cls = find_checkpointing_class(model_or_class)
    return cls is not None and cls in _PATCHES


def enable_routed_checkpointing(model: Any, *, function: Optional[Callable] = None) -> None:
    """Enables checkpointing on a patched model with its defaults, without going through transformers.

    What ``gradient_checkpointing_enable()`` does once patched, minus what transformers adds around it (on 5.x
    another input-embedding hook per call). A ``function`` given is used as the checkpoint function as it is.
    """
    _toggle(unwrap_model(model), True, function, None)


def disable_routed_checkpointing(model: Any) -> None:
    """Turns routed checkpointing off on a patched model (the blocks run their plain forward again).

    Also clears what a sub-model enabled by itself while it was being built (Baichuan2's config does that).
    """
    root = unwrap_model(model)
    _toggle(root, False, None, None)
    _clear_input_hooks(root)


def set_checkpointing_defaults(model: Any, request: CheckpointRequest) -> None:
    """Stores what ``model`` checkpoints with when an enable call expresses no preference."""
    unwrap_model(model).__dict__[_DEFAULTS_ATTR] = request


def checkpointing_defaults(model: Any) -> Optional[CheckpointRequest]:
    """What :func:`set_checkpointing_defaults` stored on ``model``, or ``None``."""
    return unwrap_model(model).__dict__.get(_DEFAULTS_ATTR)


def set_fused_attention(model: Any, enabled: bool) -> int:
    """Turns the fused causal attention kernel on or off for a patched model (see :mod:`.attention`).

    Returns:
        `int`: how many attention modules of a known kind (Qwen v1's) the model has; 0 means nothing changed.
    """
    root = unwrap_model(model)
    return attention.set_fused_attention(root, enabled, _patch_of(root).wrap)


def checkpoint_settings(model: Any) -> Optional[routing.CheckpointSettings]:
    """The settings routed checkpointing was last enabled with on ``model``, or ``None``.

    A model that enabled checkpointing by itself while it was being built did so on the sub-model whose
    ``post_init`` ran first; its settings are found there when the model itself has none.
    """
    root = unwrap_model(model)
    for module in root.modules():
        if _SETTINGS_ATTR in module.__dict__:
            return module.__dict__[_SETTINGS_ATTR]
    return None
