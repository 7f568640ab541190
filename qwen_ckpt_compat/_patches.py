"""The one registry through which every patch of this library is installed, listed and undone.

Three kinds of patch go through it, each in groups of their own:

* the import hook's wrappers of transformers' dynamic-module loader (group ``("loading",)``);
* the class patch of an old-API model class, with its checkpoint-layer and fused-attention wrappers
  (group ``("checkpointing", cls)``);
* the repairs of remote code for what transformers removed or changed (group ``("repairs", cls)``).

Every install records the owner (a class or a module), the attribute, the raw value it replaced and a line that
says what it is for, so that :func:`installed` answers "what is in effect" and :meth:`PatchRegistry.undo` puts
back exactly the original objects. A check and its install happen under one lock: two threads loading remote
code at once never wrap a function twice.

Undo never removes another library's wrapper: where the attribute no longer holds what was installed (someone
wrapped it since), the install is left in place, inert (its wrapper passes every call straight through), and
stays listed as such; installing it again makes it active again, where it is, under the other library's wrapper.

Every wrapped method copies and pickles like a plain bound method: ``copy.deepcopy`` of an object holding one (peft
keeps the model's ``prepare_inputs_for_generation``) re-binds it to the copy of its instance, and ``pickle`` stores
it as ``getattr(instance, name)``. wrapt's own proxies refuse both.

A wrapper installed with ``traceable=True`` is a plain Python function instead of a wrapt proxy, so that
``torch.compile`` runs it: dynamo takes a wrapt proxy for the function it wraps (the proxy passes on
``__code__``) and traces the original code, leaving the wrapper out. The checkpoint layer needs this.
"""

from __future__ import annotations

import copy
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import wrapt

__all__ = ["Install", "PatchRegistry", "installed", "registry"]

_ABSENT = object()


@dataclass(eq=False)
class Install:
    """One installed patch.

    Attributes:
        owner (`type` or module): what the attribute was set on.
        name (`str`): the attribute.
        original (`Any`): the raw attribute before (``owner.__dict__[name]``), or a marker when there was none.
        value (`Any`): what was installed.
        group (`Hashable`): what it belongs to, e.g. ``("checkpointing", cls)``.
        what (`str`): one line for people (``describe``, the docs).
        active (`bool`): ``False`` once undone but left in place under another library's wrapper.
    """

    owner: Any
    name: str
    original: Any
    value: Any
    group: Hashable
    what: str
    active: bool = True

    def __str__(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", repr(self.owner))
        return f"{owner}.{self.name}: {self.what}" + ("" if self.active else " (inert: wrapped by another library)")


def _guarded(wrapper: Callable, record: list) -> Callable:
    """``wrapper``, passing calls straight through once its install is inert."""

    def guarded(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not record[0].active:
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    guarded.__wrapped_wrapper__ = wrapper  # type: ignore[attr-defined]
    return guarded


class _CopyableBoundFunctionWrapper(wrapt.BoundFunctionWrapper):
    """A wrapped method bound to an instance that copies and pickles like a plain bound method."""

    def __copy__(self) -> Any:
        return self  # a bound method is immutable

    def __deepcopy__(self, memo: dict) -> Any:
        instance = self._self_instance
        if instance is None or isinstance(instance, type):
            return self  # unbound, or bound to a class: classes are not copied
        copied = copy.deepcopy(instance, memo)
        return self._self_parent.__get__(copied, type(copied))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return getattr, (self._self_instance, self._self_parent._self_attribute)


class _CopyableFunctionWrapper(wrapt.FunctionWrapper):
    """``wrapt.FunctionWrapper`` whose bound methods are :class:`_CopyableBoundFunctionWrapper`.

    Args:
        wrapped (`Callable`): what is wrapped.
        wrapper (`Callable`): the wrapt wrapper function ``(wrapped, instance, args, kwargs)``.
        attribute (`str`): the name it is installed under (a bound method pickles as ``getattr(instance, attribute)``).
    """

    __bound_function_wrapper__ = _CopyableBoundFunctionWrapper

    def __init__(self, wrapped: Callable, wrapper: Callable, attribute: str) -> None:
        super().__init__(wrapped, wrapper)
        self._self_attribute = attribute

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict) -> Any:
        return self  # installed on a class, like a function

    def __reduce_ex__(self, protocol: Any) -> tuple:
        raise TypeError(f"cannot pickle the wrapper of {self._self_attribute!r} itself; pickle the class or instance")


def _traceable(original: Callable, wrapper: Callable, name: str) -> Callable:
    """A plain function calling ``wrapper(bound original, self, args, kwargs)``, for methods ``torch.compile`` runs."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(functools.partial(original, self), self, args, kwargs)

    functools.update_wrapper(method, original)  # name, docstring, and __wrapped__ for inspect.signature / unwrap
    method.__name__ = name
    method.__wrapper__ = wrapper  # type: ignore[attr-defined]
    return method


@dataclass
class PatchRegistry:
    """Installs patches, remembers them by group, and undoes a group."""

    _installs: list = field(default_factory=list)
    _lock: Any = field(default_factory=threading.RLock)

    def _find(self, owner: Any, name: str, group: Hashable, what: str) -> Optional[Install]:
        """The install of ``(owner, name, group, what)``, or ``None``."""
        for install in self._installs:
            if install.owner is owner and install.name == name and install.group == group and install.what == what:
                return install
        return None

    @staticmethod
    def _reactivated(install: Install) -> bool:
        """An inert install is made active again (``True``); an active one stays as it is (``False``)."""
        if install.active:
            return False
        install.active = True
        return True

    def wrap(
        self, owner: Any, name: str, wrapper: Callable, *, group: Hashable, what: str, traceable: bool = False
    ) -> bool:
        """Wraps ``owner.name`` (resolved through the MRO) with a wrapt wrapper function or a ``wrapt.decorator``.

        Args:
            owner (`type` or module): where the attribute is set.
            name (`str`): the attribute.
            wrapper (`Callable`): a wrapt wrapper function ``(wrapped, instance, args, kwargs)``, or a
                ``wrapt.decorator``.
            group (`Hashable`): what the install belongs to (undone together).
            what (`str`): one line for people.
            traceable (`bool`, *optional*, defaults to `False`): install a plain function that calls ``wrapper``
                (an instance method only), which ``torch.compile`` traces; a wrapt proxy it looks through.

        Returns:
            `bool`: whether anything was installed (or re-activated) now. Idempotent per ``(owner, name, group,
            what)``.
        """
        with self._lock:
            found = self._find(owner, name, group, what)
            if found is not None:
                return self._reactivated(found)
            original = vars(owner).get(name, _ABSENT)
            holder: list = []
            if isinstance(wrapper, wrapt.FunctionWrapper):  # a wrapt.decorator: it builds the wrapper itself
                wrapt.wrap_object(owner, name, wrapper)
            elif traceable:
                setattr(owner, name, _traceable(getattr(owner, name), _guarded(wrapper, holder), name))
            else:
                wrapt.wrap_object(owner, name, _CopyableFunctionWrapper, (_guarded(wrapper, holder), name))
            install = Install(owner, name, original, vars(owner)[name], group, what)
            holder.append(install)
            self._installs.append(install)
            return True

    def set(self, owner: Any, name: str, value: Any, *, group: Hashable, what: str) -> bool:
        """Sets ``owner.name = value`` (a replacement of a removed API). Idempotent per ``(owner, name, group, what)``."""
        with self._lock:
            found = self._find(owner, name, group, what)
            if found is not None:
                return self._reactivated(found)
            install = Install(owner, name, vars(owner).get(name, _ABSENT), value, group, what)
            setattr(owner, name, value)
            self._installs.append(install)
            return True

    def add_base(self, cls: type, base: type, *, group: Hashable, what: str) -> bool:
        """Appends ``base`` to ``cls.__bases__``. Idempotent."""
        with self._lock:
            if base in cls.__bases__:
                return False
            install = Install(cls, "__bases__", cls.__bases__, (*cls.__bases__, base), group, what)
            cls.__bases__ = install.value
            self._installs.append(install)
            return True

    def has(self, owner: Any, name: str, group: Hashable) -> bool:
        """Whether an install of ``group`` is in effect on ``owner.name``."""
        with self._lock:
            return any(i.owner is owner and i.name == name and i.group == group and i.active for i in self._installs)

    def installed(self, group: Optional[Callable[[Hashable], bool]] = None) -> list:
        """The installs in effect (those of the groups ``group`` accepts), in installation order."""
        with self._lock:
            return [i for i in self._installs if group is None or group(i.group)]

    def undo(self, group: Hashable) -> list:
        """Undoes every install of ``group``, newest first; returns those left in place (inert)."""
        left = []
        with self._lock:
            for install in reversed([i for i in self._installs if i.group == group and i.active]):
                if install.name != "__bases__" and vars(install.owner).get(install.name, _ABSENT) is not install.value:
                    install.active = False  # wrapped again by someone else: theirs stays, ours passes through
                    left.append(install)
                    continue
                self._installs.remove(install)
                if install.name == "__bases__":
                    install.owner.__bases__ = install.original
                elif install.original is _ABSENT:
                    delattr(install.owner, install.name)
                else:
                    setattr(install.owner, install.name, install.original)
        return left


#: The registry of this process.
registry = PatchRegistry()


def installed(group: Optional[Callable[[Hashable], bool]] = None) -> list:
    """The installs in effect in this process (see :meth:`PatchRegistry.installed`)."""
    return registry.installed(group)
