"""What old remote code relies on that transformers removed or changed since, with the old semantics.

Each fix goes on the remote-code classes of a loaded model (never on transformers' own classes), and only
where the class needs it, which is found by looking at the classes (never at the transformers version):

* ``get_head_mask`` (removed in 5.0): the Qwen v1 forward calls it on every step.
* ``GenerationMixin`` as a base of the generating class (5.x ``PreTrainedModel`` no longer inherits it).
  5.x's auto classes add it, to a subclass, on the first load only; a second ``from_pretrained`` of the same
  code in a process (a reload after ``save_pretrained``, the base model for ``PeftModel.from_pretrained``)
  gave a model without ``generate`` and without its ``generation_config``.
* Legacy tuple caches in ``generate``: up to 4.53 a model that did not set ``_supports_cache_class`` (no
  remote code of that era does) got no cache on the first step and its own tuple of ``(key, value)`` pairs
  after that. From 4.55 on ``generate`` hands it a ``DynamicCache``, which from 4.57 on is truthy while still
  empty, so the remote ``prepare_inputs_for_generation`` cuts the prompt to its last token; and the remote
  forward cannot index a 5.x cache (``past_key_values[0][0]``). The old answer, "no cache objects for this
  model", is given back on the class (``_supports_default_dynamic_cache``).
* The cache's keyword (5.24 renamed ``past_key_values`` to ``cache``): a ``prepare_inputs_for_generation``
  written for ``past_key_values`` gets the model's past under that name again, so that decoding uses it
  instead of recomputing the whole sequence at every step.
* Loaded weights left alone (5.0 until transformers protected remote code again): 5.0 runs the model's
  ``_init_weights`` on every module after loading and only guards ``torch.nn.init`` calls, so remote code that
  initialises in place (``module.weight.data.normal_()``) overwrote the checkpoint's weights with random ones.

Every fix is idempotent; :func:`restore_removed_apis` returns what it installed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
import wrapt

__all__ = ["REPLACEMENTS", "get_head_mask", "restore_auto_class", "restore_removed_apis"]

_INSTALLED_MARK = "_qcc_replacement"


# ------------------------------------------------------------------------------------- replacements


def get_head_mask(
    self: Any, head_mask: Optional[torch.Tensor], num_hidden_layers: int, is_attention_chunked: bool = False
) -> Any:
    """Removed in transformers 5.0: per-layer head masks, a list of ``None`` without a mask, else a tensor.

    Args:
        head_mask (`torch.Tensor`, *optional*):
            1.0 keeps a head, 0.0 masks it. Shape ``[num_heads]`` (the same for every layer) or
            ``[num_hidden_layers, num_heads]``; a 5-D mask is used as it is.
        num_hidden_layers (`int`):
            The number of layers the mask is for.
        is_attention_chunked (`bool`, *optional*, defaults to `False`):
            Adds a trailing axis, for attention computed in chunks.

    Returns:
        `list[None]` of length ``num_hidden_layers`` without a mask, else a tensor of shape
        ``[num_hidden_layers, 1, num_heads, 1, 1]`` (``[..., 1]`` more when chunked) in the model's dtype,
        whose ``[i]`` broadcasts over the ``[batch, heads, query, key]`` attention weights of layer ``i``.
    """
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if head_mask.dim() != 5:
        raise ValueError(
            f"head_mask must have 1 or 2 dimensions (or already 5), got shape {tuple(head_mask.shape)}"
        )
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


get_head_mask.__dict__[_INSTALLED_MARK] = True

#: name -> replacement, installed on the remote base class where the class does not have the name.
REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "get_head_mask": get_head_mask,
}


def _legacy_cache_only(cls: type) -> bool:
    """``GenerationMixin._supports_default_dynamic_cache`` for remote code that never declared Cache support.

    Returns:
        `bool`: always `False`, the answer transformers <= 4.53 gave every model without
        ``_supports_cache_class = True``: ``generate`` hands the model no cache object, so its first step gets
        ``past_key_values=None`` and every later step the tuple of ``(key, value)`` pairs the model returned.
    """
    return False


_legacy_cache_only.__dict__[_INSTALLED_MARK] = True


def _past_under_its_old_name(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper of a remote ``prepare_inputs_for_generation(input_ids, past_key_values=None, ...)``.

    transformers >= 5.24 passes the model's past as ``cache=``, a name this code does not know (it would land
    in ``**kwargs``, and the whole sequence would be recomputed at every step): it is passed on as
    ``past_key_values``.
    """
    if "cache" in kwargs and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
    return wrapped(*args, **kwargs)


def _make_loaded_weights_guard(inherited: Callable[..., Any]) -> Callable[..., Any]:
    def _initialize_weights(self: Any, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``_initialize_weights`` that leaves a module alone when all its parameters were loaded.

        transformers 5.0 marks every tensor it loads with ``_is_hf_initialized`` and then calls
        ``_init_weights`` on every module, guarding only ``torch.nn.init`` functions; remote code that writes
        in place (``module.weight.data.normal_()``) would overwrite the checkpoint's weights. As before 5.0
        (and again in later 5.x releases), a module whose parameters (its children's included, since remote
        ``_init_weights`` may reach into those) were all loaded is not initialised; anything else goes to
        transformers' ``_initialize_weights``.
        """
        parameters = list(module.parameters())
        if parameters and all(getattr(p, "_is_hf_initialized", False) for p in parameters):
            setattr(module, "_is_hf_initialized", True)  # noqa: B010 - a flag transformers reads
            return None
        return inherited(self, module, *args, **kwargs)

    _initialize_weights.__dict__[_INSTALLED_MARK] = True
    return _initialize_weights


# ------------------------------------------------------------------------------------------ detection


def _is_transformers_class(klass: type) -> bool:
    module = klass.__module__ or ""
    return module == "transformers" or module.startswith("transformers.")


def _remote_classes(cls: type) -> list:
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
        and not _is_transformers_class(klass)
    ]


def _defines(classes: list, name: str) -> bool:
    return any(name in klass.__dict__ for klass in classes)


def _parameters(function: Any) -> set:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def _generation_mixin() -> Optional[type]:
    try:
        from transformers.generation import GenerationMixin
    except ImportError:  # pragma: no cover - transformers < 4.26, where PreTrainedModel holds generate itself
        return None
    return GenerationMixin


# --------------------------------------------------------------------------------------- installers


def _restore_missing_methods(base: type) -> list:
    installed = []
    for name, function in REPLACEMENTS.items():
        if not hasattr(base, name):
            setattr(base, name, function)
            installed.append(name)
    return installed


def _restore_generation_mixin(classes: list) -> list:
    """Adds ``GenerationMixin`` to the bases of remote classes that generate but no longer inherit it."""
    mixin = _generation_mixin()
    if mixin is None:
        return []
    installed = []
    for klass in reversed(classes):  # the outermost first: its subclasses then inherit the mixin
        generates = "prepare_inputs_for_generation" in klass.__dict__ or "generate" in klass.__dict__
        if generates and not issubclass(klass, mixin):
            # What transformers does for native models (`class XForCausalLM(XPreTrainedModel,
            # GenerationMixin)`) and, on the first load only, for remote ones (on a subclass).
            klass.__bases__ = (*klass.__bases__, mixin)
            installed.append(f"{klass.__qualname__}(GenerationMixin)")
    return installed


def _restore_legacy_caches(classes: list, base: type) -> list:
    """Old remote code speaks legacy tuple caches: ``generate`` must hand it no cache object."""
    mixin = _generation_mixin()
    name = "_supports_default_dynamic_cache"
    if mixin is None or not hasattr(mixin, name) or _defines(classes, name):
        return []  # an older transformers only knows legacy caches; or the remote code decides itself
    if any(klass.__dict__.get("_supports_cache_class") for klass in classes):
        return []  # this remote code declared that it handles Cache objects
    setattr(base, name, classmethod(_legacy_cache_only))
    return [name]


def _restore_past_key_values_argument(classes: list) -> list:
    """``generate`` passes the past as ``cache=`` (5.24+): code that knows ``past_key_values`` gets it so."""
    mixin = _generation_mixin()
    generic = _parameters(getattr(mixin, "prepare_inputs_for_generation", None))
    if "cache" not in generic or "past_key_values" in generic:
        return []
    installed = []
    for klass in classes:
        function = klass.__dict__.get("prepare_inputs_for_generation")
        if function is None or isinstance(function, wrapt.FunctionWrapper):
            continue
        parameters = _parameters(function)
        if "past_key_values" in parameters and "cache" not in parameters:
            wrapt.wrap_function_wrapper(klass, "prepare_inputs_for_generation", _past_under_its_old_name)
            installed.append(f"{klass.__qualname__}.prepare_inputs_for_generation(cache -> past_key_values)")
    return installed


def _protect_loaded_weights(classes: list, base: type) -> list:
    """5.0 re-initialised loaded weights through an in-place remote ``_init_weights`` (see the module doc)."""
    from transformers import PreTrainedModel

    inherited = getattr(PreTrainedModel, "_initialize_weights", None)
    if inherited is None or "is_remote_code" in _parameters(inherited):
        return []  # no such step, or transformers protects remote code itself
    try:  # 5.x: loaded tensors carry `_is_hf_initialized`; only torch.nn.init functions are guarded
        from transformers.initialization import guard_torch_init_functions  # noqa: F401
    except ImportError:
        return []  # 4.x: fully loaded modules are flagged and skipped by transformers itself
    if not _defines(classes, "_init_weights") or _defines(classes, "_initialize_weights"):
        return []
    setattr(base, "_initialize_weights", _make_loaded_weights_guard(inherited))  # noqa: B010
    return ["_initialize_weights"]


def restore_auto_class(model: Any) -> list[str]:
    """Records the auto class of a remote model whose class has none, from ``config.auto_map``.

    ``save_pretrained`` copies the remote-code files next to the weights only when the class knows the auto
    class it was loaded through; transformers 4.45-4.52 did not record it, so a saved folder (a Trainer
    checkpoint, say) could not be loaded again.

    Returns:
        `list[str]`: what was recorded now (empty when nothing was missing).
    """
    cls = type(model)
    if getattr(cls, "_auto_class", None) is not None or not _remote_classes(cls):
        return []
    auto_map = getattr(getattr(model, "config", None), "auto_map", None) or {}
    for auto_class, reference in auto_map.items():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if auto_class.startswith("AutoModel") and isinstance(reference, str) and reference.split(".")[-1] == cls.__name__:
            cls.register_for_auto_class(auto_class)
            return [f"{cls.__qualname__}._auto_class = {auto_class!r}"]
    return []


def restore_removed_apis(cls: type) -> list[str]:
    """Gives the remote-code classes of ``cls`` what they rely on and this transformers removed or changed.

    Args:
        cls (`type`): a loaded model class from remote code. Pass the most derived class (``type(model)``):
            the generation fixes go on the classes that define ``prepare_inputs_for_generation``, the others
            on the outermost remote class (``QWenPreTrainedModel``).

    Returns:
        `list[str]`: what was installed now (empty when nothing was missing, e.g. on a second call).
    """
    classes = _remote_classes(cls)
    if not classes:
        return []  # a transformers class: never touched
    base = classes[-1]
    installed = _restore_missing_methods(base)
    installed += _restore_generation_mixin(classes)
    installed += _restore_legacy_caches(classes, base)
    installed += _restore_past_key_values_argument(classes)
    installed += _protect_loaded_weights(classes, base)
    return installed
