"""The fused causal attention kernel for Qwen v1's remote attention (on by default in training calls).

Qwen v1's attention calls ``torch.nn.functional.scaled_dot_product_attention`` with an explicit mask: a boolean
causal mask, or, when a padding mask is given (``Trainer``'s collators always give one), the additive padding
mask expanded to ``(batch, 1, q, q)`` with the causal part filled in. An explicit mask rules out the flash
kernel, which only does the causal pattern itself (``is_causal=True``); at 8,192 tokens that is the difference
between Qwen v1 and a native Qwen2 model of the same shape.

With the kernel on, an attention call whose mask can only be the causal pattern runs SDPA with
``attn_mask=None, is_causal=True`` instead. That is the case when

* no KV cache is in play (``layer_past`` is ``None``), so queries and keys line up (the mask is ``q x q``);
* the padding mask is absent or masks nothing (its additive form is all zeros: an all-ones ``attention_mask``);
* the mask SDPA receives has the causal pattern. That is checked on its values the first time a mask of a given
  shape, dtype and device is seen (one comparison and one host sync), and trusted for the same shape afterwards.

A padding mask that masks nothing is then not passed to the remote attention at all (where the call's SDPA is
rewritten: no active attention dropout in the default mode): the remote code then builds only its boolean causal
mask, not the ``(batch, 1, q, q)`` additive one (2 GiB in bf16 at 32,768 tokens, written in every block's forward
and recompute), for a call that runs as ``is_causal`` either way.

Every other call (a padded batch, generation with a cache, ``output_attentions``, the flash-attn package's own
path) runs the remote code unchanged. ``prepare_for_lora`` turns the kernel on by default for *training* calls
only (the module in training mode, keeping no KV cache) without attention dropout (another kernel draws other dropout
masks): evaluation, ``generate`` and ``chat()`` keep the remote code's own path, bit for bit.
``fused_attention=True`` also lets inference calls and attention dropout use it (a prompt without padding);
``fused_attention=False`` turns it off. Nothing process-wide is touched: the rewrite lives in a
``TorchFunctionMode`` entered only around the forward of an opted-in attention module, and it rewrites only the
SDPA call with that mask; the class-level ``__call__`` wrapper is installed and removed with the model's patch
(:func:`qwen_ckpt_compat.patch` / :func:`~qwen_ckpt_compat.unpatch`), through the patch registry.

The result is mathematically the same attention (masked scores get zero weight either way), computed by a
different kernel: the numbers agree to rounding, not bit for bit (float32 on the CPU: outputs and LoRA gradients
within 1e-6 of the masked path on the tiny Qwen v1 and Qwen-VL models, tests/test_attention.py).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .._checkpoint_layer import compiling
from .._model_state import existing_state, state_of

__all__ = ["ALWAYS", "ATTENTION_CLASS_NAMES", "TRAINING", "attention_modules", "fused_attention_call", "set_fused_attention"]

#: Remote attention classes whose SDPA mask is known (Qwen v1, Qwen-VL and Qwen-Audio share it).
ATTENTION_CLASS_NAMES: tuple[str, ...] = ("QWenAttention",)

_SDPA = torch.nn.functional.scaled_dot_product_attention
# (shape, dtype, device) of the masks checked to hold the causal pattern, and the answer.
_CHECKED_MASKS: dict = {}


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` whose mask this module knows, in model order."""
    return [module for module in model.modules() if type(module).__name__ in ATTENTION_CLASS_NAMES]


#: When the fused kernel may run: in training calls only (the default), or in every call it is exact for.
TRAINING, ALWAYS = "training", "always"


def set_fused_attention(
    model: torch.nn.Module, mode: Optional[str], wrap: Callable[[type, str, Callable], None]
) -> int:
    """Turns the fused kernel on or off for the attention modules of ``model``; returns how many there are.

    Args:
        model (`torch.nn.Module`): the model.
        mode (`str`, *optional*): ``"training"`` (calls of a module in training mode that keep no KV cache: what
            ``prepare_for_lora`` does by default), ``"always"`` (also inference: ``fused_attention=True``), or
            ``None`` (off).
        wrap (`Callable`): ``wrap(cls, name, wrapper)`` installs a class-level wrapper once (the model's patch
            registry, so that ``unpatch`` removes it).
    """
    if mode not in (None, TRAINING, ALWAYS):
        raise ValueError(f"fused attention mode must be None, {TRAINING!r} or {ALWAYS!r}, got {mode!r}")
    modules = attention_modules(model)
    for module in modules:
        if mode is not None:
            wrap(type(module), "__call__", fused_attention_call)
        state = state_of(module) if mode is not None else existing_state(module)
        if state is not None:
            state.fused_attention = mode
    return len(modules)


# ------------------------------------------------------------------------------------------- the wrapper


def fused_attention_call(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for the attention's ``__call__``: the causal SDPA rewrite, where it is exact."""
    state = existing_state(instance)
    mode = state.fused_attention if state is not None else None
    if mode is None or (mode == TRAINING and not _training_call(instance, args, kwargs)):
        return wrapped(*args, **kwargs)
    if compiling():
        # Its mask checks read tensor data: under torch.compile that breaks the graph inside the checkpointed
        # block, and the compiled model then keeps every activation. The masked call is compiled as it is.
        return wrapped(*args, **kwargs)
    forward = type(instance).forward
    if not _mask_can_only_be_causal(forward, args, kwargs):
        return wrapped(*args, **kwargs)
    if mode == ALWAYS or not _drops_out(instance):
        # The padding mask masks nothing: without it the remote code builds no (q x q) additive mask (at 32,768
        # tokens 2 GiB in bf16, built in every block's forward and recompute) for a call that ends as `is_causal`.
        args, kwargs = _replaced(forward, args, kwargs, "attention_mask", None)
    with _CausalAttention(allow_dropout=mode == ALWAYS):
        return wrapped(*args, **kwargs)


def _drops_out(module: torch.nn.Module) -> bool:
    """Whether a dropout layer of the attention module is active (then the default mode leaves its SDPA call as
    it is, and its mask must stay the remote code's)."""
    return any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in module.modules())


def _replaced(forward: Callable, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the argument ``name`` of ``forward`` set to ``value`` (where it was given)."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    names = _parameter_names(forward)
    if name in names and names.index(name) < len(args):
        index = names.index(name)
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, kwargs


def _training_call(instance: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """A call of a training step: the module in training mode, with grad or keeping no KV cache.

    Grad mode cannot tell: reentrant checkpointing runs a block's forward without grad (and its recompute with it),
    so a block's forward and its recompute would take different kernels; ``generate`` (``chat()`` too) keeps a
    cache, also in training mode (``chat()`` straight after ``trainer.train()``).
    """
    if not instance.training:
        return False
    # A forward with grad is a training step's, whether or not it returns its keys and values (a model trained
    # without checkpointing keeps `use_cache` from its config); without grad, only one that keeps no cache is
    # (the forward of a block under reentrant checkpointing, which the block owner runs with `use_cache=False`).
    return torch.is_grad_enabled() or not _argument(type(instance).forward, args, kwargs, "use_cache")


@functools.lru_cache(maxsize=None)
def _parameter_names(forward: Callable) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(forward).parameters)[1:]  # without `self`
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return ()


def _argument(forward: Callable, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    names = _parameter_names(forward)
    if name in names and names.index(name) < len(args):
        return args[names.index(name)]
    return None


def _mask_can_only_be_causal(forward: Callable, args: tuple, kwargs: dict) -> bool:
    if _argument(forward, args, kwargs, "layer_past") is not None:
        return False
    if _argument(forward, args, kwargs, "output_attentions"):
        return False
    mask = _argument(forward, args, kwargs, "attention_mask")
    return mask is None or (isinstance(mask, torch.Tensor) and _masks_nothing(mask))


# The padding mask is the same tensor for every block of a forward (and for the recompute of a checkpointed
# block): one check per forward, by identity and version.
_LAST_PADDING_MASK: list = [None, -1, False]  # weakref, version, answer


def _masks_nothing(mask: torch.Tensor) -> bool:
    """Whether an additive padding mask is all zeros (every position may be attended to)."""
    ref, version, answer = _LAST_PADDING_MASK
    if ref is not None and ref() is mask and version == mask._version:
        return answer
    answer = not bool(torch.count_nonzero(mask))
    _LAST_PADDING_MASK[:] = [weakref.ref(mask), mask._version, answer]
    return answer


class _CausalAttention(TorchFunctionMode):
    """Within one attention forward: the SDPA call whose mask is the causal pattern gets ``is_causal=True``.

    With ``allow_dropout=False`` (the default mode) a call with attention dropout is left alone: another kernel
    draws other dropout masks, so its result would differ by more than rounding.
    """

    def __init__(self, allow_dropout: bool = True) -> None:
        super().__init__()
        self.allow_dropout = allow_dropout

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            rewritten = _causal_arguments(args, kwargs, allow_dropout=self.allow_dropout)
            if rewritten is not None:
                return func(*rewritten[0], **rewritten[1])
        return func(*args, **kwargs)


_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _causal_arguments(args: tuple, kwargs: dict, allow_dropout: bool = True) -> Optional[tuple[tuple, dict]]:
    """SDPA's arguments with the mask replaced by ``is_causal=True``, or ``None`` when that would not be exact
    (or, without ``allow_dropout``, when the call drops attention weights out)."""
    bound = dict(zip(_SDPA_PARAMETERS, args))
    bound.update(kwargs)
    query, key, mask = bound.get("query"), bound.get("key"), bound.get("attn_mask")
    if bound.get("is_causal") or not all(isinstance(t, torch.Tensor) for t in (query, key, mask)):
        return None
    if not allow_dropout and bound.get("dropout_p"):
        return None
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(mask, torch.Tensor)
    length = query.shape[-2]
    if key.shape[-2] != length or mask.dim() > 4 or tuple(mask.shape[-2:]) != (length, length):
        return None
    if not _is_causal_pattern(mask):
        return None
    bound["attn_mask"] = None
    bound["is_causal"] = True
    return (bound.pop("query"), bound.pop("key"), bound.pop("value")), bound


def _is_causal_pattern(mask: torch.Tensor) -> bool:
    """Whether ``mask`` lets each query see exactly the keys at or before it (checked once per shape)."""
    signature = (tuple(mask.shape), mask.dtype, mask.device)
    if signature not in _CHECKED_MASKS:
        length = mask.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril().expand(mask.shape)
        if mask.dtype == torch.bool:
            answer = torch.equal(mask, causal)
        elif mask.is_floating_point():
            # Allowed scores get 0 added; the others at most the dtype's minimum (or -inf): zero weight either way.
            blocked = mask <= torch.finfo(mask.dtype).min
            answer = torch.equal(mask == 0, causal) and torch.equal(blocked, ~causal)
        else:
            answer = False
        _CHECKED_MASKS[signature] = answer
    return _CHECKED_MASKS[signature]
