"""Exceptions and warnings raised by qwen-ckpt-compat.

Every exception also subclasses the builtin that callers already catch (``TypeError`` for the wrong kind of
object, ``ValueError`` for a model that cannot do what was asked), in the way peft's errors do.
"""

from __future__ import annotations

__all__ = [
    "CompatError",
    "CompatWarning",
    "CheckpointingNotSupportedError",
    "StreamingUnavailableError",
    "UnsupportedModelError",
    "UnsupportedTorchError",
]


class CompatError(Exception):
    """Base class of every error raised by qwen-ckpt-compat."""


class UnsupportedModelError(CompatError, TypeError):
    """The object passed is not a transformers ``PreTrainedModel`` (or a peft model around one)."""


class CheckpointingNotSupportedError(CompatError, ValueError):
    """The model cannot checkpoint activations (``supports_gradient_checkpointing`` is false)."""


class UnsupportedTorchError(CompatError, RuntimeError):
    """The installed torch lacks a feature that was asked for; the message names the torch release needed."""


class StreamingUnavailableError(CompatError, ImportError):
    """``chat_stream()`` needs ``transformers_stream_generator``, which cannot work with this transformers."""


class CompatWarning(UserWarning):
    """Something that was asked for cannot be honoured; the message says what happens instead."""
