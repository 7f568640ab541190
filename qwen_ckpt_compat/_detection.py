"""What kind of model this is: remote code or native, old or new checkpointing API, family and blocks.

Everything here looks at the loaded classes, never at names alone: whether a checkpoint's remote code uses
the old ``_set_gradient_checkpointing(self, module, value=False)`` form depends on its revision.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._hooks import engine_hooks
from .errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "is_peft_model",
    "own_class",
    "unwrap_engines",
    "find_checkpointing_class",
    "find_enable_override",
    "found_block_names",
    "flag_carriers",
    "is_old_checkpointing_api",
    "repeated_block_names",
    "is_decoder_block",
    "is_remote_code",
    "unwrap_model",
]

REMOTE_MODULE_PREFIX = "transformers_modules."
_SET_GC = "_set_gradient_checkpointing"
#: The methods through which transformers (and Trainer, peft) turn checkpointing on and off.
ENABLE_METHODS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")
DISABLE_METHODS = ("gradient_checkpointing_disable", "activation_checkpointing_disable")
_FLAG = "gradient_checkpointing"


def unwrap_engines(obj: Any) -> Any:
    """Strips every training engine's wrapper around ``obj`` (asked of the engines wing)."""
    return engine_hooks().unwrap(obj)


def own_class(model_or_class: Any) -> type:
    """The class the model's code defined, under any class an engine swapped in (FSDP2)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return engine_hooks().own_class(cls)


def _is_pretrained_model(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def is_peft_model(obj: Any) -> bool:
    # Asked of peft's own class, and only when peft is imported: an object cannot be a PeftModel otherwise.
    # (FSDP2 swaps a sharded PeftModel's class for `FSDPPeftModel`, a subclass, so isinstance still holds.)
    peft_model = getattr(sys.modules.get("peft"), "PeftModel", None)
    return peft_model is not None and isinstance(obj, peft_model)


def unwrap_model(model: Any) -> Any:
    """Returns the transformers ``PreTrainedModel`` inside ``model``.

    Args:
        model (`PreTrainedModel`, `peft.PeftModel` or an engine's wrapper):
            a transformers model, a peft model around one, or either as a training engine hands it back:
            ``DistributedDataParallel``, ``DataParallel``, FSDP1's ``FullyShardedDataParallel``, a model
            sharded with FSDP2's ``fully_shard``, a DeepSpeed engine, a ``torch.compile``d module, or what
            accelerate's ``prepare`` returns (one of those).

    Raises:
        `UnsupportedModelError` (a `TypeError`): for anything else, naming what was passed.
    """
    inner = unwrap_engines(model)
    if is_peft_model(inner):
        inner = unwrap_engines(inner.get_base_model())
    if not _is_pretrained_model(inner):
        what = "None" if model is None else f"{type(model).__module__}.{type(model).__qualname__}"
        if inner is not model:
            what += f" around {type(inner).__module__}.{type(inner).__qualname__}"
        raise UnsupportedModelError(
            "qwen-ckpt-compat expects a transformers PreTrainedModel or a peft PeftModel around one (bare or in "
            f"a DDP, FSDP, DeepSpeed or compiled wrapper), got {what}"
            + (f" ({model!r:.60})" if isinstance(model, (str, bytes, int, float)) else "")
        )
    return inner


def is_remote_code(model_or_class: Any) -> bool:
    """Whether the class was loaded from a model repository with ``trust_remote_code=True``."""
    return own_class(model_or_class).__module__.startswith(REMOTE_MODULE_PREFIX)


def _original(function: Callable) -> Callable:
    # The replacement installed by `_class_patch` is a wrapt wrapper whose `__wrapped__` is the original.
    return inspect.unwrap(function)


def find_checkpointing_class(model_or_class: Any) -> Optional[type]:
    """Returns the class that defines ``_set_gradient_checkpointing`` in the old ``(module, value)`` form.

    ``None`` for classes that do not override it, and for native transformers models: up to 4.34 those use
    the old form too, but transformers drives them its own way on every release.
    """
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for klass in cls.__mro__:
        function = klass.__dict__.get(_SET_GC)
        if function is None:
            continue
        if _is_native(klass) or "value" not in inspect.signature(_original(function)).parameters:
            return None
        return klass
    return None


def _is_native(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "transformers"


def find_enable_override(model_or_class: Any) -> Optional[type]:
    """The remote class of a model without the old form that defines its own way of enabling checkpointing.

    The most derived class of the MRO, not from transformers, that defines ``gradient_checkpointing_enable``,
    ``activation_checkpointing_enable`` or a (new-form) ``_set_gradient_checkpointing`` in its own body; ``None``
    for old-API models (:func:`find_checkpointing_class` answers for them) and for remote code that leaves all of
    them to transformers. Whether that override enables anything is only known by calling it: the class patch
    watches what each call did (ChatGLM3's revision 37fe000 overrides ``gradient_checkpointing_enable`` with a body
    that enables nothing).
    """
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if find_checkpointing_class(cls) is not None:
        return None
    for klass in cls.__mro__:
        if _is_native(klass) or klass.__module__ == "builtins":
            continue
        if any(name in klass.__dict__ for name in (*ENABLE_METHODS, _SET_GC)):
            return klass
    return None


def is_old_checkpointing_api(model_or_class: Any) -> bool:
    """Whether the model uses the pre-4.35 ``_set_gradient_checkpointing(self, module, value=False)`` form."""
    return find_checkpointing_class(model_or_class) is not None


def decoder_block_names(model: "torch.nn.Module") -> tuple[str, ...]:
    """Class names of the decoder blocks: the classes named in ``_no_split_modules``."""
    names = getattr(model, "_no_split_modules", None) or ()
    return tuple(dict.fromkeys(str(name) for name in names))


def repeated_block_names(owners: "list[torch.nn.Module]") -> tuple[str, ...]:
    """Class names of the blocks the owners really run: the one class of each owner's first layer list.

    For a model whose ``_no_split_modules`` names a class its code does not define (a block renamed after the
    list was written): what the owner checkpoints is the ``ModuleList`` it holds, every item of one class.
    """
    names = []
    for owner in owners:
        for module in owner.modules():
            items = list(module.children()) if isinstance(module, _module_list()) else []
            if not items:
                continue
            classes = {own_class(item) for item in items}
            if len(classes) == 1:
                names.append(classes.pop().__name__)
                break
    return tuple(dict.fromkeys(names))


def _module_list() -> type:
    import torch

    return torch.nn.ModuleList


def found_block_names(model: "torch.nn.Module") -> tuple[str, ...]:
    """Class names of the decoder blocks the model really has, read off it without running its code.

    Those of ``_no_split_modules`` that the model holds (none without the list); else (a list naming only classes
    the model does not hold)
    the one class of the layer list under each module that carries a ``gradient_checkpointing`` flag of its own.
    The class patch finds them the same way under the modules the old ``_set_gradient_checkpointing`` flags.
    """
    names = decoder_block_names(model)
    if not names or any(is_decoder_block(module, names) for module in model.modules()):
        return names
    return repeated_block_names(flag_carriers(model, lambda module: False))


def is_decoder_block(module: "torch.nn.Module", names: "set[str] | frozenset[str] | tuple[str, ...]") -> bool:
    """Whether ``module``'s own class is one of the decoder-block class ``names`` (also once FSDP2 renamed it)."""
    return own_class(module).__name__ in names


def bound_to_model_classes(function: Callable, model: "torch.nn.Module") -> Callable:
    """``function`` with the global names it looks up resolved to the classes ``model`` was built from.

    transformers re-executes a remote module when its folder is loaded again (4.40-4.43 do): the module's globals
    then name new classes, and an old ``_set_gradient_checkpointing``'s ``isinstance(module, QWenModel)`` no longer
    matches the modules of a model built before. Each name ``function`` reads that is also the name of one of the
    model's own classes is rebound to that class; nothing else changes. Non-Python callables come back as they are.
    """
    code = getattr(function, "__code__", None)
    if code is None:
        return function
    found: dict = {}
    for module in model.modules():
        cls = own_class(module)
        found.setdefault(cls.__name__, cls)
    rebound = {name: found[name] for name in code.co_names if name in found and function.__globals__.get(name) is not found[name]}
    if not rebound:
        return function
    clone = types.FunctionType(code, {**function.__globals__, **rebound}, function.__name__, function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


def flag_carriers(model: "torch.nn.Module", skip: Callable[["torch.nn.Module"], bool]) -> list["torch.nn.Module"]:
    """The submodules that carry a ``gradient_checkpointing`` flag of their own (transformers' own view of owners).

    What transformers' new-form ``_set_gradient_checkpointing`` flags: every module with that attribute, here
    read off the instance (``__init__`` set it), the model itself and the modules ``skip`` names excepted.
    """
    return [
        module
        for module in model.modules()
        if module is not model and isinstance(module.__dict__.get(_FLAG), bool) and not skip(module)
    ]


def checkpointing_owners(model: "torch.nn.Module", original: Callable) -> list["torch.nn.Module"]:
    """The modules that the old-form ``original`` marks with ``gradient_checkpointing = True``.

    Asks ``original`` itself, module by module, and puts every flag back as it was.
    """
    owners = []
    for module in model.modules():
        had = "gradient_checkpointing" in module.__dict__
        before = module.__dict__.get("gradient_checkpointing")
        module.__dict__["gradient_checkpointing"] = False  # a block flagged by the checkpoint layer is no owner
        original(model, module, value=True)
        if module.__dict__.get("gradient_checkpointing") is True:
            owners.append(module)
        if had:
            module.__dict__["gradient_checkpointing"] = before
        else:
            module.__dict__.pop("gradient_checkpointing", None)
    return owners
