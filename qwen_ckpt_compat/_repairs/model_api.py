"""Methods old remote code calls that transformers removed, and what loading expects of a finished model.

* ``get_head_mask`` (removed in 5.0): the Qwen v1 forward calls it on every step. It is put back on the
  outermost remote class where the remote code refers to it.
* ``post_init()`` never called: 5.x's ``from_pretrained`` reads state that ``post_init`` records
  (``all_tied_weights_keys``), and ChatGLM2/3's model classes never call it (4.x did not need it). Where the
  finished model lacks that state, ``post_init()`` is run once at the end of its construction.
* The auto class of a remote model (4.45-4.52 did not record it): ``save_pretrained`` copies the remote-code
  files only when the class knows it.
* ``accepts_loss_kwargs = False`` where the remote ``forward`` takes no extra keyword arguments (Trainer 4.46+
  passes ``num_items_in_batch`` to a ``forward`` with a ``**`` parameter, which BLOOM-era code raises on).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, Callable, Optional

import torch

from .._patches import registry
from ._classes import INSTALLED_MARK, REPAIRS, code_names, remote_classes, remote_code_uses

__all__ = [
    "REPLACEMENTS",
    "declare_loss_kwargs",
    "get_head_mask",
    "restore_auto_class",
    "restore_missing_methods",
    "restore_post_init",
]


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

get_head_mask.__dict__[INSTALLED_MARK] = True

#: name -> replacement, installed on the remote base class where the class does not have the name.
REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "get_head_mask": get_head_mask,
}

def restore_missing_methods(base: type) -> list:
    installed = []
    for name, function in REPLACEMENTS.items():
        if not hasattr(base, name) and remote_code_uses(base, name):
            if registry.set(base, name, function, group=REPAIRS, what=f"{name} (removed in transformers 5.0)"):
                installed.append(name)
    return installed

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

def restore_post_init(classes: list) -> list:
    """``post_init()`` for remote classes whose construction never calls it, where loading depends on it."""
    from transformers import PreTrainedModel

    if _POST_INIT_STATE not in code_names(PreTrainedModel.post_init) or hasattr(PreTrainedModel, _POST_INIT_STATE):
        return []  # this release's loading does not read anything post_init records
    builder = next((klass for klass in classes if "__init__" in klass.__dict__), None)
    if builder is None or "post_init" in code_names(inspect.unwrap(builder.__dict__["__init__"])):
        return []  # nothing to wrap, or the remote code calls it itself
    if not registry.wrap(builder, "__init__", _post_init_after_construction, group=REPAIRS, what="+ post_init()"):
        return []
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
    if getattr(cls, "_auto_class", None) is not None or not remote_classes(cls):
        return []
    auto_map = getattr(getattr(model, "config", None), "auto_map", None) or {}
    for auto_class, reference in auto_map.items():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if auto_class.startswith("AutoModel") and isinstance(reference, str) and reference.split(".")[-1] == cls.__name__:
            cls.register_for_auto_class(auto_class)
            return [f"{cls.__qualname__}._auto_class = {auto_class!r}"]
    return []


def _rejects_extra_keywords(forward: Callable) -> bool:
    """Whether ``forward`` takes no extra keyword arguments: no ``**`` parameter, or one it raises on when filled.

    The second is read off the source (BLOOM-era code: ``**deprecated_arguments``, then ``if
    deprecated_arguments: raise ValueError("Got unexpected arguments: ...")``): an ``if`` whose test reads the
    ``**`` parameter and whose body raises.
    """
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return False
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        return True
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(
            isinstance(name, ast.Name) and name.id == var_keyword for name in ast.walk(node.test)
        ):
            if any(isinstance(statement, ast.Raise) for body in node.body for statement in ast.walk(body)):
                return True
    return False


def declare_loss_kwargs(classes: list) -> list[str]:
    """``accepts_loss_kwargs = False`` on a remote model class whose ``forward`` takes no extra keyword arguments.

    ``Trainer`` (4.46 and later) passes ``num_items_in_batch`` to the model's ``forward`` when the class says it
    accepts loss kwargs (``accepts_loss_kwargs``) or, where it says nothing, when ``forward`` has a ``**``
    parameter; BLOOM-era remote code has one that raises on anything it receives (``ValueError: Got unexpected
    arguments: {'num_items_in_batch': ...}``). The most derived remote class that defines ``forward`` declares that
    it accepts none, where no class of its MRO says anything. Detected on the classes, on every release (an
    attribute older releases never read).

    Returns:
        `list[str]`: what was declared now.
    """
    if not classes or any(hasattr(klass, "accepts_loss_kwargs") for klass in classes[:1]):
        return []
    definer = next((klass for klass in classes if "forward" in klass.__dict__), None)
    if definer is None or not _rejects_extra_keywords(inspect.unwrap(definer.__dict__["forward"])):
        return []
    if not registry.set(classes[0], "accepts_loss_kwargs", False, group=REPAIRS, what="forward takes no loss kwargs"):
        return []
    return [f"{classes[0].__qualname__}.accepts_loss_kwargs = False"]
