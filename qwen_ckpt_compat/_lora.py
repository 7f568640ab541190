"""The one-call entry point: ``model = prepare_for_lora(model)``."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable, Optional, Union

from ._class_patch import (
    checkpoint_settings,
    checkpointing_defaults,
    disable_routed_checkpointing,
    enable_routed_checkpointing,
    is_patched,
    is_routable,
    set_checkpointing_defaults,
    set_chunked_loss,
    set_fused_attention,
)
from ._detection import unwrap_model
from ._hooks import speed_hooks
from ._input_grads import has_live_input_grads_hook
from ._preparation import patch
from ._remote_code import hard_coded_use_reentrant
from ._repairs._classes import is_transformers_class
from ._settings import (
    DEFAULT_CHECKPOINT_KWARGS,
    CheckpointRequest,
    reentrancy_of,
    validate_bool,
    validate_checkpoint_kwargs,
    without_context_fn,
)
from ._versions import capabilities
from .errors import CheckpointingNotSupportedError, CompatWarning

__all__ = ["prepare_for_lora"]


def prepare_for_lora(
    model: Any,
    *,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[Mapping[str, Any]] = None,
    every_n_layers: int = 1,
    offload: bool = False,
    memory_budget: Union[int, str, None] = None,
    selective: bool = False,
    fused_attention: Optional[bool] = None,
    chunked_loss: Union[bool, int] = False,
    keep_logits: bool = False,
) -> Any:
    """Gets a model ready for LoRA training with gradient checkpointing, on any transformers release.

    For old remote-code models (Qwen v1 and others whose ``_set_gradient_checkpointing`` takes
    ``(module, value)``) this patches the model's classes (see :func:`qwen_ckpt_compat.patch`), makes the
    given options the model's default for later enable calls that express no preference (``Trainer`` re-enables
    checkpointing itself), and enables checkpointing. Native transformers models are handed to transformers'
    own ``gradient_checkpointing_enable`` with the same options. In both cases, when the checkpointing in effect
    is reentrant, the input embeddings' output is made to require grad so that gradients reach adapters behind a
    frozen base. ``config.use_cache`` is left as it is, so that a saved model generates with its cache: while
    blocks are checkpointed in training the cache is off anyway (the blocks' owner, or transformers, turns it off).

    Works before or after ``peft.get_peft_model``; calling it again is harmless (no second hook, no double
    wrapping; the latest options win).

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            The model to prepare; it is changed in place and returned.
        use_gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            Enable gradient checkpointing now. With `False` checkpointing is **off** afterwards, also where the
            model turned it on by itself while it was being built (Baichuan2's config does); old remote-code
            models are still patched and given the defaults, so that a later ``gradient_checkpointing_enable()``
            or ``Trainer(gradient_checkpointing=True)`` works as asked.
        gradient_checkpointing_kwargs (`dict`, *optional*):
            Keyword arguments for ``torch.utils.checkpoint.checkpoint``. Without ``use_reentrant`` the
            non-reentrant variant is used (reentrant for old remote code with bitsandbytes 8-bit layers). Not
            given: no preference. The checkpointing already in effect on the model is kept (enabled by a
            framework's own helper, ``Trainer``, the user, or the options of an earlier ``prepare_for_lora``), a
            framework's own checkpoint function included; with nothing in effect, `{"use_reentrant": False}`
            (reentrant for old remote code with bitsandbytes 8-bit layers).
        every_n_layers (`int`, *optional*, defaults to 1):
            Checkpoint decoder blocks ``0, n, 2n, ...`` only and keep the activations of the others: less
            recomputation for more memory. Honoured for old remote-code models on every release, and for
            native models where transformers supports it (5.16+); a warning says when it cannot be.
        offload (`bool`, *optional*, defaults to `False`):
            Keep the block inputs saved for the recompute in (pinned) host memory instead of on the accelerator;
            on CUDA the copies run on a side stream, overlapped with compute, each input fetched one block ahead of
            its recompute. Same support as ``every_n_layers``.
        memory_budget (`int` or `str`, *optional*):
            A peak-memory budget on the accelerator, in bytes or as a string (``"70GiB"``, ``"80GB"``). Which
            decoder blocks are checkpointed (and whether their inputs are offloaded) is then planned from the first
            training step of each batch shape, to fit the budget with the least recompute; ``memory_plan(model)``
            shows the plan (see docs/performance.md). Old remote-code models only; not with ``every_n_layers`` or
            ``offload``, which the plan decides.
        selective (`bool`, *optional*, defaults to `False`):
            Selective recompute (torch >= 2.5, non-reentrant checkpoint only): checkpointed blocks keep the outputs
            of their attention kernel and projections and recompute everything else. On CUDA the kept outputs
            live in pinned host memory (about 0.65 GiB per Qwen-7B block at 8,192 tokens), copied while the
            forward goes on: at 8,192 tokens the step is 0.86x full checkpointing's at the same GPU peak (H200).
            At short sequences it is slower (1.5x at 2,048 tokens); see ``qwen_ckpt_compat.speed.selective``.
        fused_attention (`bool`, *optional*):
            Let Qwen v1's attention use SDPA's fused causal (flash) kernel where its mask is purely causal (no
            padding, no KV cache); everywhere else its own masked path runs. Same attention up to rounding; see
            ``qwen_ckpt_compat.speed.attention``. Not given: on in training calls (module in training mode, no KV
            cache, no attention dropout), so that evaluation, ``generate`` and ``chat()`` run the remote code's
            own path; no warning where the model has no attention of a known kind. `True`: also in inference calls
            and with attention dropout (warns where it cannot apply). `False`: off.
        chunked_loss (`bool` or `int`, *optional*, defaults to `False`):
            In a training forward given ``labels``, compute the LM head and the cross-entropy by chunks of tokens
            (`True`: 1,024 tokens; an `int`: that many), recomputing each chunk's logits in the backward pass,
            so that the whole ``[tokens, vocab]`` logits never exist. Same loss and gradients up to rounding (the
            cross-entropy is computed in float32). The step's output then has ``logits=None`` (unless
            ``keep_logits``). Liger-Kernel's fused kernel is used where it is installed and the model is on CUDA.
            Qwen v1, Qwen-VL and InternLM v1; other models warn and keep their own loss. See
            ``qwen_ckpt_compat.speed.loss``.
        keep_logits (`bool`, *optional*, defaults to `False`):
            With ``chunked_loss``: also return the logits of a chunked step, computed in the same pass but
            detached (no gradient flows through them; for metrics such as token accuracy). Costs the memory of
            the whole logits again.

    Returns:
        The same ``model``.

    Raises:
        `UnsupportedModelError` (a `TypeError`): ``model`` is not a transformers model or a peft model around one.
        `TypeError` / `ValueError`: an option has the wrong type or value.
        `CheckpointingNotSupportedError` (a `ValueError`): checkpointing was asked of a model that cannot do it.
        `UnsupportedTorchError` (a `RuntimeError`): ``selective=True`` on torch < 2.5.

    Example:

    ```python
    >>> from qwen_ckpt_compat import prepare_for_lora  # first: before from_pretrained (4.57+ and 5.x)
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import LoraConfig, get_peft_model

    >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-7B-Chat", trust_remote_code=True)
    >>> model = prepare_for_lora(model)
    >>> model = get_peft_model(model, LoraConfig(target_modules=["c_attn", "c_proj", "w1", "w2"]))
    ```
    """
    root = unwrap_model(model)
    validate_bool("use_gradient_checkpointing", use_gradient_checkpointing)
    request = _validated_request(gradient_checkpointing_kwargs, every_n_layers, offload)
    request = _with_speed_options(root, request, memory_budget, selective, fused_attention)
    loss_tokens = _validated_chunked_loss(chunked_loss, keep_logits)
    if use_gradient_checkpointing and not getattr(root, "supports_gradient_checkpointing", False):
        raise CheckpointingNotSupportedError(
            f"{type(root).__qualname__} (from {type(root).__module__}) does not support gradient checkpointing "
            "(its `supports_gradient_checkpointing` is False); pass use_gradient_checkpointing=False to prepare "
            "it without checkpointing."
        )
    kept = None  # a checkpoint function in effect whose kwargs cannot be read (a framework's own): kept as is
    if request.kwargs is None:
        # No preference: what is in effect stays. Selective recompute and a memory budget are built on the
        # library's own checkpoint, so with them nothing in effect is looked up.
        planned = request.selective or request.memory_budget is not None
        in_effect = None if planned else _checkpointing_in_effect(root)
        if isinstance(in_effect, dict):
            request = replace(request, kwargs=in_effect)
        else:
            # Nothing in effect, or a function: old remote code gets no kwargs, so that the patch picks the mode
            # for the model (non-reentrant; reentrant with bitsandbytes 8-bit layers); native, the library default.
            kept = in_effect
    if is_routable(root):
        patch(root)
        set_checkpointing_defaults(root, request)
        _set_fused_attention(root, fused_attention)
        _set_chunked_loss(root, chunked_loss, loss_tokens, keep_logits)
        if use_gradient_checkpointing:
            enable_routed_checkpointing(root, function=kept)
            if kept is not None and offload:
                _warn_kept(root, kept, "offload=True")
        else:
            disable_routed_checkpointing(root)
    elif use_gradient_checkpointing:
        request = replace(request, kwargs={**DEFAULT_CHECKPOINT_KWARGS, **(request.kwargs or {})})
        native_request = _native_request(root, request, fused_attention, chunked_loss)
        if kept is None:
            _call_enable(root, native_request)
            _warn_hard_coded_mode(root, (request.kwargs or {}).get("use_reentrant"))
        elif every_n_layers != 1 or offload:
            _warn_kept(root, kept, f"every_n_layers={every_n_layers}, offload={offload}")
        reentrant = _native_is_reentrant(request) if kept is None else reentrancy_of(kept) is not False
        if reentrant and not has_live_input_grads_hook(root):
            root.enable_input_require_grads()
    elif any(getattr(module, "gradient_checkpointing", False) is True for module in root.modules()):
        getattr(root, capabilities().enable_method_name.replace("enable", "disable"))()
    return model


def _validated_request(kwargs: Any, every_n_layers: Any, offload: Any) -> CheckpointRequest:
    # A dict without `use_reentrant` expresses no preference on the mode: the patch picks it for an old remote-code
    # model, the library default applies to a native one. No dict at all is no preference whatsoever: resolved
    # against the model by prepare_for_lora.
    kwargs = validate_checkpoint_kwargs(kwargs)
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
    return CheckpointRequest(kwargs=kwargs, every_n_layers=every_n_layers, offload=validate_bool("offload", offload))


def _with_speed_options(
    root: Any,
    request: CheckpointRequest,
    memory_budget: Union[int, str, None],
    selective: bool,
    fused_attention: Optional[bool],
) -> CheckpointRequest:
    """Validates ``memory_budget``, ``selective`` and ``fused_attention``; adds the first two to ``request``."""
    validate_bool("selective", selective)
    if fused_attention is not None:
        validate_bool("fused_attention", fused_attention)
    if memory_budget is not None and (request.every_n_layers != 1 or request.offload):
        speed_hooks().validate(root, memory_budget, False)  # an unreadable budget is reported first
        raise ValueError(
            "memory_budget plans which blocks to checkpoint and whether to offload; leave every_n_layers and "
            f"offload at their defaults (got every_n_layers={request.every_n_layers}, offload={request.offload})"
        )
    if selective and request.kwargs and request.kwargs.get("use_reentrant"):
        raise ValueError(
            "selective recompute works with the non-reentrant checkpoint only; drop use_reentrant=True from "
            "gradient_checkpointing_kwargs"
        )
    budget = speed_hooks().validate(root, memory_budget, selective)
    return replace(request, memory_budget=budget, selective=selective or None)


#: Tokens per chunk for ``chunked_loss=True`` (the speed wing's ``DEFAULT_CHUNK_TOKENS``; the core cannot import it).
DEFAULT_CHUNK_TOKENS = 1024


def _validated_chunked_loss(chunked_loss: Any, keep_logits: Any) -> Optional[int]:
    """Tokens per chunk (``None``: off), from ``chunked_loss`` (a bool or a positive int)."""
    validate_bool("keep_logits", keep_logits)
    if isinstance(chunked_loss, bool):
        return DEFAULT_CHUNK_TOKENS if chunked_loss else None
    if not isinstance(chunked_loss, int):
        raise TypeError(
            f"chunked_loss must be a bool or a number of tokens per chunk (int), got {type(chunked_loss).__name__}: "
            f"{chunked_loss!r:.60}"
        )
    if chunked_loss < 1:
        raise ValueError(f"chunked_loss must be a positive number of tokens per chunk, got {chunked_loss}")
    return chunked_loss


def _set_chunked_loss(root: Any, chunked_loss: Any, tokens: Optional[int], keep_logits: bool) -> None:
    if not set_chunked_loss(root, tokens, keep_logits) and tokens is not None:
        warnings.warn(
            f"chunked_loss={chunked_loss!r}: {type(root).__qualname__} computes its loss in a way this library does not "
            "chunk (it knows Qwen v1's, Qwen-VL's and InternLM v1's: ChatGLM's is sequence-first in float32, "
            "Baichuan2's has a NormHead and a z-loss); its forward runs unchanged.",
            CompatWarning,
            stacklevel=3,
        )


def _set_fused_attention(root: Any, fused_attention: Optional[bool]) -> None:
    # Not given: on for training forwards, silently where nothing is known. True: also inference, and a warning.
    mode = None if fused_attention is False else ("always" if fused_attention else "training")
    if set_fused_attention(root, mode) == 0 and fused_attention:
        warnings.warn(
            f"fused_attention=True: {type(root).__qualname__} has no attention module of a kind this library knows "
            "(Qwen v1's QWenAttention); its attention runs unchanged.",
            CompatWarning,
            stacklevel=3,
        )


def _native_request(
    root: Any, request: CheckpointRequest, fused_attention: Optional[bool], chunked_loss: Any
) -> CheckpointRequest:
    """The request for a native model: selective recompute goes in as ``context_fn``; the rest is not ours to do."""
    options = (
        ("memory_budget", request.memory_budget),
        ("fused_attention", fused_attention),  # not given (None): no warning
        ("chunked_loss", chunked_loss),
    )
    ignored = [name for name, value in options if value]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)}: only for old remote-code models; {type(root).__qualname__} uses transformers' own "
            "checkpointing, attention and loss, unchanged.",
            CompatWarning,
            stacklevel=3,
        )
    if request.selective:
        return replace(request, kwargs={**(request.kwargs or {}), "context_fn": speed_hooks().selective_context()})
    return request


def _call_enable(root: Any, request: CheckpointRequest) -> None:
    """Calls the installed transformers' enable method with the options its signature takes."""
    enable = getattr(root, capabilities().enable_method_name)
    parameters = inspect.signature(enable).parameters
    arguments: dict = {}
    unsupported = []
    kwargs_name = next((name for name in parameters if name.endswith("checkpointing_kwargs")), None)
    if kwargs_name is not None:
        arguments[kwargs_name] = request.kwargs
    else:
        unsupported.append(f"gradient_checkpointing_kwargs={request.kwargs}")
    for name, value, default in (("every_n_layers", request.every_n_layers, 1), ("offload", request.offload, False)):
        if value == default:
            continue
        if name in parameters:
            arguments[name] = value
        else:
            unsupported.append(f"{name}={value}")
    if unsupported:
        warnings.warn(
            f"transformers {capabilities().transformers}'s {type(root).__qualname__}.{enable.__name__}() does not take "
            f"{', '.join(unsupported)}; transformers' own behaviour applies instead (every layer, reentrant "
            "checkpointing where no kwargs can be given).",
            CompatWarning,
            stacklevel=3,
        )
    enable(**arguments)


def _native_is_reentrant(request: CheckpointRequest) -> bool:
    if capabilities().checkpointing_kwargs:
        return bool(request.kwargs and request.kwargs["use_reentrant"])
    return True  # no kwargs on this release: torch's default, which is reentrant


def _checkpointing_in_effect(root: Any) -> Union[dict, Callable, None]:
    """What ``root`` checkpoints with now, for a ``prepare_for_lora`` call that expresses no preference.

    Returns the kwargs for ``torch.utils.checkpoint.checkpoint``, or the checkpoint function itself when its
    kwargs cannot be read (a framework's own wrapper); ``None`` when nothing is in effect. Checkpointing that
    is on comes first, then the defaults an earlier ``prepare_for_lora`` stored.
    """
    flagged = [module for module in root.modules() if module.__dict__.get("gradient_checkpointing")]
    if is_routable(root):
        if flagged and not is_patched(root):
            # Enabled the old way before the patch (a framework's helper, transformers' fallback): the remote
            # code's own checkpoint call, which passes no kwargs, so torch's default, reentrant, is in effect.
            return {"use_reentrant": True}
        settings = checkpoint_settings(root) if flagged else None
        if settings is not None:
            return without_context_fn(settings.kwargs) if settings.kwargs is not None else settings.function
        defaults = checkpointing_defaults(root)
        return without_context_fn(defaults.kwargs) if defaults is not None and defaults.kwargs is not None else None
    functions = (m.__dict__["_gradient_checkpointing_func"] for m in flagged if "_gradient_checkpointing_func" in m.__dict__)
    function = next(functions, None)
    if function is None:
        return None  # off, or transformers <= 4.34, which stores no function (and takes no kwargs)
    if isinstance(function, functools.partial) and _is_transformers_checkpoint(function.func):
        # What transformers builds: partial(checkpoint or its offloading wrapper, **kwargs). Without
        # `use_reentrant` torch's default mode, reentrant, is in effect.
        return {"use_reentrant": True, **without_context_fn(function.keywords)}
    return function


def _is_transformers_checkpoint(function: Any) -> bool:
    """torch's checkpoint itself, or a wrapper defined by transformers (the 5.17+ offloading one)."""
    module = getattr(function, "__module__", None) or ""
    if module == "torch.utils.checkpoint":
        return getattr(function, "__name__", None) == "checkpoint"
    return module.split(".")[0] == "transformers"


def _warn_hard_coded_mode(root: Any, use_reentrant: Any) -> None:
    """Warns when remote code left to transformers writes another ``use_reentrant`` into its own checkpoint calls.

    transformers flags such code's modules and hands them its checkpoint function, but code that calls torch's
    ``checkpoint`` itself with a literal mode (GLM-4-9B's latest revision: ``use_reentrant=False``) never uses it.
    """
    if not isinstance(use_reentrant, bool) or is_transformers_class(type(root)):
        return
    module = sys.modules.get(type(root).__module__)
    hard_coded = hard_coded_use_reentrant(getattr(module, "__file__", None)) if module is not None else frozenset()
    if hard_coded and use_reentrant not in hard_coded:
        warnings.warn(
            f"{type(root).__qualname__} (from {type(root).__module__}) is left to transformers "
            f"{capabilities().transformers} (it has neither the old `_set_gradient_checkpointing(module, "
            f"value)` nor an enable method of its own), and its code calls torch's checkpoint itself with "
            f"use_reentrant={sorted(hard_coded)[0]}: use_reentrant={use_reentrant} cannot be honoured.",
            CompatWarning,
            stacklevel=3,
        )


def _warn_kept(root: Any, function: Callable, options: str) -> None:
    warnings.warn(
        f"{type(root).__qualname__} already checkpoints through {getattr(function, '__qualname__', repr(function))}, "
        f"set up before (by a framework's own helper?); without gradient_checkpointing_kwargs it is kept as it is, "
        f"so {options} cannot be applied. Pass gradient_checkpointing_kwargs to replace it.",
        CompatWarning,
        stacklevel=3,
    )
