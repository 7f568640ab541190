"""The chunked cross-entropy for remote LM heads that compute their own loss (opt-in: ``chunked_loss=``).

Qwen v1's ``QWenLMHeadModel.forward`` computes the logits of every token (``[tokens, vocab]``: 2.5 GB in bf16
for 8,192 tokens and Qwen's 151,936-word vocabulary), a shifted ``.contiguous()`` copy of them, and the
cross-entropy, whose backward pass holds a float32 softmax of the same size. At long sequences that is the
largest transient of a training step after the blocks.

With ``prepare_for_lora(model, chunked_loss=True)`` (or a number of tokens per chunk) a training forward that is
given ``labels`` computes the same loss without ever holding those logits:

* the model's own transformer (``model.transformer`` for Qwen) runs with every argument the remote forward would
  pass it, and returns the final hidden states;
* :class:`ChunkedLinearCrossEntropy` computes, chunk of tokens by chunk of tokens, the head's logits (in the dtype
  the head would compute them in, autocast included), the cross-entropy's sum in float32 and the number of
  labels that count (``-100`` is ignored, as the remote code's ``F.cross_entropy`` does), and keeps only the hidden
  states, the head's weight and the labels. Its backward pass recomputes each chunk's logits and accumulates the
  gradient of the hidden states, and that of the head's weight only when the head requires one (frozen under
  LoRA: then none is computed).

Where Liger-Kernel is installed and the hidden states live on a CUDA device, its fused linear cross-entropy does
the same computation instead (``pip install qwen-ckpt-compat[liger]``; never required).

What changes for the caller: a chunked step returns ``logits=None`` (``Trainer`` reads only the loss), unless
``keep_logits=True``, which returns the logits too, computed in the same pass but detached from the graph (for
metrics: TRL's token accuracy reads them). The loss is float32 (the remote code's is the logits' dtype where no
autocast is on). Every other call runs the remote forward unchanged: no ``labels``, eval mode, no grad
(``generate``, ``chat``, ``Trainer``'s evaluation), a head that is not a plain ``nn.Linear`` without bias (LoRA or
``modules_to_save`` on the head, a quantised head), or a forward that takes an argument its transformer does not.

Only the LM-head classes listed in :data:`LOSS_LAYOUTS` get it: those whose forward is exactly
``head(transformer(...)[0])``, the shifted mean cross-entropy with ``ignore_index=-100`` in the logits' dtype,
and a ``CausalLMOutputWithPast`` (Qwen v1, Qwen-VL, InternLM v1). ChatGLM2/3 (sequence-first, a float32 cross-
entropy and a ``return_last_logit`` path) and Baichuan2 (a ``NormHead`` and a z-loss) keep their own loss.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .._detection import own_class
from .._model_state import existing_state, state_of
from ..errors import CompatWarning

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "IGNORE_INDEX",
    "LOSS_LAYOUTS",
    "ChunkedLinearCrossEntropy",
    "ChunkedLoss",
    "LossLayout",
    "chunked_cross_entropy",
    "chunked_loss_forward",
    "set_chunked_loss",
]

#: Tokens per chunk for ``chunked_loss=True``: for Qwen's vocabulary a chunk's float32 softmax is 0.58 GiB.
DEFAULT_CHUNK_TOKENS = 1024
#: The label the remote code's ``F.cross_entropy`` ignores (its default).
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class LossLayout:
    """Where an LM-head model keeps the parts of its loss.

    Attributes:
        owner (`str`): the attribute holding its transformer, whose output's first element is the hidden states.
        head (`str`): the attribute holding the output projection (an ``nn.Linear`` without bias).
    """

    owner: str
    head: str


#: LM-head classes (by name, as the remote code defines them) whose forward computes
#: ``head(owner(...)[0])`` and the shifted mean cross-entropy exactly as described above.
LOSS_LAYOUTS: dict = {
    "QWenLMHeadModel": LossLayout(owner="transformer", head="lm_head"),  # Qwen v1, Qwen-VL
    "InternLMForCausalLM": LossLayout(owner="model", head="lm_head"),  # InternLM v1 (LLaMA-style)
}


@dataclasses.dataclass(frozen=True)
class ChunkedLoss:
    """The chunked loss's settings on one model.

    Attributes:
        tokens (`int`): tokens per chunk.
        keep_logits (`bool`): also return the logits (detached) of a chunked step.
    """

    tokens: int
    keep_logits: bool = False


def set_chunked_loss(
    model: torch.nn.Module, tokens: Optional[int], keep_logits: bool, wrap: Callable[[type, str, Callable], None]
) -> bool:
    """Turns the chunked loss on (``tokens`` per chunk) or off (``None``) for ``model``.

    ``wrap(cls, name, wrapper)`` installs the class-level wrapper of the LM-head class's ``forward`` once (the
    model's patch registry, so that ``unpatch`` removes it).

    Returns:
        `bool`: whether ``model``'s class computes its loss in a way this module knows (see :data:`LOSS_LAYOUTS`).
    """
    cls = own_class(model)
    if cls.__name__ not in LOSS_LAYOUTS:
        return False
    if tokens is not None:
        wrap(cls, "forward", chunked_loss_forward)
        state_of(model).chunked_loss = ChunkedLoss(tokens, keep_logits)
    else:
        existing = existing_state(model)
        if existing is not None:
            existing.chunked_loss = None
    return True


# ------------------------------------------------------------------------------------------- the wrapper


@functools.lru_cache(maxsize=None)
def _signature(function: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return None


@functools.lru_cache(maxsize=None)
def _passes_through(outer: Callable, inner: Callable) -> bool:
    """Whether every argument of the LM head's ``outer`` forward but ``labels`` and ``return_dict`` is one of
    its transformer's ``inner`` forward (else the remote forward uses it itself, and runs unchanged)."""
    outer_signature, inner_signature = _signature(outer), _signature(inner)
    if outer_signature is None or inner_signature is None:
        return False
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(p.kind in kinds for p in outer_signature.parameters.values()):
        return False
    names = set(outer_signature.parameters) - {"self", "labels", "return_dict"}
    return "return_dict" in inner_signature.parameters and names <= set(inner_signature.parameters)


def _plain_head(head: Any) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None


def chunked_loss_forward(wrapped: Callable, instance: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for the LM-head class's ``forward``: the chunked loss in a training step with labels."""
    state = existing_state(instance)
    settings = state.chunked_loss if state is not None else None
    if settings is None or not instance.training or not torch.is_grad_enabled():
        return wrapped(*args, **kwargs)
    layout = LOSS_LAYOUTS.get(own_class(instance).__name__)
    owner = getattr(instance, layout.owner, None) if layout is not None else None
    head = getattr(instance, layout.head, None) if layout is not None else None
    outer = getattr(wrapped, "__func__", wrapped)
    signature = _signature(outer)
    if owner is None or head is None or not _plain_head(head) or not _passes_through(outer, type(owner).forward):
        return wrapped(*args, **kwargs)
    assert signature is not None  # _passes_through read it
    try:
        bound = signature.bind(instance, *args, **kwargs)
    except TypeError:
        return wrapped(*args, **kwargs)  # the remote forward raises its own error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    labels = arguments.pop("labels")
    if labels is None:
        return wrapped(*args, **kwargs)
    return_dict = arguments.pop("return_dict")
    if return_dict is None:  # what the remote code reads, `config.use_return_dict` (deprecated in 5.x)
        config = instance.config
        return_dict = bool(getattr(config, "return_dict", True)) and not getattr(config, "torchscript", False)
    outputs = owner(**arguments, return_dict=return_dict)
    hidden = outputs[0]
    loss, logits = chunked_cross_entropy(
        hidden, head.weight, labels.to(hidden.device), settings.tokens, keep_logits=settings.keep_logits
    )
    if not return_dict:
        return (loss, logits, *tuple(outputs[1:]))
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The cache's field is `cache` from 5.24 on (`past_key_values` is a deprecated alias there).
    cache = "cache" if "cache" in _field_names(CausalLMOutputWithPast) else "past_key_values"
    past = getattr(outputs, "cache" if "cache" in _field_names(type(outputs)) else "past_key_values", None)  # type: ignore[arg-type]
    fields: dict[str, Any] = {"loss": loss, "logits": logits, cache: past}
    return CausalLMOutputWithPast(**fields, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> frozenset:
    return frozenset(field.name for field in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else frozenset()


# ------------------------------------------------------------------------------------------ the loss


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The next-token cross-entropy of ``hidden @ weight.T`` against ``labels``, without the whole logits.

    The same loss as ``F.cross_entropy(logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten())`` with
    ``logits = F.linear(hidden, weight)`` (mean over the labels that are not ``-100``), computed ``chunk_tokens``
    tokens at a time, forward and backward; Liger-Kernel's fused kernel where it is installed and ``hidden`` is on
    a CUDA device (and ``keep_logits`` is off).

    Args:
        hidden (`torch.Tensor` of shape `(batch, tokens, hidden)`):
            The final hidden states.
        weight (`torch.Tensor` of shape `(vocab, hidden)`):
            The output projection's weight; it gets a gradient only if it requires one.
        labels (`torch.LongTensor` of shape `(batch, tokens)`):
            The input ids as labels (not shifted), ``-100`` where no loss is wanted.
        chunk_tokens (`int`, *optional*, defaults to 1024):
            Tokens per chunk.
        keep_logits (`bool`, *optional*, defaults to `False`):
            Also return the logits of every token, `(batch, tokens, vocab)`, detached from the graph.

    Returns:
        `tuple(torch.Tensor, Optional[torch.Tensor])`: the float32 loss, and the logits or `None`.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]  # the last token of each row predicts nothing
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = shifted.reshape(-1)
    dtype = _logits_dtype(flat_hidden, weight)
    if not keep_logits and flat_hidden.is_cuda:
        fused = _liger_loss()
        if fused is not None:
            return fused(weight.to(dtype), flat_hidden.to(dtype), flat_labels).float(), None
    loss, logits = ChunkedLinearCrossEntropy.apply(flat_hidden, weight, flat_labels, chunk_tokens, dtype, keep_logits)
    return loss, (logits.view(*hidden.shape[:-1], weight.shape[0]) if keep_logits else None)


def _logits_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here (autocast included): one token's product tells."""
    with torch.no_grad():
        return F.linear(hidden[:1], weight[:1]).dtype


def _no_autocast(device: torch.device) -> Any:
    return torch.autocast(device_type=device.type, enabled=False)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean(cross_entropy(hidden @ weight.T, labels))`` over the labels that are not ``-100``, by chunks of rows.

    Forward: ``(hidden [rows, h], weight [vocab, h], labels [rows], chunk_tokens, dtype, keep_logits)`` ->
    ``(loss, logits)``; the logits (``[rows, vocab]`` in ``dtype``, no gradient) only with ``keep_logits``, else an
    empty tensor. Saves only its three tensor inputs; the backward pass recomputes each chunk's logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        dtype: torch.dtype,
        keep_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logits_out = hidden.new_empty((rows, weight.shape[0]) if keep_logits else (0,), dtype=dtype)
        with _no_autocast(hidden.device):
            head = weight.to(dtype)
            for start in range(0, rows, chunk_tokens):
                end = min(start + chunk_tokens, rows)
                logits = F.linear(hidden[start:end].to(dtype), head)
                if keep_logits:
                    logits_out[start:end] = logits
                total += F.cross_entropy(logits.float(), labels[start:end], ignore_index=IGNORE_INDEX, reduction="sum")
                del logits
        count = (labels != IGNORE_INDEX).sum()
        ctx.save_for_backward(hidden, weight, labels, count)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        ctx.mark_non_differentiable(logits_out)
        return total / count, logits_out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_logits: Any) -> tuple:  # type: ignore[override]
        hidden, weight, labels, count = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        if not (needs_hidden or needs_weight):
            return None, None, None, None, None, None
        dtype, chunk_tokens = ctx.dtype, ctx.chunk_tokens
        scale = grad_loss.float() / count
        with _no_autocast(hidden.device):
            head = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, hidden.shape[0])
                chunk = hidden[start:end].to(dtype)
                target = labels[start:end]
                counted = target != IGNORE_INDEX
                # d(sum of -log softmax[target]) / d logits = softmax - one_hot(target), on counted rows only.
                grad = torch.softmax(F.linear(chunk, head).float(), dim=-1)
                grad.scatter_add_(1, target.masked_fill(~counted, 0).unsqueeze(1), -counted.float().unsqueeze(1))
                grad.mul_((counted.float() * scale).unsqueeze(1))
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad @ head).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad.t() @ chunk).float()
                del grad
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


# ------------------------------------------------------------------------------------------ Liger-Kernel


@functools.lru_cache(maxsize=None)
def _liger_loss() -> Optional[Callable[..., torch.Tensor]]:
    """Liger-Kernel's fused linear cross-entropy as ``f(weight, hidden, labels) -> mean loss``, or ``None``."""
    try:
        module = importlib.import_module("liger_kernel.transformers.fused_linear_cross_entropy")
        loss = module.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "liger_kernel":
            _warn_liger_unusable(error)  # installed, but something it imports is missing (triton)
        return None  # not installed (an optional extra): the library's own chunked loss
    except Exception as error:  # noqa: BLE001 - a broken install must not break training; it is reported
        _warn_liger_unusable(error)
        return None

    def fused(weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        result = loss(weight, hidden, labels)
        if isinstance(result, tuple):  # (loss, z_loss) in releases that can return the z-loss
            result = result[0]
        return getattr(result, "loss", result)

    return fused


def _warn_liger_unusable(error: BaseException) -> None:
    warnings.warn(
        f"chunked_loss: Liger-Kernel is installed but cannot be used here ({type(error).__name__}: "
        f"{(str(error).splitlines() or [''])[0][:200]}); the library's own chunked loss runs instead.",
        CompatWarning,
        stacklevel=4,
    )
