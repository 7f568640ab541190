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
    "is_old_checkpointing_api",
    "is_decoder_block",
    "is_remote_code",
    "unwrap_model",
]

REMOTE_MODULE_PREFIX = "transformers_modules."
_SET_GC = "_set_gradient_checkpointing"


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


def is_old_checkpointing_api(model_or_class: Any) -> bool:
    """Whether the model uses the pre-4.35 ``_set_gradient_checkpointing(self, module, value=False)`` form."""
    return find_checkpointing_class(model_or_class) is not None


def decoder_block_names(model: "torch.nn.Module") -> tuple[str, ...]:
    """Class names of the decoder blocks: the classes named in ``_no_split_modules``."""
    names = getattr(model, "_no_split_modules", None) or ()
    return tuple(dict.fromkeys(str(name) for name in names))


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
