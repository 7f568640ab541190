"""The class patch: make an old remote-code model accept every way transformers enables checkpointing.

:func:`patch_class` installs, on the class that defines the old ``_set_gradient_checkpointing(self, module,
value=False)`` (never process-wide), through the patch registry (group ``("checkpointing", cls)``):

* a wrapper of that method that accepts the old call ``(module, value)`` (transformers <= 4.34, and 4.36+'s
  fallback) and the new call ``(enable=..., gradient_checkpointing_func=..., every_n_layers=...,
  **anything_later)`` (4.35+). Its visible signature has no ``value`` parameter, so transformers >= 4.36 takes
  the new path and hands over the checkpoint function it built from the caller's kwargs;
* wrappers around ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` that only note what
  the caller asked for (kwargs, ``every_n_layers``, ``offload``; read with ``inspect.signature().bind_partial``
  and validated there), so that "nothing was asked" can be told apart from transformers' filled-in defaults;
* around ``_backward_compatibility_gradient_checkpointing`` (where transformers has it): a wrapper that marks an
  enable call made by transformers while the model is being built (a config that carries a truthy
  ``gradient_checkpointing``, as Baichuan2's does), so that it can be told from a request and warned about.

When checkpointing is first enabled on a model, its blocks and owners get the checkpoint layer's ``__call__``
wrappers (:mod:`qwen_ckpt_compat._checkpoint_layer`), in the same group. :func:`unpatch` undoes the group and
puts back the exact original objects. Patching twice is a no-op.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import types
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
import wrapt

from . import _checkpoint_layer, _model_state
from ._detection import (
    DISABLE_METHODS,
    ENABLE_METHODS,
    bound_to_model_classes,
    checkpointing_owners,
    decoder_block_names,
    find_checkpointing_class,
    find_enable_override,
    flag_carriers,
    is_decoder_block,
    own_class,
    repeated_block_names,
    unwrap_model,
)
from ._family_registry import family_of
from ._hooks import speed_hooks
from ._input_grads import picklable_input_grads_hooks, set_input_grads
from ._model_state import existing_state, state_of
from ._patches import registry
from ._repairs.tokenizers import is_remote_tokenizer_class, undo_tokenizer_repairs
from ._settings import (
    CheckpointRequest,
    CheckpointSettings,
    resolve,
    settings_of_function,
    validate_checkpoint_kwargs,
)
from .errors import CompatWarning

__all__ = [
    "checkpoint_settings",
    "checkpointing_defaults",
    "disable_routed_checkpointing",
    "enable_routed_checkpointing",
    "is_patched",
    "is_routable",
    "patch_class",
    "set_checkpointing_defaults",
    "set_chunked_loss",
    "set_fused_attention",
    "switch_over",
    "unpatch",
]

_ENTRY_POINTS = ENABLE_METHODS
# transformers' hook that enables checkpointing from a truthy `config.gradient_checkpointing` inside `post_init`.
_AUTOMATIC_ENTRY_POINT = "_backward_compatibility_gradient_checkpointing"
_OLD_METHOD = "_set_gradient_checkpointing"

# The request noted by the enable wrapper, for the `_set_gradient_checkpointing` call it makes: (model id, request,
# a list that `_toggle` appends to when the call reached it).
_CURRENT_REQUEST: contextvars.ContextVar = contextvars.ContextVar("qcc_request", default=None)
# The model whose construction is enabling checkpointing by itself (`_backward_compatibility_gradient_checkpointing`).
_AUTOMATIC_ENABLE: contextvars.ContextVar = contextvars.ContextVar("qcc_automatic_enable", default=None)


def _group(cls: Optional[type]) -> tuple:
    return ("checkpointing", cls)


def _patched_class(model_or_class: Any) -> Optional[type]:
    """The class the patch is keyed on: the one with the old ``_set_gradient_checkpointing``, else the remote class
    that overrides how checkpointing is enabled (:func:`~qwen_ckpt_compat._detection.find_enable_override`)."""
    return find_checkpointing_class(model_or_class) or find_enable_override(model_or_class)


def is_routable(model_or_class: Any) -> bool:
    """Whether the library checkpoints this model's blocks itself (old API, or an enable override of its own)."""
    return _patched_class(model_or_class) is not None


# ---------------------------------------------------------------------------------------- the wrappers


# transformers' enable options that an enable override written before them does not take (5.23+'s
# `activation_checkpointing_enable` hands them to an overridden `gradient_checkpointing_enable`, and Trainer calls it).
_LATER_OPTIONS = ("every_n_layers", "offload")


def _options_it_lacks(wrapped: Callable, kwargs: dict) -> dict:
    """The options of :data:`_LATER_OPTIONS` in ``kwargs`` that ``wrapped``'s signature cannot take."""
    try:
        parameters = inspect.signature(wrapped).parameters
    except (TypeError, ValueError):
        return {}
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return {}
    return {name: kwargs[name] for name in _LATER_OPTIONS if name in kwargs and name not in parameters}


def _request_from_call(wrapped: Callable, args: tuple, kwargs: dict, lacking: Optional[dict] = None) -> CheckpointRequest:
    try:
        signature = inspect.signature(wrapped)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return CheckpointRequest()
    arguments.update(lacking or {})
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
    name = next((k for k in arguments if k.endswith("checkpointing_kwargs")), "gradient_checkpointing_kwargs")
    every_n_layers = arguments.get("every_n_layers")
    offload = arguments.get("offload")
    # transformers' own defaults (Trainer passes them explicitly) are no preference either.
    return CheckpointRequest(
        kwargs=validate_checkpoint_kwargs(arguments.get(name), name),
        every_n_layers=every_n_layers if every_n_layers not in (None, 1) else None,
        offload=True if offload else None,
    )


def _note_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper for the enable methods: remember what the caller asked for, then run the model's own enable method.

    That method is transformers' or the remote code's own override. Judged by what it did, not by its name: when
    the call returns without having reached the patched ``_set_gradient_checkpointing`` and without turning any of
    the model's own checkpointing flags on (ChatGLM3's revision 37fe000 overrides ``gradient_checkpointing_enable``
    with a body that enables nothing), the blocks are routed all the same, with what the call asked for.
    """
    model = instance if instance is not None else args[0]
    call_args = args if instance is not None else args[1:]
    # Options the method cannot take (an override older than them) are left out of its call and honoured here.
    lacking = _options_it_lacks(wrapped, kwargs)
    kwargs = {name: value for name, value in kwargs.items() if name not in lacking}
    outer = _CURRENT_REQUEST.get()
    reached: list = outer[2] if outer is not None and outer[0] == id(model) else []  # one enable call, nested
    token = _CURRENT_REQUEST.set((id(model), _request_from_call(wrapped, call_args, kwargs, lacking), reached))
    try:
        result = wrapped(*args, **kwargs)
        if not reached and isinstance(model, torch.nn.Module) and not _enabled_by_itself(model):
            _toggle(model, True, None, None)
        return result
    finally:
        _CURRENT_REQUEST.reset(token)


def _enabled_by_itself(model: torch.nn.Module) -> bool:
    """Whether the model's own checkpointing is on: a flag of its own set on a module the library does not route.

    Only for remote code that overrides the enable method without the old form: what it enabled its own way
    (with transformers' function, say) is left to it. An old-API model's flags are the library's to route.
    """
    if find_checkpointing_class(model) is not None:
        return False
    return any(owner.__dict__.get(_checkpoint_layer.FLAG) for owner in flag_carriers(model, _is_routed_block))


def _is_routed_block(module: torch.nn.Module) -> bool:
    state = existing_state(module)
    return state is not None and state.saved is not None


def _unroute_then_disable(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper for the disable methods of an enable override: routed blocks go off, then the model's own method."""
    model = instance if instance is not None else args[0]
    if isinstance(model, torch.nn.Module):
        _toggle(model, False, None, None)
        transformers_own = (getattr(wrapped, "__module__", None) or "").split(".")[0] == "transformers"
        if transformers_own and not hasattr(model, _OLD_METHOD):
            return None  # <= 4.34's disable calls a `_set_gradient_checkpointing` this remote code never had
    return wrapped(*args, **kwargs)


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


def _original_method(model: torch.nn.Module) -> Callable:
    """The class's own old ``_set_gradient_checkpointing`` (bound to the model's classes, see detection).

    For a model without the old form (an enable override of its own): a function of the same shape that sets the
    flag a module carries itself, as transformers' new form does.
    """
    cls = find_checkpointing_class(model)
    if cls is None:
        if find_enable_override(model) is not None:
            return _set_own_flag
        raise RuntimeError(f"{type(model).__qualname__} is not patched by qwen-ckpt-compat")  # pragma: no cover
    for install in registry.installed(lambda group: group == _group(cls)):
        if install.name == _OLD_METHOD:
            return bound_to_model_classes(install.original, model)
    raise RuntimeError(f"{type(model).__qualname__} is not patched by qwen-ckpt-compat")  # pragma: no cover


def _set_own_flag(model: torch.nn.Module, module: torch.nn.Module, value: bool = False) -> None:
    """The old form's contract, for a module that carries its own flag (transformers' new-form semantics)."""
    if isinstance(module.__dict__.get(_checkpoint_layer.FLAG), bool):
        module.__dict__[_checkpoint_layer.FLAG] = value


def _owners(model: torch.nn.Module, original: Callable) -> list:
    """What the remote code flags: asked of its old ``_set_gradient_checkpointing``, else the modules with a flag."""
    if original is _set_own_flag:
        names = set(decoder_block_names(model))
        return flag_carriers(model, lambda module: _is_routed_block(module) or is_decoder_block(module, names))
    return checkpointing_owners(model, original)


def _blocks_under(owners: list, names: set, seen: set) -> list:
    blocks = []
    for owner in owners:
        for module in owner.modules():
            if is_decoder_block(module, names) and id(module) not in seen:
                seen.add(id(module))
                blocks.append(module)
    return blocks


def _layout(model: torch.nn.Module, original: Callable) -> tuple[list, list]:
    """The owners (what the remote code would flag) and the groups of blocks under them, in model order.

    The first group holds the decoder blocks: the classes of ``_no_split_modules`` found under the owners, else
    (a list that names only classes the model does not hold: a block renamed after the list was written) the one
    class of each owner's layer list, which is what the remote code checkpoints. A model without the list gets
    none (the remote code's own checkpointing, with a warning). A further group holds the blocks the model's family adds
    (``Family.extra_blocks``), counted on their own for ``every_n_layers``.
    """
    owners = _owners(model, original)
    family = family_of(type(model))
    seen: set = set()
    names = set(decoder_block_names(model))
    groups = [_blocks_under(owners, names, seen)]
    if names and not groups[0]:  # named, but none of them is in the model: renamed since
        groups[0] = _blocks_under(owners, set(repeated_block_names(owners)), seen)
    if family is not None and family.extra_blocks:
        groups.append(_blocks_under(owners, set(family.extra_blocks), seen))
    # On the classes the model's code defined, also where an engine swapped in subclasses (FSDP2).
    group = _group(_patched_class(model))
    # Plain functions, not wrapt proxies: torch.compile traces them (and the checkpoints they call).
    for owner in owners:
        wrapper = _checkpoint_layer.owner_call
        registry.wrap(own_class(owner), "__call__", wrapper, group=group, what="block owner", traceable=True)
    for block in (b for blocks in groups for b in blocks):
        cls = own_class(block)
        for name, wrapper in (
            ("__call__", _checkpoint_layer.checkpointed_block_call),
            ("forward", _checkpoint_layer.checkpointed_block_forward),
        ):
            registry.wrap(cls, name, wrapper, group=group, what="checkpoint layer", traceable=True)
    return owners, groups


def _settings_for(model: torch.nn.Module, function: Optional[Callable], every_n_layers: Optional[int]) -> CheckpointSettings:
    noted = _CURRENT_REQUEST.get()
    defaults = state_of(model).defaults or CheckpointRequest()
    if noted is not None and noted[0] == id(model):
        noted[2].append(True)  # the enable call reached the patch
        # An enable call (Trainer's): the function transformers built binds the same kwargs, but offload, selective
        # recompute's context and the 8-bit default are the library's, so it is rebuilt from the noted request.
        request = noted[1].over(defaults)
        if noted[1].every_n_layers is not None or noted[1].offload is not None:
            request = replace(request, memory_budget=None)  # the call chose the blocks itself
    elif function is not None:
        # `_set_gradient_checkpointing(enable=True, gradient_checkpointing_func=f)` called directly: use `f`.
        return settings_of_function(function, every_n_layers or defaults.every_n_layers or 1)
    else:
        request = defaults
    return resolve(model, request.over(CheckpointRequest(every_n_layers=every_n_layers)), stacklevel=5)


def _why_no_blocks(model: torch.nn.Module, owners: list) -> str:
    """Why ``model`` has no decoder block to route: what its ``_no_split_modules`` says, and what the model holds."""
    model_name = type(model).__qualname__
    names = decoder_block_names(model)
    if not names:
        return f"{model_name} sets no `_no_split_modules`, which is where the library finds the decoder blocks"
    listed = ", ".join(names)
    present = {own_class(module).__name__ for module in model.modules()} & set(names)
    if not present:
        return f"{model_name}'s `_no_split_modules` names {listed}, but the model holds no module of that class"
    if not owners:
        return f"{model_name}'s `_no_split_modules` names {listed}, but its remote code checkpoints no module"
    under = ", ".join(dict.fromkeys(own_class(owner).__name__ for owner in owners))
    return (
        f"{model_name}'s `_no_split_modules` names {listed}, and the model holds {', '.join(sorted(present))}, "
        f"but none of them is under {under}, the module its remote code checkpoints"
    )


def _toggle(model: Any, enable: bool, function: Optional[Callable], every_n_layers: Optional[int]) -> None:
    original = _original_method(model)
    owners, groups = _layout(model, original)
    if not enable:
        _checkpoint_layer.unroute(model, owners, [block for blocks in groups for block in blocks])
        for owner in owners:
            original(model, owner, value=False)
        return
    settings = _settings_for(model, function, every_n_layers)
    state_of(model).settings = settings
    if _AUTOMATIC_ENABLE.get() == id(model):
        _warn_automatic_enable(model, settings)
    if groups[0]:
        _checkpoint_layer.route(model, owners, groups[0], settings)
        for extra in groups[1:]:
            _checkpoint_layer.route_blocks(extra, settings)
        return
    # No decoder blocks to route (none named by `_no_split_modules`, no layer list under an owner): the remote
    # code's own, reentrant checkpointing.
    for owner in owners:
        original(model, owner, value=True)
        if original is _set_own_flag:  # new-form remote code checkpoints through the function it is handed
            owner.__dict__[_checkpoint_layer.FUNC] = settings.function
    _checkpoint_layer.route(model, [], [], replace(settings, use_reentrant=True))
    if not owners:
        warnings.warn(
            f"{type(model).__qualname__}: no module of its remote code can be flagged for checkpointing and no "
            "decoder blocks were found, so nothing is checkpointed.",
            CompatWarning,
            stacklevel=4,
        )
    elif settings.use_reentrant is False or settings.every_n_layers != 1 or settings.offload or settings.memory_budget:
        warnings.warn(
            f"{_why_no_blocks(model, owners)}, so its remote code checkpoints itself, reentrantly and every layer "
            f"(or in the mode its code hard-codes); {settings.kwargs}, every_n_layers="
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


def _warn_automatic_enable(model: Any, settings: CheckpointSettings) -> None:
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
        set_input_grads(module, False)


# ---------------------------------------------------------------------------------------- public API


def patch_class(cls: type) -> Optional[type]:
    """Installs the class patch on an old-API remote class, before any instance exists.

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
    checkpointing_class = _patched_class(cls)
    if checkpointing_class is None:
        return None
    group = _group(checkpointing_class)
    old_api = find_checkpointing_class(cls) is not None
    if old_api:
        registry.wrap(checkpointing_class, _OLD_METHOD, _set_gradient_checkpointing, group=group, what="both call forms")
    else:  # an enable override of its own: routed blocks go off with the model's own disable call
        for name in DISABLE_METHODS:
            if hasattr(checkpointing_class, name):
                registry.wrap(checkpointing_class, name, _unroute_then_disable, group=group, what="unroutes first")
    for name in _ENTRY_POINTS:
        if hasattr(checkpointing_class, name):
            registry.wrap(checkpointing_class, name, _note_request, group=group, what="notes the request")
        # An override in a class derived from it (the class transformers loaded) would hide that wrapper.
        for klass in _remote_classes_below(cls, checkpointing_class):
            if name in klass.__dict__:
                registry.wrap(klass, name, _note_request, group=group, what="notes the request")
    if hasattr(checkpointing_class, _AUTOMATIC_ENTRY_POINT):
        what = "marks an enable call made while building"
        registry.wrap(checkpointing_class, _AUTOMATIC_ENTRY_POINT, _note_automatic_enable, group=group, what=what)
    if hasattr(checkpointing_class, "enable_input_require_grads"):
        what = "a hook pickle can find"
        registry.wrap(checkpointing_class, "enable_input_require_grads", picklable_input_grads_hooks, group=group, what=what)
    return checkpointing_class


def _remote_classes_below(cls: type, base: type) -> list:
    """The classes of ``cls``'s MRO that derive from ``base`` (``base`` excluded), most derived first."""
    return [klass for klass in cls.__mro__ if klass is not base and issubclass(klass, base)]


def switch_over(root: torch.nn.Module) -> None:
    """Lays out a patched model's blocks; checkpointing already on through the remote code's own path is routed."""
    owners, _ = _layout(root, _original_method(root))
    if any(owner.__dict__.get(_checkpoint_layer.FLAG) for owner in owners):
        _toggle(root, True, None, None)


def unpatch(model: Any) -> Any:
    """Undoes the class patch and clears this library's state on ``model``.

    The original functions are put back as they were (the same objects). Checkpointing on ``model`` is
    off afterwards; other instances of the same classes lose their routed checkpointing too. The repairs of
    removed APIs stay (the model's code needs them).

    A remote tokenizer (or its class) gets its original attributes back: the tokenizer repairs are undone
    (:mod:`qwen_ckpt_compat._repairs.tokenizers`).

    Args:
        model (`PreTrainedModel`, `peft.PeftModel` or `type`): a model, or a remote model class (then only the
            class-level wrappers are removed); or a remote tokenizer or tokenizer class.

    Returns:
        The same ``model``.
    """
    if is_remote_tokenizer_class(model if isinstance(model, type) else type(model)):
        undo_tokenizer_repairs(model)
        return model
    if isinstance(model, type):
        cls = _patched_class(model)
        if cls is not None:
            registry.undo(_group(cls))
        return model
    root = unwrap_model(model)
    cls = _patched_class(root)
    _checkpoint_layer.clear(root)
    _clear_input_hooks(root)
    for module in root.modules():
        _model_state.clear(module)
    if cls is not None:
        registry.undo(_group(cls))
    return model


def is_patched(model_or_class: Any) -> bool:
    """Whether the class patch is in effect for this model (or class)."""
    if not isinstance(model_or_class, type):
        model_or_class = unwrap_model(model_or_class)
    cls = find_checkpointing_class(model_or_class)
    if cls is not None:
        return registry.has(cls, _OLD_METHOD, _group(cls))
    cls = find_enable_override(model_or_class)
    return cls is not None and any(registry.has(cls, name, _group(cls)) for name in _ENTRY_POINTS)


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
    state_of(unwrap_model(model)).defaults = request


def checkpointing_defaults(model: Any) -> Optional[CheckpointRequest]:
    """What :func:`set_checkpointing_defaults` stored on ``model``, or ``None``."""
    state = existing_state(unwrap_model(model))
    return state.defaults if state is not None else None


def set_fused_attention(model: Any, mode: Optional[str]) -> int:
    """Turns the fused causal attention kernel on (``"training"``, ``"always"``) or off (``None``) for a patched
    model (the speed wing's).

    Returns:
        `int`: how many attention modules of a known kind (Qwen v1's) the model has; 0 means nothing changed.
    """
    root = unwrap_model(model)
    group = _group(_patched_class(root))

    def wrap(cls: type, name: str, wrapper: Callable) -> None:
        registry.wrap(cls, name, wrapper, group=group, what="fused causal attention")

    return speed_hooks().set_fused_attention(root, mode, wrap)


def set_chunked_loss(model: Any, tokens: Optional[int], keep_logits: bool) -> bool:
    """Turns the chunked loss on (``tokens`` per chunk) or off (``None``) for a patched model (the speed wing's).

    Returns:
        `bool`: whether the model's LM head computes its loss in a way the speed wing knows; ``False`` means
        nothing changed.
    """
    root = unwrap_model(model)
    group = _group(find_checkpointing_class(root))

    def wrap(cls: type, name: str, wrapper: Callable) -> None:
        registry.wrap(cls, name, wrapper, group=group, what="chunked loss")

    return speed_hooks().set_chunked_loss(root, tokens, keep_logits, wrap)


def checkpoint_settings(model: Any) -> Optional[CheckpointSettings]:
    """The settings routed checkpointing was last enabled with on ``model``, or ``None``.

    A model that enabled checkpointing by itself while it was being built did so on the sub-model whose
    ``post_init`` ran first; its settings are found there when the model itself has none.
    """
    root = unwrap_model(model)
    states = [state for state in map(existing_state, root.modules()) if state]
    settings = next((state.settings for state in states if state.settings is not None), None)
    if settings is None:
        return None
    loss = existing_state(root)
    return replace(
        settings,
        fused_attention=any(state.fused_attention is not None for state in states),
        chunked_loss=getattr(loss.chunked_loss, "tokens", None) if loss is not None else None,
    )
