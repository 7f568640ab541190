"""Which classes a repair goes on: the remote-code classes of a loaded model, and what their code refers to.

Shared by every repair module of this package. Nothing here installs anything.
"""

from __future__ import annotations

import inspect
import sys
import threading
import types
from typing import Any, Optional

__all__ = [
    "INSTALLED_MARK",
    "LOADING",
    "REPAIRS",
    "code_names",
    "code_objects",
    "defines",
    "generation_mixin",
    "is_transformers_class",
    "parameters",
    "remote_classes",
    "remote_code_uses",
    "remote_package_modules",
]

#: The patch registry's group of every repair (:mod:`qwen_ckpt_compat._patches`); repairs are never undone.
REPAIRS = ("repairs",)

#: Set on a replacement function's ``__dict__``: installed by this library.
INSTALLED_MARK = "_qcc_replacement"

#: Held while remote code is copied into transformers' module cache and imported, and while a remote model class's
#: ``from_pretrained`` runs: transformers does the first outside its own lock, and from 4.51 to 4.57 the second
#: swaps ``nn.Module.register_parameter`` process-wide (``init_empty_weights``), so two loads at once could leave
#: every later module's parameters on the meta device.
LOADING = threading.RLock()


def is_transformers_class(klass: type) -> bool:
    module = klass.__module__ or ""
    return module == "transformers" or module.startswith("transformers.")

def remote_classes(cls: type) -> list:
    """The model classes of ``cls``'s MRO that come from remote (or user) code, most derived first.

    Those are the ``PreTrainedModel`` subclasses that transformers does not define itself (their module is
    ``transformers_modules.*`` when loaded with ``trust_remote_code=True``).
    """
    from transformers import PreTrainedModel

    return [
        klass
        for klass in cls.__mro__
        if issubclass(klass, PreTrainedModel)
        and klass is not PreTrainedModel
        and not is_transformers_class(klass)
    ]

def defines(classes: list, name: str) -> bool:
    return any(name in klass.__dict__ for klass in classes)

def parameters(function: Any) -> set:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()

def generation_mixin() -> Optional[type]:
    try:
        from transformers.generation import GenerationMixin
    except ImportError:  # pragma: no cover - transformers < 4.26, where PreTrainedModel holds generate itself
        return None
    return GenerationMixin


def code_objects(function: Any) -> list:
    """The code of a function and of every function nested in it."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    found: list = []
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return found


def code_names(function: Any) -> set:
    """Every global and attribute name a function's code (nested functions included) refers to."""
    return {name for code in code_objects(function) for name in code.co_names}


def remote_package_modules(cls: type) -> list:
    """The modules of the remote-code package ``cls`` was loaded from (``transformers_modules.<repo>...``)."""
    package = cls.__module__.rpartition(".")[0]
    return [module for name, module in list(sys.modules.items()) if module is not None and name.rpartition(".")[0] == package]

def remote_code_uses(cls: type, name: str) -> bool:
    """Whether the remote code ``cls`` comes from refers to ``name`` (read off the byte code of its classes)."""
    for module in remote_package_modules(cls):
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == module.__name__:
                if any(name in code_names(member) for member in list(vars(value).values())):
                    return True
    return False
