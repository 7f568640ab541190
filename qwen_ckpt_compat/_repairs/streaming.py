"""Qwen-style code on transformers >= 4.57: the streaming package it imports lazily.

Qwen v1's ``modeling_qwen.py`` (Qwen-VL's too) imports ``transformers_stream_generator`` inside ``chat_stream()``
only, yet transformers' load-time import check (``check_imports``) demands every package a file imports. That
package no longer imports on transformers >= 4.57 (it needs ``BeamSearchScorer``, then ``DisjunctiveConstraint``).
A file is *Qwen-style* when it imports the package lazily (inside a function body, never at the top), read off
its code (:func:`qwen_ckpt_compat._remote_code.lazily_imported_packages`):

* :func:`check_imports`: transformers' check for such a file when the package cannot be imported: every other
  import of the file is checked the way transformers checks it, and import problems of any other package or
  model are raised as before;
* :func:`wrap_chat_stream`: its ``chat_stream()`` raises :class:`~qwen_ckpt_compat.StreamingUnavailableError`,
  saying why and what to use instead, while streaming cannot work.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Any, Callable, Optional

from .._patches import registry
from .._remote_code import lazily_imported_packages, parsing
from .._versions import installed_version
from ..errors import StreamingUnavailableError
from ._classes import REPAIRS

__all__ = [
    "STREAM_PACKAGE",
    "check_imports",
    "is_qwen_style_module",
    "stream_generator_incompatibility",
    "stream_generator_problem",
    "wrap_chat_stream",
]

logger = logging.getLogger(__name__)

STREAM_PACKAGE = "transformers_stream_generator"

_STREAM_IMPORT_LOCK = threading.Lock()
_NOT_IMPORTED = object()  # no entry in sys.modules
_stream_import: dict = {}  # "answer": ((sys.modules entry, sys.path) it was found with, the problem or None)

# The `GenerationMixin` methods that transformers_stream_generator's `generate` (0.0.5, its last release) was
# written against: it dispatches to `greedy_search` / `sample` and calls `_validate_model_class` and
# `_get_logits_warper` on the model. transformers removed them in 4.41-4.53; without them the package still
# imports (up to 4.56), but its streaming `generate` fails on the model.
_STREAM_GENERATOR_NEEDS = ("greedy_search", "sample", "_validate_model_class", "_get_logits_warper")


def is_qwen_style_module(filename: Optional[str]) -> bool:
    """Whether a remote-code file imports ``transformers_stream_generator`` lazily, as Qwen v1's does."""
    return STREAM_PACKAGE in lazily_imported_packages(filename)


def stream_generator_problem() -> Optional[str]:
    """Why ``transformers_stream_generator`` cannot be used here, or ``None`` when it imports fine.

    The import is tried once, under a lock, and the answer kept while what the import would see is the same (the
    package's entry in ``sys.modules``, and ``sys.path``): a failed import walks the whole of ``sys.path`` and
    refills ``sys.path_importer_cache``, where transformers' ``importlib.invalidate_caches()`` calls, made while
    another thread loads remote code, then collide (``KeyError``). Every Qwen-style load asks.
    """
    with _STREAM_IMPORT_LOCK:
        seen = (sys.modules.get(STREAM_PACKAGE, _NOT_IMPORTED), tuple(sys.path))
        known = _stream_import.get("answer")
        if known is not None and known[0][0] is seen[0] and known[0][1] == seen[1]:
            return known[1]
        problem = _import_problem()
        _stream_import["answer"] = ((sys.modules.get(STREAM_PACKAGE, _NOT_IMPORTED), tuple(sys.path)), problem)
        return problem


def _import_problem() -> Optional[str]:
    try:
        importlib.import_module(STREAM_PACKAGE)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == STREAM_PACKAGE:
            return f"{STREAM_PACKAGE} is not installed"
        return f"{STREAM_PACKAGE} does not import: {error}"
    except ImportError as error:
        return f"{STREAM_PACKAGE} does not import: {error}"
    return None


def stream_generator_incompatibility() -> Optional[str]:
    """Why an importable ``transformers_stream_generator`` cannot stream with this transformers, or ``None``."""
    from transformers.generation.utils import GenerationMixin

    missing = [name for name in _STREAM_GENERATOR_NEEDS if not hasattr(GenerationMixin, name)]
    if not missing:
        return None
    names = ", ".join(f"GenerationMixin.{name}" for name in missing)
    return f"it imports, but it calls {names}, which this transformers no longer has"


def check_imports(check: Callable[..., Any], module: Any, filename: str) -> Any:
    """transformers' ``check_imports(filename)`` (``check``, of ``module``), without the lazily imported streaming
    package of a Qwen-style file while that package cannot be imported."""
    if not is_qwen_style_module(filename):
        return check(filename)
    problem = stream_generator_problem()
    if problem is None:
        return check(filename)
    missing = []
    with parsing():  # transformers' get_imports runs ast.parse: never beside this library's own parsing
        names = module.get_imports(filename)
    for name in names:
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


def _stream_unavailable(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    problem = stream_generator_problem() or stream_generator_incompatibility()
    if problem is None:
        return wrapped(*args, **kwargs)
    owner = type(instance).__qualname__ if instance is not None else "chat_stream"
    raise StreamingUnavailableError(
        f"{owner}.chat_stream() needs {STREAM_PACKAGE}, which cannot work here: {problem}. That package was "
        f"written for transformers <= 4.40 (installed: {installed_version('transformers')}): later releases "
        "removed generation internals it calls, and from 4.57 on it fails to import (BeamSearchScorer, "
        "DisjunctiveConstraint were removed). Use model.chat(...) instead, or stream with "
        "model.generate(..., streamer=transformers.TextIteratorStreamer(tokenizer))."
    )


def wrap_chat_stream(cls: type) -> list:
    """Makes a Qwen-style ``chat_stream()`` raise :class:`StreamingUnavailableError` while it cannot stream.

    Only for a class that defines ``chat_stream`` in a Qwen-style module; idempotent.

    Returns:
        `list[str]`: what was installed now.
    """
    if "chat_stream" not in cls.__dict__:
        return []
    module = sys.modules.get(getattr(cls, "__module__", ""))
    if not is_qwen_style_module(getattr(module, "__file__", None)):
        return []
    what = "StreamingUnavailableError while it cannot stream"
    if not registry.wrap(cls, "chat_stream", _stream_unavailable, group=REPAIRS, what=what):
        return []
    return [f"{cls.__qualname__}.chat_stream ({what})"]
