"""Construction and weights: what 5.x's way of building and loading a model does to 2023 remote code.

* Loaded weights left alone (5.0 until transformers protected remote code again): 5.0 runs the model's
  ``_init_weights`` on every module after loading and only guards ``torch.nn.init`` calls, so remote code that
  initialises in place (``module.weight.data.normal_()``) overwrote the checkpoint's weights with random ones.
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
* A causal-LM head meant to be tied to the input embeddings by default only (no ``tie_word_embeddings`` in the
  config, no ``_tied_weights_keys``): 5.x leaves it untied and initialised at random; it is tied after loading,
  as before 5.0 (:func:`tie_output_embeddings`).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch

from .._patches import registry
from ..errors import CompatWarning
from ._classes import (
    INSTALLED_MARK,
    LOADING,
    REPAIRS,
    defines,
    parameters,
    remote_classes,
    remote_package_modules,
)

__all__ = [
    "protect_loaded_weights",
    "record_construction",
    "recompute_non_persistent_buffers",
    "repair_after_loading",
    "tie_output_embeddings",
]


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

    _initialize_weights.__dict__[INSTALLED_MARK] = True
    return _initialize_weights

def protect_loaded_weights(classes: list, base: type) -> list:
    """5.0 re-initialised loaded weights through an in-place remote ``_init_weights`` (see the module doc)."""
    from transformers import PreTrainedModel

    inherited = getattr(PreTrainedModel, "_initialize_weights", None)
    if inherited is None or "is_remote_code" in parameters(inherited):
        return []  # no such step, or transformers protects remote code itself
    try:  # 5.x: loaded tensors carry `_is_hf_initialized`; only torch.nn.init functions are guarded
        from transformers.initialization import guard_torch_init_functions  # noqa: F401
    except ImportError:
        return []  # 4.x: fully loaded modules are flagged and skipped by transformers itself
    if not defines(classes, "_init_weights") or defines(classes, "_initialize_weights"):
        return []
    guard = _make_loaded_weights_guard(inherited)
    if not registry.set(base, "_initialize_weights", guard, group=REPAIRS, what="loaded weights left alone (5.0)"):
        return []
    return ["_initialize_weights"]

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
    for module in remote_package_modules(cls):
        for value in list(vars(module).values()):
            if not (isinstance(value, type) and issubclass(value, torch.nn.Module)) or issubclass(value, PreTrainedModel):
                continue
            if value.__module__ != module.__name__:
                continue  # imported from elsewhere: wrapped where it is defined, if it is remote code
            if "__init__" not in value.__dict__:
                continue
            if registry.wrap(value, "__init__", _record_arguments, group=REPAIRS, what="records its arguments"):
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
        with LOADING:  # one remote model loads at a time (see LOADING)
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
    if not registry.wrap(cls, "from_pretrained", _after_loading(repair), group=REPAIRS, what="repairs after loading"):
        return []
    return [f"{cls.__qualname__}.from_pretrained (repairs after loading)"]


def _declares_tied_weights(model: torch.nn.Module) -> bool:
    """Whether the model's classes declare tied weights themselves (5.x ties those through its own machinery)."""
    return any(getattr(type(module), "_tied_weights_keys", None) for module in model.modules())


def tie_output_embeddings(model: Any) -> list[str]:
    """Ties a remote model's output embeddings to its input embeddings where transformers before 5.0 did.

    Before 5.0, ``tie_weights()`` tied ``get_output_embeddings()`` to ``get_input_embeddings()`` whenever
    ``config.tie_word_embeddings`` was true, and ``PretrainedConfig`` made it ``True`` where ``config.json`` did not
    say. 5.x ties only what a class declares in ``_tied_weights_keys`` (and reads ``tie_word_embeddings`` without
    that default): a 2023 causal LM with neither loads with its head initialised at random, silently, even when the
    checkpoint holds no head. Detected on the loaded model: its classes declare no tied weights, its config does
    not say ``tie_word_embeddings=False``, both embeddings exist with one shape and are not tied. On releases that
    tied them nothing is left to do. A head that the checkpoint holds and that differs from the input embeddings is
    replaced all the same (as before 5.0, which tied them), with a warning.

    Returns:
        `list[str]`: what was tied now.
    """
    if not remote_classes(type(model)) or _declares_tied_weights(model):
        return []
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return []
    try:
        output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    head, source = getattr(output, "weight", None), getattr(inputs, "weight", None)
    if not isinstance(head, torch.nn.Parameter) or not isinstance(source, torch.nn.Parameter):
        return []
    if head is source or head.shape != source.shape or source.device.type == "meta":
        return []
    names = {id(parameter): name for name, parameter in model.named_parameters(remove_duplicate=False)}
    head_name, source_name = names.get(id(head), "output embeddings"), names.get(id(source), "input embeddings")
    if getattr(head, "_is_hf_initialized", False) and head.device.type != "meta" and not torch.equal(head.to(source.device), source):
        warnings.warn(
            f"{type(model).__qualname__}: the checkpoint holds its own {head_name}, which differs from {source_name}; "
            "its config does not say `tie_word_embeddings=False`, so transformers before 5.0 tied them (to the input "
            "embeddings) and qwen-ckpt-compat does the same. Set `tie_word_embeddings: false` in config.json to keep "
            "the checkpoint's head.",
            CompatWarning,
            stacklevel=2,
        )
    output.weight = source
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied[head_name] = source_name  # 5.x's record of tied weights (save_pretrained writes the source once)
    return [f"{head_name} tied to {source_name} (pre-5.0 default)"]
