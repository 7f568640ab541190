"""Remote slow tokenizers: what their 2023 code relies on that later transformers releases changed.

Six repairs, each detected on the tokenizer class's own code (never by version), installed only on classes
loaded from remote code (never on transformers' own), through the patch registry in the group
``("tokenizers", cls)`` of each class, so that :func:`undo_tokenizer_repairs` (and ``qwen_ckpt_compat.unpatch``
given the class or a tokenizer) puts back the exact original attributes:

* **``_pad`` without ``padding_side``** (ChatGLM2/3): from 4.45 ``PreTrainedTokenizerBase.pad`` calls
  ``self._pad(..., padding_side=...)`` on every encode, so ``_pad() got an unexpected keyword argument
  'padding_side'``. The wrapper takes the argument and, while the original runs, gives the tokenizer that
  ``padding_side`` (the attribute the original reads), as the caller asked; not given, nothing changes.
  Installed where the installed ``PreTrainedTokenizerBase._pad`` has ``padding_side`` and the class's does not
  (nor ``**kwargs``).
* **attributes the base ``__init__`` needs, set after ``super().__init__``** (Baichuan2, InternLM v1): from 4.34
  ``PreTrainedTokenizer.__init__`` adds the special tokens, which asks ``get_vocab()`` / ``vocab_size``, which read
  ``self.sp_model``, set only after ``super().__init__`` returns: "object has no attribute 'sp_model'" (5.x: a
  ``TypeError`` about a ``property``). The repair is the fix both projects made upstream in November 2023: the
  statements after ``super().__init__(...)`` run before it. It is installed only where it is safe, read off the
  ``__init__``'s syntax tree: every statement after the call reads only arguments, locals and attributes set
  before (no other ``self`` attribute and no ``self`` method), and one of the attributes they set is read by
  another method of the class. The rewritten ``__init__`` is compiled from the class's own source, in its own
  module, with the same file name and line numbers.
* **special tokens as read-only properties** (ChatGLM2/3's ``eos_token``, ``pad_token``, ``unk_token``): from 4.34
  ``save_pretrained`` writes them into ``tokenizer_config.json`` and the base ``__init__`` sets every special
  token it is given, so a saved tokenizer does not load again: "can't set attribute 'eos_token'" (3.11+:
  "property 'eos_token' of 'ChatGLMTokenizer' object has no setter"). From 4.47 to 4.57 the base keeps them in a
  table of its own instead, past the property, and adds those absent from ``get_vocab()`` (ChatGLM's maps its special
  ids to ``""``) as new tokens: the reloaded tokenizer is two tokens longer and its ``unk_token_id`` is a new id
  (5.x no longer saves them).
  The class's ``__init__`` keeps these tokens away from the base ``__init__``, so a saved tokenizer loads as the
  original did on every release; a saved value other than the one the property answers is ignored with a
  warning.
* **``add_bos_token`` / ``add_eos_token`` saved** (Baichuan2, whose ``tokenizer_config.json`` turns the BOS
  off): 5.x's ``save_pretrained`` leaves them out of ``tokenizer_config.json`` (fast tokenizers keep them in
  ``tokenizer.json``), so a saved Baichuan2 tokenizer came back adding a BOS. Where the class's ``__init__``
  takes them and the installed ``save_pretrained`` drops them (read off its code), its ``save_pretrained``
  writes them back into the file it saved, with the tokenizer's values.
* **``batch_encode_plus`` / ``encode_plus`` called by the remote code** (ChatGLM3's ``build_chat_input``): 5.x
  removed them; where the class's code calls one and the class no longer has it, it is given one that calls
  the tokenizer (``__call__``), as those methods did.
* **``clean_up_tokenization`` called by the remote code** (InternLM's ``convert_tokens_to_string``): 5.0 to 5.2
  removed it from ``PreTrainedTokenizerBase`` (5.3 has it again), so ``decode`` raised ``AttributeError``; where the
  class's code calls it and no class has it, it is given one that removes the spaces an English tokenization
  leaves before punctuation and contractions, as the base method does.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import threading
import warnings
from typing import Any, Callable, Hashable, Iterable, Optional

from .._patches import registry
from ._classes import INSTALLED_MARK, code_names, code_objects, is_transformers_class, parameters

__all__ = [
    "REMOVED_METHODS",
    "SPECIAL_TOKENS",
    "accept_padding_side",
    "accept_saved_special_tokens",
    "attributes_read",
    "base_init_asks_the_vocabulary",
    "base_pad_takes_padding_side",
    "is_remote_tokenizer_class",
    "keep_saved_switches",
    "prepare_tokenizer_class",
    "reordered_init_body",
    "restore_removed_methods",
    "saved_switches_dropped",
    "set_attributes_before_base_init",
    "tokenizer_group",
    "undo_tokenizer_repairs",
]

_MISSING = object()
_SIDE_LOCK = threading.RLock()


def tokenizer_group(cls: type) -> Hashable:
    """The patch registry's group of the tokenizer repairs on ``cls``."""
    return ("tokenizers", cls)


def _tokenizer_base() -> Optional[type]:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return PreTrainedTokenizerBase


def is_remote_tokenizer_class(cls: Any) -> bool:
    """A tokenizer class that transformers does not define (remote code, or the user's)."""
    base: Any = _tokenizer_base()
    return isinstance(cls, type) and base is not None and issubclass(cls, base) and not is_transformers_class(cls)


def _remote_classes(cls: type) -> list:
    """The remote tokenizer classes of ``cls``'s MRO, most derived first."""
    return [klass for klass in cls.__mro__ if is_remote_tokenizer_class(klass)]


# --- _pad(..., padding_side=) -------------------------------------------------------------------------------


def _takes(function: Any, name: str) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True  # unknown: leave it alone
    return name in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def _pad_with_side(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """The remote ``_pad``, given the ``padding_side`` this transformers passes, as the attribute it reads."""
    side = kwargs.pop("padding_side", None)
    if side is None or instance is None or getattr(instance, "padding_side", None) == side:
        return wrapped(*args, **kwargs)
    with _SIDE_LOCK:  # the attribute is the instance's: one call at a time changes it
        before = instance.padding_side
        instance.padding_side = side
        try:
            return wrapped(*args, **kwargs)
        finally:
            instance.padding_side = before


def base_pad_takes_padding_side() -> bool:
    """Whether this transformers' ``PreTrainedTokenizerBase._pad`` takes ``padding_side``, which ``pad`` then passes
    to every ``_pad`` (4.45 and later)."""
    base: Any = _tokenizer_base()
    return base is not None and "padding_side" in parameters(base._pad)


def accept_padding_side(cls: type) -> list:
    """Lets a remote ``_pad`` without ``padding_side`` take it (see the module doc). Idempotent."""
    pad = cls.__dict__.get("_pad")
    if pad is None or _takes(pad, "padding_side") or not base_pad_takes_padding_side():
        return []
    what = "accepts padding_side (4.45+ passes it), read as the padding_side attribute while it runs"
    if registry.wrap(cls, "_pad", _pad_with_side, group=tokenizer_group(cls), what=what):
        return [f"{cls.__qualname__}._pad ({what})"]
    return []


# --- attributes set after super().__init__ ------------------------------------------------------------------


def _is_super_init(statement: ast.stmt) -> bool:
    """``super().__init__(...)`` or ``super(X, self).__init__(...)`` as a statement of its own."""
    if not isinstance(statement, ast.Expr) or not isinstance(statement.value, ast.Call):
        return False
    func = statement.value.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "__init__"
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "super"
    )


def _self_attributes(node: ast.AST, self_name: str, *, stored: bool) -> set:
    """The ``self.<name>`` attributes ``node`` stores (``stored=True``) or reads."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == self_name:
            if isinstance(child.ctx, ast.Store) == stored:
                found.add(child.attr)
    return found


def _self_calls(node: ast.AST, self_name: str) -> set:
    """The ``self.<name>(...)`` methods ``node`` calls."""
    return {
        child.func.attr
        for child in ast.walk(node)
        if isinstance(child, ast.Call)
        and isinstance(child.func, ast.Attribute)
        and isinstance(child.func.value, ast.Name)
        and child.func.value.id == self_name
    }


def attributes_read(functions: Iterable[ast.AST]) -> set:
    """The attributes of their first argument (``self``) that the given function definitions read."""
    read: set = set()
    for function in functions:
        arguments = function.args.args if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if arguments:
            read |= _self_attributes(function, arguments[0].arg, stored=False)
    return read


def _read_elsewhere(cls: type) -> set:
    """The ``self`` attributes read by the class's other methods and properties (what the base ``__init__`` may call)."""
    definitions = []
    for name, member in vars(cls).items():
        if name == "__init__":
            continue
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not inspect.isfunction(function):
            continue
        try:
            definitions += ast.parse(textwrap.dedent(inspect.getsource(function))).body[:1]
        except (OSError, TypeError, SyntaxError):
            continue
    return attributes_read(definitions)


def base_init_asks_the_vocabulary() -> bool:
    """Whether this transformers' slow-tokenizer ``__init__`` adds the special tokens itself, which asks
    ``get_vocab()`` / ``vocab_size`` of a tokenizer not yet built (4.34 and later: ``_add_tokens``)."""
    try:
        from transformers import PreTrainedTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return "_add_tokens" in code_names(PreTrainedTokenizer.__init__)


class _ZeroArgumentSuper(ast.NodeTransformer):
    """``super()`` -> ``super(__qcc_class__, self)``: the rewritten function lives outside the class body."""

    def __init__(self, self_name: str) -> None:
        self.self_name = self_name

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args and not node.keywords:
            node.args = [ast.Name("__qcc_class__", ast.Load()), ast.Name(self.self_name, ast.Load())]
        return node


def reordered_init_body(function: ast.AST, read_elsewhere: set) -> Optional[tuple]:
    """The body of an ``__init__`` definition with the statements after ``super().__init__(...)`` moved before it,
    or ``None`` where that is unsafe or changes nothing (see the module doc).

    Args:
        function (`ast.FunctionDef`): the ``__init__``'s definition.
        read_elsewhere (`set`): the ``self`` attributes the class's other methods read (:func:`attributes_read`).

    Returns:
        `tuple[list, set]` or `None`: the new body, and the moved attributes the other methods read.
    """
    if not isinstance(function, ast.FunctionDef) or function.decorator_list or not function.args.args:
        return None
    self_name = function.args.args[0].arg
    body = function.body
    calls = [i for i, statement in enumerate(body) if _is_super_init(statement)]
    if len(calls) != 1:
        return None
    index = calls[0]
    before, after = body[:index], body[index + 1 :]
    if not after:
        return None
    available = set().union(*(_self_attributes(s, self_name, stored=True) for s in before)) if before else set()
    for statement in after:
        # Only statements that need nothing the base __init__ makes: no self method, no attribute set by it.
        if _self_calls(statement, self_name) - available:
            return None
        if _self_attributes(statement, self_name, stored=False) - available:
            return None
        if isinstance(statement, (ast.Return, ast.Yield, ast.Raise)) or any(
            isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom)) for n in ast.walk(statement)
        ):
            return None
        available |= _self_attributes(statement, self_name, stored=True)
    set_after = set().union(*(_self_attributes(s, self_name, stored=True) for s in after))
    if not set_after & read_elsewhere:
        return None  # nothing the other methods read: the order does not matter
    return before + after + [body[index]], set_after & read_elsewhere


def _reordered_init(cls: type, init: Callable) -> Optional[Callable]:
    """``init`` with the statements after ``super().__init__`` moved before it, or ``None`` where that is unsafe."""
    try:
        lines, first_line = inspect.getsourcelines(init)
        filename = inspect.getsourcefile(init)
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return None
    function = tree.body[0]
    reordered = reordered_init_body(function, _read_elsewhere(cls))
    if reordered is None:
        return None
    assert isinstance(function, ast.FunctionDef)
    self_name = function.args.args[0].arg
    function.body = reordered[0]
    _ZeroArgumentSuper(self_name).visit(function)
    factory = ast.FunctionDef(
        name="__qcc_factory__",
        args=ast.arguments(
            posonlyargs=[], args=[ast.arg("__qcc_class__")], kwonlyargs=[], kw_defaults=[], defaults=[]
        ),
        body=[function, ast.Return(ast.Name(function.name, ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first_line - 1)
    namespace: dict = {}
    globals_ = getattr(sys.modules.get(cls.__module__), "__dict__", None) or init.__globals__
    exec(compile(module, filename or "<remote tokenizer>", "exec"), globals_, namespace)  # noqa: S102 - its own source
    rewritten = namespace["__qcc_factory__"](cls)
    rewritten.__qualname__ = init.__qualname__
    rewritten.__module__ = init.__module__
    rewritten.__doc__ = init.__doc__
    rewritten.__wrapped_original__ = init  # type: ignore[attr-defined]
    rewritten.__dict__[INSTALLED_MARK] = True
    return rewritten


def set_attributes_before_base_init(cls: type) -> list:
    """Runs the statements after ``super().__init__`` before it, where that is safe (see the module doc)."""
    init = cls.__dict__.get("__init__")
    if not inspect.isfunction(init) or INSTALLED_MARK in init.__dict__:
        return []
    rewritten = _reordered_init(cls, init)
    if rewritten is None:
        return []
    what = "sets its attributes before super().__init__ (4.34+ reads sp_model there), as the upstream fix did"
    if registry.set(cls, "__init__", rewritten, group=tokenizer_group(cls), what=what):
        return [f"{cls.__qualname__}.__init__ ({what})"]
    return []


# --- read-only special tokens ------------------------------------------------------------------------------

#: The special tokens ``PreTrainedTokenizerBase`` sets from its arguments.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token: Any) -> Any:
    return getattr(token, "content", token)


def _read_only_special_tokens(cls: type) -> tuple:
    """The special tokens ``cls`` itself answers with a property that has no setter."""
    return tuple(
        name
        for name in SPECIAL_TOKENS
        if isinstance(cls.__dict__.get(name), property) and cls.__dict__[name].fset is None
    )


def _init_without(names: tuple) -> Callable:
    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        """``__init__`` that keeps the special tokens the class answers itself away from the base ``__init__``."""
        given = {name: kwargs.pop(name) for name in names if name in kwargs}
        result = wrapped(*args, **kwargs)
        for name, value in given.items():
            answered = getattr(instance, name, None)
            if value is not None and _content(value) != _content(answered):
                warnings.warn(
                    f"{type(instance).__name__} answers {name} with a read-only property ({answered!r}); the "
                    f"{_content(value)!r} it was given (from a saved tokenizer_config.json?) is ignored",
                    UserWarning,
                    stacklevel=2,
                )
        return result

    return wrapper


def accept_saved_special_tokens(cls: type) -> list:
    """``cls``'s ``__init__`` does not pass on the special tokens it answers itself (see the module doc)."""
    names = _read_only_special_tokens(cls)
    if not names or "__init__" not in cls.__dict__:
        return []
    what = f"leaves {', '.join(names)} (read-only properties) out of the base __init__ (4.34+ sets the saved ones)"
    if registry.wrap(cls, "__init__", _init_without(names), group=tokenizer_group(cls), what=what):
        return [f"{cls.__qualname__}.__init__ ({what})"]
    return []


# --- add_bos_token / add_eos_token in tokenizer_config.json -------------------------------------------------

_SAVED_SWITCHES = ("add_bos_token", "add_eos_token")


def _code_constants(function: Any) -> set:
    """The string constants of a function's code, nested functions included."""
    return {constant for code in code_objects(function) for constant in code.co_consts if isinstance(constant, str)}


def _save_with_switches(names: tuple) -> Callable:
    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        """``save_pretrained`` that writes the tokenizer's ``add_bos_token`` / ``add_eos_token`` back."""
        import json
        import os

        saved = wrapped(*args, **kwargs)
        directory: Any = args[0] if args else kwargs.get("save_directory")
        prefix = kwargs.get("filename_prefix")
        path = os.path.join(os.fspath(directory), (prefix + "-" if prefix else "") + "tokenizer_config.json")
        if instance is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            missing = {name: getattr(instance, name) for name in names if name not in config and hasattr(instance, name)}
            if missing:
                config.update(missing)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return saved

    return wrapper


def saved_switches_dropped(init_parameters: Iterable[str]) -> tuple:
    """Which of ``add_bos_token`` / ``add_eos_token``, among the parameters of a tokenizer's ``__init__``, this
    transformers' ``save_pretrained`` leaves out of ``tokenizer_config.json`` (read off its code: 5.x names them)."""
    base: Any = _tokenizer_base()
    names = tuple(name for name in _SAVED_SWITCHES if name in set(init_parameters))
    if base is None or not set(names) & _code_constants(base.save_pretrained):
        return ()
    return names


def keep_saved_switches(cls: type) -> list:
    """``save_pretrained`` of ``cls`` keeps the ``add_*_token`` its ``__init__`` takes (see the module doc)."""
    init = cls.__dict__.get("__init__")
    if init is None:
        return []
    names = saved_switches_dropped(parameters(getattr(init, "__wrapped_original__", init)))
    if not names:
        return []
    what = f"writes {', '.join(names)} to tokenizer_config.json (5.x leaves them out)"
    if registry.wrap(cls, "save_pretrained", _save_with_switches(names), group=tokenizer_group(cls), what=what):
        return [f"{cls.__qualname__}.save_pretrained ({what})"]
    return []


# --- encode_plus / batch_encode_plus / clean_up_tokenization ------------------------------------------------


def _encode_plus(self: Any, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
    """``encode_plus`` as transformers had it before 5.0: the tokenizer called on one text (or pair)."""
    return self(text, text_pair=text_pair, **kwargs)


def _batch_encode_plus(self: Any, batch_text_or_text_pairs: Any, **kwargs: Any) -> Any:
    """``batch_encode_plus`` as transformers had it before 5.0: the tokenizer called on a batch (of pairs)."""
    batch = list(batch_text_or_text_pairs)
    if batch and not kwargs.get("is_split_into_words") and all(isinstance(x, tuple) and len(x) == 2 for x in batch):
        texts, pairs = zip(*batch)
        return self(list(texts), text_pair=list(pairs), **kwargs)
    return self(batch, **kwargs)


#: What ``clean_up_tokenization`` replaces, in this order: the space an English tokenization leaves before
#: punctuation and contractions (and around a lone apostrophe).
_TOKENIZATION_ARTIFACTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def _clean_up_tokenization(out_string: str) -> str:
    """``clean_up_tokenization`` as transformers has it outside 5.0-5.2: the artifacts above lose their space."""
    for artifact, joined in _TOKENIZATION_ARTIFACTS:
        out_string = out_string.replace(artifact, joined)
    return out_string


_REMOVED: dict = {
    "encode_plus": (_encode_plus, "removed in 5.0; calls the tokenizer, as it did"),
    "batch_encode_plus": (_batch_encode_plus, "removed in 5.0; calls the tokenizer, as it did"),
    "clean_up_tokenization": (
        staticmethod(_clean_up_tokenization),
        "absent from 5.0 to 5.2; joins the spaces before punctuation, as it did",
    ),
}
for _function in (_encode_plus, _batch_encode_plus, _clean_up_tokenization):
    _function.__dict__[INSTALLED_MARK] = True

#: The base-class methods the library gives a remote tokenizer class whose code calls them where this
#: transformers lacks them.
REMOVED_METHODS = frozenset(_REMOVED)


def restore_removed_methods(cls: type) -> list:
    """Gives the outermost remote class the base methods its code calls that this transformers lacks."""
    classes = _remote_classes(cls)
    if not classes:
        return []
    used: set = set()
    for klass in classes:
        for member in vars(klass).values():
            function = member.fget if isinstance(member, property) else member
            used |= code_names(function)
    owner = classes[-1]
    installed = []
    for name, (replacement, what) in _REMOVED.items():
        if name in used and inspect.getattr_static(cls, name, _MISSING) is _MISSING:
            if registry.set(owner, name, replacement, group=tokenizer_group(owner), what=what):
                installed.append(f"{owner.__qualname__}.{name} ({what})")
    return installed


# --- entry points -------------------------------------------------------------------------------------------


def prepare_tokenizer_class(cls: type) -> list:
    """Every tokenizer repair ``cls`` (a remote tokenizer class, as transformers loads it) needs. Idempotent.

    Returns:
        `list[str]`: what was installed now.
    """
    if not is_remote_tokenizer_class(cls):
        return []
    installed = []
    for klass in _remote_classes(cls):
        installed += accept_padding_side(klass)
        installed += set_attributes_before_base_init(klass)
        installed += accept_saved_special_tokens(klass)
        installed += keep_saved_switches(klass)
    installed += restore_removed_methods(cls)
    return installed


def undo_tokenizer_repairs(cls_or_tokenizer: Any) -> list:
    """Puts back the original attributes of a remote tokenizer class (or a tokenizer's class). Idempotent.

    Returns:
        `list`: the installs left in place, inert, under another library's later wrapper.
    """
    cls = cls_or_tokenizer if isinstance(cls_or_tokenizer, type) else type(cls_or_tokenizer)
    left = []
    for klass in _remote_classes(cls):
        left += registry.undo(tokenizer_group(klass))
    return left
