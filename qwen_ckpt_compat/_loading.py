"""The import hook: old remote code is prepared the moment transformers loads it.

While enabled (it is, from ``import qwen_ckpt_compat`` on, unless ``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1`` is
set), three functions of ``transformers.dynamic_module_utils`` and ``PreTrainedModel.from_pretrained`` are
wrapped, through the patch registry (group ``("loading",)``):

* ``get_class_in_module``: every class transformers loads from remote code is handed to
  :func:`qwen_ckpt_compat._preparation.prepare_class`: an old-API model class gets the class patch before any
  instance exists (a model whose ``post_init`` enables checkpointing, as Baichuan2's does, then loads on 4.35.x
  too, and any later enable call is routed as asked), the repairs its code needs and its family's own; a config
  class of a known family gets the attributes ``PretrainedConfig`` carried before 5.0. Native classes and
  new-API remote code (internlm2, MiniCPM) are returned untouched.
* ``check_imports``: a Qwen-style file loads although its lazily imported streaming package cannot import
  (:func:`qwen_ckpt_compat._repairs.streaming.check_imports`); every other file is checked as before.
* ``get_cached_module_file``, with ``get_class_in_module``: one remote load at a time copies the files into the
  module cache and imports them. transformers copies them outside its own lock, so a thread could import a file
  another thread was still writing (``module '...configuration_qwen' has no attribute 'QWenConfig'``, seen from
  four threads loading one folder: 9 rounds in 150 on 4.45.2).
* ``PreTrainedModel.from_pretrained``: takes the same lock (:data:`qwen_ckpt_compat._repairs._classes.LOADING`),
  for every model class and in every thread, a thread inside :func:`remote_code_loading_disabled` included: from
  4.51 to 4.57 ``from_pretrained`` swaps ``nn.Module.register_parameter`` process-wide (``init_empty_weights``),
  and two loads at once left parameters on the meta device for the rest of the process.

Nothing on disk is changed (neither the model directory nor the Hugging Face cache).
:func:`disable_remote_code_loading` undoes the wrappers (one wrapped since by another library stays, inert:
that library's wrapper is never removed); classes already loaded keep their patches
(:func:`qwen_ckpt_compat.unpatch` takes a model or a class). :func:`remote_code_loading_disabled` turns the hook
off for the calling thread only. :func:`enable_remote_code_loading` is the explicit API for users who set the
environment variable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

import wrapt

from ._patches import registry
from ._repairs import streaming
from ._repairs._classes import LOADING

__all__ = [
    "disable_remote_code_loading",
    "enable_remote_code_loading",
    "import_hook_disabled_by_env",
    "is_remote_code_loading_enabled",
    "remote_code_loading_disabled",
]

_TARGET = "transformers.dynamic_module_utils"
_MODELING = "transformers.modeling_utils"
NO_IMPORT_HOOK_ENV = "QWEN_CKPT_COMPAT_NO_IMPORT_HOOK"
_GROUP = ("loading",)
_state = {"enabled": False, "hook_registered": False}
_lock = threading.RLock()
_this_thread = threading.local()  # .disabled: remote_code_loading_disabled() depth in this thread


def _active() -> bool:
    return _state["enabled"] and not getattr(_this_thread, "disabled", 0)


def _check_imports(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _active():
        return wrapped(*args, **kwargs)
    filename = str(args[0] if args else kwargs["filename"])
    return streaming.check_imports(lambda name: wrapped(name), sys.modules[_TARGET], filename)


def _get_cached_module_file(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    with LOADING:
        return wrapped(*args, **kwargs)


def _get_class_in_module(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    with LOADING:
        cls = wrapped(*args, **kwargs)
    if isinstance(cls, type) and _active():
        # Imported at the first remote class, not with the package, because it imports torch (`import
        # qwen_ckpt_compat` stays cheap); transformers is loading remote code by then, so torch is imported anyway.
        from ._preparation import prepare_class

        prepare_class(cls)
    return cls


def _one_load_at_a_time(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    with LOADING:
        return wrapped(*args, **kwargs)


def _install_load_lock(module: Any) -> None:
    with _lock:
        if _state["enabled"]:
            what = "one model loads at a time"
            registry.wrap(module.PreTrainedModel, "from_pretrained", _one_load_at_a_time, group=_GROUP, what=what)


def _install(module: Any) -> None:
    with _lock:
        if not _state["enabled"]:
            return
        registry.wrap(module, "check_imports", _check_imports, group=_GROUP, what="Qwen-style files load")
        registry.wrap(module, "get_class_in_module", _get_class_in_module, group=_GROUP, what="prepares remote classes")
        if hasattr(module, "get_cached_module_file"):
            what = "one remote load at a time copies and imports"
            registry.wrap(module, "get_cached_module_file", _get_cached_module_file, group=_GROUP, what=what)


def enable_remote_code_loading() -> None:
    """Patches old-API remote classes when they are loaded, and lets Qwen-style code load everywhere (idempotent).

    Takes effect now if transformers' dynamic-module utilities are imported, else as soon as they are.
    """
    with _lock:
        _state["enabled"] = True
        if _TARGET in sys.modules:
            _install(sys.modules[_TARGET])
        if _MODELING in sys.modules:
            _install_load_lock(sys.modules[_MODELING])
        if not _state["hook_registered"]:
            _state["hook_registered"] = True
            # Each runs at its module's import, once; `_install*` do nothing while disabled.
            if _TARGET not in sys.modules:
                wrapt.register_post_import_hook(_install, _TARGET)
            if _MODELING not in sys.modules:  # imports torch: not imported here, only waited for
                wrapt.register_post_import_hook(_install_load_lock, _MODELING)


def disable_remote_code_loading() -> None:
    """Undoes the import hook's wrappers (idempotent).

    A wrapper that another library installed over one of them since stays in place: only this library's part is
    turned off (it then passes every call through).
    """
    with _lock:
        _state["enabled"] = False
        registry.undo(_GROUP)


def is_remote_code_loading_enabled() -> bool:
    """Whether :func:`enable_remote_code_loading` is in effect (for the calling thread)."""
    return _active()


@contextlib.contextmanager
def remote_code_loading_disabled() -> Iterator[None]:
    """Context manager: transformers' own loading behaviour inside, in the calling thread only.

    Other threads keep loading with the hook meanwhile.
    """
    _this_thread.disabled = getattr(_this_thread, "disabled", 0) + 1
    try:
        yield
    finally:
        _this_thread.disabled -= 1


def import_hook_disabled_by_env() -> bool:
    """Whether ``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK`` asks the import not to install the loading fix."""
    return os.environ.get(NO_IMPORT_HOOK_ENV, "").strip().lower() in ("1", "true", "yes")


def enable_on_import() -> None:
    """What ``import qwen_ckpt_compat`` runs: the hook, unless the environment turns it off."""
    if not import_hook_disabled_by_env():
        enable_remote_code_loading()
