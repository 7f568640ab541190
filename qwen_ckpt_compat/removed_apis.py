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
* Position ids of the tokens fed: later 5.x ``generate`` builds ``position_ids`` for the whole sequence and
  hands them to every step; a ``prepare_inputs_for_generation`` that passes ``position_ids`` on (LLaMA-era:
  InternLM's) cut only those it computed itself, so the last token came with every position. The positions
  returned are cut to the ids returned.
* Loaded weights left alone (5.0 until transformers protected remote code again): 5.0 runs the model's
  ``_init_weights`` on every module after loading and only guards ``torch.nn.init`` calls, so remote code that
  initialises in place (``module.weight.data.normal_()``) overwrote the checkpoint's weights with random ones.

On the remote **config** classes (:func:`restore_config_attributes`):

* The generation defaults ``PretrainedConfig`` carried before 5.0 (``max_length=20``, ``num_beams=1``, ...):
  ChatGLM2/3 reads ``config.max_length`` while the model is built. They are answered, where the config has no
  such attribute, by a ``__getattr__`` on the remote config class, never stored on the instance, so that 5.x's
  checks for generation parameters in a model config (``save_pretrained``, ``generate``) do not see them.
* ``use_cache`` given to ``PretrainedConfig.__init__`` (from ``config.json``): 5.x drops it as a generation
  parameter, so a config class that does not set it itself (ChatGLM2/3's) has none; it is kept, as before 5.0.

On the model's **construction** (:func:`record_construction`, :func:`recompute_non_persistent_buffers`):

* Non-persistent buffers computed in ``__init__`` (rotary tables: InternLM's ``inv_freq``, ``cos_cached``,
  ``sin_cached``). 5.x builds the model on the meta device and then gives every non-persistent buffer, which no
  checkpoint holds, uninitialised memory (``torch.empty_like``); native models recompute theirs in
  ``_init_weights``, remote code of 2023 does not, and its forward then reads garbage (InternLM: a NaN loss).
  The arguments each such module was built with are recorded when it is built; after loading, a fresh copy is
  built from them (on the CPU, outside the meta device) and every non-persistent buffer that differs from what
  ``__init__`` computes is replaced. On releases that build models on a real device nothing differs and
  nothing is replaced.
* Tensors computed in ``__init__`` and kept as plain attributes (Baichuan2-7B's rotary tables): 5.x leaves them
  on the meta device, where the forward cannot use them; they get the fresh copy's values, on the CPU.
* ``post_init()`` never called: 5.x's ``from_pretrained`` reads state that ``post_init`` records
  (``all_tied_weights_keys``), and ChatGLM2/3's model classes never call it (4.x did not need it). Where the
  finished model lacks that state, ``post_init()`` is run once at the end of its construction.

Every fix is idempotent; :func:`restore_removed_apis` returns what it installed.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import wrapt

__all__ = [
    "PRE_5_CONFIG_DEFAULTS",
    "REPLACEMENTS",
    "get_head_mask",
    "record_construction",
    "recompute_non_persistent_buffers",
    "repair_after_loading",
    "restore_auto_class",
    "restore_config_attributes",
    "restore_removed_apis",
]

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


def _positions_of_the_tokens_fed(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper of a remote ``prepare_inputs_for_generation`` that passes ``position_ids`` on as it gets them.

    ``generate`` of later 5.x releases builds ``position_ids`` for the whole sequence itself and hands them to every
    step, relying on the model's ``prepare_inputs_for_generation`` to keep those of the new tokens; code written
    when ``generate`` passed none (LLaMA-era: it cuts only the ids it computes itself from the attention mask)
    fed a whole sequence of positions with the last token alone. The positions returned are cut to the ids
    returned: the last ``input_ids.shape[-1]`` of them.
    """
    inputs = wrapped(*args, **kwargs)
    ids, positions = inputs.get("input_ids"), inputs.get("position_ids")
    if isinstance(ids, torch.Tensor) and isinstance(positions, torch.Tensor) and positions.shape[-1] > ids.shape[-1]:
        inputs = dict(inputs)
        inputs["position_ids"] = positions[..., -ids.shape[-1] :]
    return inputs


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


def _code_names(function: Any) -> set:
    """Every global and attribute name a function's code (nested functions included) refers to."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    names: set = set()
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return names


def _remote_code_uses(cls: type, name: str) -> bool:
    """Whether the remote code ``cls`` comes from refers to ``name`` (read off the byte code of its classes)."""
    for module in _remote_package_modules(cls):
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == module.__name__:
                if any(name in _code_names(member) for member in vars(value).values()):
                    return True
    return False


def _restore_missing_methods(base: type) -> list:
    installed = []
    for name, function in REPLACEMENTS.items():
        if not hasattr(base, name) and _remote_code_uses(base, name):
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
        if function is None or _INSTALLED_MARK in getattr(function, "__dict__", {}) or hasattr(function, "__wrapped__"):
            continue
        parameters = _parameters(function)
        if "past_key_values" in parameters and "cache" not in parameters:
            wrapt.wrap_function_wrapper(klass, "prepare_inputs_for_generation", _past_under_its_old_name)
            installed.append(f"{klass.__qualname__}.prepare_inputs_for_generation(cache -> past_key_values)")
    return installed


def _passes_position_ids_on(function: Any) -> bool:
    """Whether a ``prepare_inputs_for_generation`` reads ``position_ids`` (a parameter, or from ``kwargs``)."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return code is not None and ("position_ids" in code.co_varnames or "position_ids" in code.co_consts)


def _restore_position_ids_of_new_tokens(classes: list) -> list:
    """``generate`` hands whole-sequence ``position_ids`` to every step (later 5.x): keep those of the tokens fed."""
    mixin = _generation_mixin()
    if mixin is None or not hasattr(mixin, "_prepare_position_ids_for_generation"):
        return []  # generate passes no position_ids of its own
    installed = []
    for klass in classes:
        function = klass.__dict__.get("prepare_inputs_for_generation")
        if function is None or not _passes_position_ids_on(function):
            continue
        if any(getattr(w, "_self_wrapper", None) is _positions_of_the_tokens_fed for w in _wrappers(function)):
            continue
        wrapt.wrap_function_wrapper(klass, "prepare_inputs_for_generation", _positions_of_the_tokens_fed)
        installed.append(f"{klass.__qualname__}.prepare_inputs_for_generation (position_ids of the tokens fed)")
    return installed


def _wrappers(function: Any) -> list:
    """The chain of wrapt wrappers around ``function``, outermost first."""
    chain = []
    while isinstance(function, wrapt.ObjectProxy):
        chain.append(function)
        function = function.__wrapped__
    return chain


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


# What `post_init()` records and `from_pretrained` reads (5.x); its absence after construction means post_init never ran.
_POST_INIT_STATE = "all_tied_weights_keys"


def _post_init_after_construction(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """The remote class's ``__init__``: runs ``post_init()`` at the end where the remote code never called it."""
    result = wrapped(*args, **kwargs)
    outermost = inspect.getattr_static(type(instance), "__init__", None)
    is_outermost = getattr(outermost, "__wrapped__", None) is getattr(wrapped, "__func__", wrapped)
    if instance is not None and is_outermost and _POST_INIT_STATE not in vars(instance):
        instance.post_init()
    return result


def _restore_post_init(classes: list) -> list:
    """``post_init()`` for remote classes whose construction never calls it, where loading depends on it."""
    from transformers import PreTrainedModel

    if _POST_INIT_STATE not in _code_names(PreTrainedModel.post_init) or hasattr(PreTrainedModel, _POST_INIT_STATE):
        return []  # this release's loading does not read anything post_init records
    builder = next((klass for klass in classes if "__init__" in klass.__dict__), None)
    if builder is None or isinstance(builder.__dict__["__init__"], wrapt.FunctionWrapper):
        return []
    if "post_init" in _code_names(builder.__dict__["__init__"]):
        return []  # the remote code calls it itself
    wrapt.wrap_function_wrapper(builder, "__init__", _post_init_after_construction)
    return [f"{builder.__qualname__}.__init__ (+ post_init())"]


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
    installed += _restore_position_ids_of_new_tokens(classes)
    installed += _protect_loaded_weights(classes, base)
    installed += _restore_post_init(classes)
    return installed


# ------------------------------------------------------------------------------------ config classes

#: What ``PretrainedConfig.__init__`` gave every config before 5.0 (transformers 4.55.4's generation defaults),
#: plus ``use_cache``, which config classes of that era received from ``config.json`` and GenerationConfig
#: defaults to ``True``. Served only for names the installed ``PretrainedConfig`` no longer carries.
PRE_5_CONFIG_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "use_cache": True,
}
_KEPT_FROM_INIT = ("use_cache",)
_MISSING = object()


def _dropped_config_defaults() -> dict:
    """The names of :data:`PRE_5_CONFIG_DEFAULTS` a fresh ``PretrainedConfig`` no longer has, with their values."""
    from transformers import PretrainedConfig

    fresh = PretrainedConfig()
    return {name: value for name, value in PRE_5_CONFIG_DEFAULTS.items() if not hasattr(fresh, name)}


def _is_remote_config_class(cls: type) -> bool:
    from transformers import PretrainedConfig

    return isinstance(cls, type) and issubclass(cls, PretrainedConfig) and not _is_transformers_class(cls)


def _served_name(config: Any, name: str) -> bool:
    """``name`` is answered by the library's ``__getattr__`` (neither the instance nor its class has it)."""
    return name not in vars(config) and inspect.getattr_static(type(config), name, _MISSING) is _MISSING


def _make_config_getattr(served: dict, inherited: Optional[Callable]) -> Callable:
    def __getattr__(self: Any, name: str) -> Any:
        """Answers the attributes ``PretrainedConfig`` carried before 5.0 with their old defaults."""
        if name in served:
            return served[name]
        if inherited is not None:
            return inherited(self, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    __getattr__.__dict__[_INSTALLED_MARK] = True
    return __getattr__


def _without_served_defaults(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``_get_generation_parameters`` that does not count the old defaults answered by ``__getattr__``."""
    found = wrapped(*args, **kwargs)
    return {name: value for name, value in found.items() if not _served_name(instance, name)}


def _keep_init_values(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """The remote config's ``__init__``: ``use_cache`` given to it stays on the config, as before 5.0."""
    result = wrapped(*args, **kwargs)
    for name in _KEPT_FROM_INIT:
        if name in kwargs and name not in vars(instance):
            setattr(instance, name, kwargs[name])
    return result


def restore_config_attributes(cls: type) -> list[str]:
    """Gives a remote config class the attributes ``PretrainedConfig`` carried before 5.0 (see the module doc).

    Detected: only the names a fresh ``PretrainedConfig`` of the installed transformers lacks are answered, and
    only on remote config classes (never on transformers' own). Idempotent.

    Args:
        cls (`type`): a config class loaded from remote code.

    Returns:
        `list[str]`: what was installed now.
    """
    if not _is_remote_config_class(cls) or _INSTALLED_MARK in getattr(cls.__dict__.get("__getattr__"), "__dict__", {}):
        return []  # a transformers class, or done already
    served = _dropped_config_defaults()
    if not served:
        return []  # this PretrainedConfig still carries every one of them
    installed = []
    inherited = getattr(cls, "__getattr__", None)
    setattr(cls, "__getattr__", _make_config_getattr(served, inherited))  # noqa: B010 - a dunder on the class
    installed.append(f"{cls.__qualname__}.__getattr__({', '.join(sorted(served))})")
    if hasattr(cls, "_get_generation_parameters"):
        wrapt.wrap_function_wrapper(cls, "_get_generation_parameters", _without_served_defaults)
        installed.append(f"{cls.__qualname__}._get_generation_parameters (without the served defaults)")
    if "__init__" in cls.__dict__ and any(name in served for name in _KEPT_FROM_INIT):
        wrapt.wrap_function_wrapper(cls, "__init__", _keep_init_values)
        installed.append(f"{cls.__qualname__}.__init__ (keeps {', '.join(_KEPT_FROM_INIT)})")
    return installed


# ---------------------------------------------------------------------------------------- construction

# module -> (args, kwargs) it was built with, for the modules of remote code that register buffers in __init__.
_RECIPES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _plain_tensors(module: torch.nn.Module) -> dict:
    """Tensors a module holds as plain attributes (neither parameters nor buffers)."""
    return {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)}


def _record_arguments(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    if instance is None or not (getattr(instance, "_non_persistent_buffers_set", None) or _plain_tensors(instance)):
        return result
    # Only the outermost __init__ of the instance's class knows the arguments that build it again (a parent's
    # __init__, reached through super(), gets the parent's arguments).
    outermost = inspect.getattr_static(type(instance), "__init__", None)
    if getattr(outermost, "__wrapped__", None) is getattr(wrapped, "__func__", wrapped):
        _RECIPES[instance] = (args, dict(kwargs))
    return result


def _remote_package_modules(cls: type) -> list:
    """The modules of the remote-code package ``cls`` was loaded from (``transformers_modules.<repo>...``)."""
    package = cls.__module__.rpartition(".")[0]
    return [module for name, module in list(sys.modules.items()) if module is not None and name.rpartition(".")[0] == package]


def record_construction(cls: type) -> list[str]:
    """Records the arguments remote modules that compute tensors in ``__init__`` are built with.

    Wraps the ``__init__`` of every ``torch.nn.Module`` class of the remote-code package of ``cls`` (not the
    ``PreTrainedModel`` classes); an instance left with non-persistent buffers or plain tensor attributes has its
    arguments recorded, so that :func:`recompute_non_persistent_buffers` can build a fresh copy after loading.
    Idempotent.

    Returns:
        `list[str]`: the classes wrapped now.
    """
    from transformers import PreTrainedModel

    installed = []
    for module in _remote_package_modules(cls):
        for value in list(vars(module).values()):
            if not (isinstance(value, type) and issubclass(value, torch.nn.Module)) or issubclass(value, PreTrainedModel):
                continue
            if value.__module__ != module.__name__:
                continue  # imported from elsewhere: wrapped where it is defined, if it is remote code
            init = value.__dict__.get("__init__")
            if init is None or isinstance(init, wrapt.FunctionWrapper):
                continue
            wrapt.wrap_function_wrapper(value, "__init__", _record_arguments)
            installed.append(f"{value.__qualname__}.__init__")
    return installed


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``dtype`` as torch's default inside (as ``from_pretrained`` builds a model), where torch accepts it."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
    except (TypeError, ValueError):
        pass  # not a default torch takes (an older torch and a half type): the previous default it is
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def recompute_non_persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Gives every non-persistent buffer of ``model`` the value its module's ``__init__`` computes.

    Only modules whose construction was recorded (:func:`record_construction`) are looked at. For each, a
    fresh copy is built from the recorded arguments on the CPU (with the model's dtype as the default, as
    ``from_pretrained`` builds models), and each of its non-persistent buffers that differs from the model's
    (5.x leaves them uninitialised after a meta-device load) is replaced, on the buffer's device and in its dtype.
    A tensor held as a plain attribute and left on the meta device (5.x built it there; Baichuan2-7B's rotary
    tables are such) gets the fresh value, on the CPU where ``__init__`` put it before 5.0.

    Returns:
        `list[str]`: the names of the tensors replaced (empty where loading left them right).
    """
    replaced = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    for name, module in model.named_modules():
        recipe = _RECIPES.get(module)
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if module._buffers.get(n) is not None]
        on_meta = [n for n, tensor in _plain_tensors(module).items() if tensor.device.type == "meta"]
        if recipe is None or not (names or on_meta):
            continue
        args, kwargs = recipe
        with torch.device("cpu"), _default_dtype(dtype):
            fresh = type(module)(*args, **kwargs)
        for attribute in on_meta:
            value = vars(fresh).get(attribute)
            if isinstance(value, torch.Tensor) and value.shape == vars(module)[attribute].shape:
                module.__dict__[attribute] = value
                replaced.append(f"{name}.{attribute}" if name else attribute)
        for buffer_name in names:
            current = module._buffers[buffer_name]
            expected = fresh._buffers.get(buffer_name)
            if expected is None or expected.shape != current.shape:
                continue
            expected = expected.to(device=current.device, dtype=current.dtype)
            if current.device.type != "meta" and torch.equal(current, expected):
                continue
            module._buffers[buffer_name] = expected
            replaced.append(f"{name}.{buffer_name}" if name else buffer_name)
    return replaced


def _after_loading(repair: Callable[[Any], Any]) -> Callable:
    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        loaded = wrapped(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        if isinstance(model, torch.nn.Module):
            repair(model)
        return loaded

    return wrapper


def repair_after_loading(cls: type, repair: Callable[[Any], Any]) -> list[str]:
    """Wraps ``cls.from_pretrained`` so that ``repair(model)`` runs on every model it loads. Idempotent.

    The per-model repairs (non-persistent buffers, above all) need the finished model; ``from_pretrained`` of
    the remote class is the one place every release goes through after loading the weights.

    Returns:
        `list[str]`: what was installed now.
    """
    if isinstance(cls.__dict__.get("from_pretrained"), wrapt.FunctionWrapper):
        return []
    wrapt.wrap_function_wrapper(cls, "from_pretrained", _after_loading(repair))
    return [f"{cls.__qualname__}.from_pretrained (repairs after loading)"]
