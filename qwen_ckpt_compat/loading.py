"""Loading old remote code: patched when transformers loads it, and Qwen-style code on 4.57+ and 5.x.

While enabled (it is, from ``import qwen_ckpt_compat`` on, unless ``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1`` is
set), two functions of ``transformers.dynamic_module_utils`` are wrapped:

* ``get_class_in_module``: every class transformers loads from remote code is handed to
  :func:`qwen_ckpt_compat.families.prepare_class`. A model class with the old
  ``_set_gradient_checkpointing(self, module, value=False)`` is patched right away, before any instance exists
  (:func:`qwen_ckpt_compat.patching.patch_class`): a model whose ``post_init`` enables checkpointing
  (Baichuan2's config does) then loads on 4.35.x too, and any later enable call, peft's
  ``prepare_model_for_kbit_training`` included, is routed as asked. It also gets the APIs transformers removed
  that its code calls (:mod:`qwen_ckpt_compat.removed_apis`) and its family's repairs
  (:mod:`qwen_ckpt_compat.families`); a config class of a known family gets the attributes ``PretrainedConfig``
  carried before 5.0. Native classes and new-API remote code (internlm2, MiniCPM) are returned untouched.
* ``check_imports``, for *Qwen-style* modules only, those that import ``transformers_stream_generator`` lazily
  (inside a function body, never at the top). Qwen v1's ``modeling_qwen.py`` imports it inside ``chat_stream()``
  only, yet transformers demands it when the model loads; installed, the package itself no longer imports on
  transformers >= 4.57 (it needs ``BeamSearchScorer``, then ``DisjunctiveConstraint``). When it cannot be
  imported, it is left out of the check; every other import of the file is still checked the way transformers
  checks it, and import problems of any other package or model are raised as before. ``chat_stream()`` then
  raises :class:`StreamingUnavailableError`, saying why and what to use instead.

Nothing on disk is changed (neither the model directory nor the Hugging Face cache).
:func:`disable_remote_code_loading` restores transformers' original functions (classes already loaded keep
their patches; :func:`qwen_ckpt_compat.unpatch` takes a model or a class); :func:`enable_remote_code_loading`
is the explicit API for users who set the environment variable.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import logging
import os
import sys
from typing import Any, Iterator, Optional

import wrapt

from .errors import CompatError

__all__ = [
    "StreamingUnavailableError",
    "disable_remote_code_loading",
    "enable_remote_code_loading",
    "is_remote_code_loading_enabled",
    "remote_code_loading_disabled",
    "stream_generator_incompatibility",
    "stream_generator_problem",
    "wrap_chat_stream",
]

logger = logging.getLogger(__name__)

STREAM_PACKAGE = "transformers_stream_generator"
_TARGET = "transformers.dynamic_module_utils"
_NO_IMPORT_HOOK_ENV = "QWEN_CKPT_COMPAT_NO_IMPORT_HOOK"
_state = {"enabled": False, "hook_registered": False}
_wrapped: dict = {}  # name -> original function of transformers.dynamic_module_utils


class StreamingUnavailableError(CompatError, ImportError):
    """``chat_stream()`` needs ``transformers_stream_generator``, which cannot work with this transformers."""


def stream_generator_problem() -> Optional[str]:
    """Why ``transformers_stream_generator`` cannot be used here, or ``None`` when it imports fine."""
    try:
        importlib.import_module(STREAM_PACKAGE)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == STREAM_PACKAGE:
            return f"{STREAM_PACKAGE} is not installed"
        return f"{STREAM_PACKAGE} does not import: {error}"
    except ImportError as error:
        return f"{STREAM_PACKAGE} does not import: {error}"
    return None


@functools.lru_cache(maxsize=256)
def _lazily_imported(filename: str, mtime: float) -> frozenset:
    """Top-level package names imported inside function bodies and nowhere at module level."""
    with open(filename, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename)
    inside: set[str] = set()
    outside: set[str] = set()

    def names(node: ast.AST) -> set:
        if isinstance(node, ast.Import):
            return {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return {node.module.split(".")[0]}
        return set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            (inside if nested else outside).update(names(child))
            visit(child, nested)

    visit(tree, False)
    return frozenset(inside - outside)


def is_qwen_style_module(filename: Optional[str]) -> bool:
    """Whether a remote-code file imports ``transformers_stream_generator`` lazily, as Qwen v1's does."""
    if not filename or not filename.endswith(".py") or not os.path.isfile(filename):
        return False
    return STREAM_PACKAGE in _lazily_imported(filename, os.path.getmtime(filename))


# ------------------------------------------------------------------------------------------- wrappers


def _check_imports(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    filename = str(args[0] if args else kwargs["filename"])
    if not is_qwen_style_module(filename):
        return wrapped(*args, **kwargs)
    problem = stream_generator_problem()
    if problem is None:
        return wrapped(*args, **kwargs)
    # The same check as transformers', for every import of the file but the lazily imported streaming package.
    module = sys.modules[_TARGET]
    missing = []
    for name in module.get_imports(filename):
        if name == STREAM_PACKAGE:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] != name.split(".")[0]:
                raise  # the package is there but one of its own imports is missing: not hidden
            missing.append(name)
    if missing:
        raise ImportError(
            "This modeling file requires the following packages that were not found in your environment: "
            f"{', '.join(missing)}. Run `pip install {' '.join(missing)}`"
        )
    logger.info("Loading %s without %s (%s); chat_stream() is unavailable.", filename, STREAM_PACKAGE, problem)
    return module.get_relative_imports(filename)


# The `GenerationMixin` methods that transformers_stream_generator's `generate` (0.0.5, its last release) was
# written against: it dispatches to `greedy_search` / `sample` and calls `_validate_model_class` and
# `_get_logits_warper` on the model. transformers removed them in 4.41-4.53; without them the package still
# imports (up to 4.56), but its streaming `generate` fails on the model.
_STREAM_GENERATOR_NEEDS = ("greedy_search", "sample", "_validate_model_class", "_get_logits_warper")


def stream_generator_incompatibility() -> Optional[str]:
    """Why an importable ``transformers_stream_generator`` cannot stream with this transformers, or ``None``."""
    from transformers.generation.utils import GenerationMixin

    missing = [name for name in _STREAM_GENERATOR_NEEDS if not hasattr(GenerationMixin, name)]
    if not missing:
        return None
    names = ", ".join(f"GenerationMixin.{name}" for name in missing)
    return f"it imports, but it calls {names}, which this transformers no longer has"


def _stream_unavailable(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    problem = stream_generator_problem() or stream_generator_incompatibility()
    if problem is None:
        return wrapped(*args, **kwargs)
    from .versions import installed_version

    owner = type(instance).__qualname__ if instance is not None else "chat_stream"
    raise StreamingUnavailableError(
        f"{owner}.chat_stream() needs {STREAM_PACKAGE}, which cannot work here: {problem}. That package was "
        f"written for transformers <= 4.40 (installed: {installed_version('transformers')}): later releases "
        "removed generation internals it calls, and from 4.57 on it fails to import (BeamSearchScorer, "
        "DisjunctiveConstraint were removed). Use model.chat(...) instead, or stream with "
        "model.generate(..., streamer=transformers.TextIteratorStreamer(tokenizer))."
    )


def _get_class_in_module(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    cls = wrapped(*args, **kwargs)
    if isinstance(cls, type):
        prepare_remote_class(cls)
    return cls


def prepare_remote_class(cls: type) -> list:
    """What a class loaded from remote code gets (see :func:`qwen_ckpt_compat.families.prepare_class`)."""
    from .families import prepare_class

    return prepare_class(cls)


def wrap_chat_stream(cls: type) -> list:
    """Makes a Qwen-style ``chat_stream()`` raise :class:`StreamingUnavailableError` while it cannot stream.

    Only for a class that defines ``chat_stream`` in a Qwen-style module; idempotent.

    Returns:
        `list[str]`: what was installed now.
    """
    chat_stream = cls.__dict__.get("chat_stream")
    module = sys.modules.get(getattr(cls, "__module__", ""))
    if chat_stream is None or isinstance(chat_stream, wrapt.FunctionWrapper):
        return []
    if not is_qwen_style_module(getattr(module, "__file__", None)):
        return []
    wrapt.wrap_function_wrapper(cls, "chat_stream", _stream_unavailable)
    return [f"{cls.__qualname__}.chat_stream (StreamingUnavailableError while it cannot stream)"]


# ----------------------------------------------------------------------------------------- switching


def _install(module: Any) -> None:
    if not _state["enabled"] or _wrapped:
        return
    for name, wrapper in (("check_imports", _check_imports), ("get_class_in_module", _get_class_in_module)):
        _wrapped[name] = module.__dict__[name]
        wrapt.wrap_function_wrapper(module, name, wrapper)


def enable_remote_code_loading() -> None:
    """Patches old-API remote classes when they are loaded, and lets Qwen-style code load everywhere (idempotent).

    Takes effect now if transformers' dynamic-module utilities are imported, else as soon as they are.
    """
    _state["enabled"] = True
    if _TARGET in sys.modules:
        _install(sys.modules[_TARGET])
    elif not _state["hook_registered"]:
        _state["hook_registered"] = True
        wrapt.register_post_import_hook(_install, _TARGET)


def disable_remote_code_loading() -> None:
    """Puts transformers' original ``check_imports`` and ``get_class_in_module`` back (idempotent)."""
    _state["enabled"] = False
    module = sys.modules.get(_TARGET)
    for name, original in list(_wrapped.items()):
        if module is not None:
            setattr(module, name, original)
        del _wrapped[name]


def is_remote_code_loading_enabled() -> bool:
    """Whether :func:`enable_remote_code_loading` is in effect."""
    return _state["enabled"]


@contextlib.contextmanager
def remote_code_loading_disabled() -> Iterator[None]:
    """Context manager: transformers' own loading behaviour inside, the previous state afterwards."""
    was_enabled = _state["enabled"]
    disable_remote_code_loading()
    try:
        yield
    finally:
        if was_enabled:
            enable_remote_code_loading()


def import_hook_disabled_by_env() -> bool:
    """Whether ``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK`` asks the import not to install the loading fix."""
    return os.environ.get(_NO_IMPORT_HOOK_ENV, "").strip().lower() in ("1", "true", "yes")


def _enable_on_import() -> None:
    if not import_hook_disabled_by_env():
        enable_remote_code_loading()
