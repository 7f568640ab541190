"""The checks of the model's remote tokenizer: what its 2023 code relies on that the installed transformers changed.

Each check asks the same question as the repair the import installs (:mod:`qwen_ckpt_compat._repairs.tokenizers`),
on the tokenizer class's syntax tree instead of the loaded class (the doctor never imports the model's code), and
the installed transformers the same way the repair does. ``tests/test_doctor_release.py`` checks on every matrix
row that each problem reported happens with the family fixtures' tokenizers, and that none happens unreported.
"""

from __future__ import annotations

import ast
from typing import Optional

from packaging.version import Version

from .._remote_code import ClassFacts
from .._repairs import tokenizers as repairs
from .context import CheckContext

__all__ = ["IMPORT_TOKENIZER_FIRST", "check_tokenizer"]

IMPORT_TOKENIZER_FIRST = (
    "`import qwen_ckpt_compat` before `AutoTokenizer.from_pretrained(..., trust_remote_code=True)` (the import "
    "repairs the tokenizer class as it loads; `qwen_ckpt_compat.unpatch(tokenizer)` undoes it)"
)
#: From 4.34 ``save_pretrained`` writes the special tokens into ``tokenizer_config.json`` and the base ``__init__``
#: sets them when loading, which a read-only property refuses; from 4.47 the base keeps them in a table of its own,
#: past the property, and adds those its vocabulary does not list as new tokens; from 5.0 ``save_pretrained`` no
#: longer writes them (docs/facts/chatglm.md, measured on 4.45.2, 4.47.1, 4.57.6, 5.0.0, 5.2.0, 5.24.0). Checked
#: by version: no feature of the installed classes tells these apart.
_SPECIAL_TOKENS_KEPT_ASIDE = Version("4.47.0")
_SPECIAL_TOKENS_NOT_SAVED = Version("5.0.0")


def _where(klass: ClassFacts, method: str) -> str:
    return f"{klass.module.path.name} line {klass.methods[method].lineno}"


def _check_pad(ctx: CheckContext, klass: ClassFacts) -> None:
    if "_pad" not in klass.methods or not repairs.base_pad_takes_padding_side():
        return
    parameters = klass.parameters("_pad")
    if "padding_side" in parameters or any(p.startswith("**") for p in parameters):
        return
    ctx.add(
        "tokenizer-pad-padding-side",
        f"encoding with padding fails on transformers {ctx.transformers}: it passes padding_side to every _pad, "
        f"and {klass.name}._pad ({_where(klass, '_pad')}) does not take it: TypeError: _pad() got an unexpected "
        "keyword argument 'padding_side'",
        f"Fixed by {IMPORT_TOKENIZER_FIRST}.",
        fixed_by="import",
        subject=f"{klass.name}._pad",
    )


def _check_init_order(ctx: CheckContext, klass: ClassFacts) -> None:
    init = klass.methods.get("__init__")
    if init is None or not repairs.base_init_asks_the_vocabulary():
        return
    others = [node for name, node in klass.methods.items() if name != "__init__"]
    reordered = repairs.reordered_init_body(init, repairs.attributes_read(others))
    if reordered is None:
        return
    attributes = ", ".join(sorted(reordered[1]))
    ctx.add(
        "tokenizer-attributes-after-base-init",
        f"loading the tokenizer fails on transformers {ctx.transformers}: {klass.name}.__init__ "
        f"({_where(klass, '__init__')}) sets {attributes} only after super().__init__(), and this release's base "
        "__init__ adds the special tokens, asking get_vocab(), which reads them: AttributeError (Baichuan2's and "
        "InternLM v1's: no attribute 'sp_model'; 5.x: a TypeError about a property)",
        f"Fixed by {IMPORT_TOKENIZER_FIRST}: it runs those statements before super().__init__(), as the upstream fix did.",
        fixed_by="import",
        subject=f"{klass.name}.__init__",
    )


def _is_read_only_property(node: Optional[ast.AST]) -> bool:
    """A ``@property`` definition; a later ``@x.setter`` of the same name replaces it in the class's methods."""
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
    )


def _check_special_tokens(ctx: CheckContext, klass: ClassFacts) -> None:
    names = [name for name in repairs.SPECIAL_TOKENS if _is_read_only_property(klass.methods.get(name))]
    release = Version(ctx.transformers)
    if not names or not repairs.base_init_asks_the_vocabulary() or release >= _SPECIAL_TOKENS_NOT_SAVED:
        return
    listed = ", ".join(names)
    if release >= _SPECIAL_TOKENS_KEPT_ASIDE:
        happens = (
            f"a tokenizer saved with save_pretrained does not load as it was: transformers {ctx.transformers} "
            f"writes {listed} into tokenizer_config.json, and when loading keeps them past {klass.name}'s "
            "read-only properties and adds those its vocabulary does not list as new tokens (ChatGLM's comes "
            "back two tokens longer, with another unk_token_id)"
        )
    else:
        happens = (
            f"a tokenizer saved with save_pretrained does not load again: transformers {ctx.transformers} writes "
            f"{listed} into tokenizer_config.json, and its __init__ sets them, which {klass.name}'s read-only "
            f"properties refuse: AttributeError: can't set attribute '{names[0]}'"
        )
    fixable = "__init__" in klass.methods
    ctx.add(
        "tokenizer-saved-special-tokens",
        happens,
        f"Fixed by {IMPORT_TOKENIZER_FIRST}: {klass.name}.__init__ leaves them out of the base __init__."
        if fixable
        else f"Load the saved tokenizer with the original tokenizer_config.json ({klass.name} defines no __init__ "
        "the library can wrap).",
        fixed_by="import" if fixable else None,
        needs_action=not fixable,
        subject=f"{klass.name}.{names[0]}",
    )


def _defaults(function: ast.FunctionDef) -> dict:
    """The literal defaults of a definition's parameters, by name."""
    arguments = function.args
    positional = [*getattr(arguments, "posonlyargs", []), *arguments.args]
    pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
    pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
    values = {}
    for argument, default in pairs:
        try:
            values[argument.arg] = ast.literal_eval(default)
        except ValueError:
            continue
    return values


def _check_saved_switches(ctx: CheckContext, klass: ClassFacts) -> None:
    init = klass.methods.get("__init__")
    if init is None:
        return
    dropped = repairs.saved_switches_dropped(klass.parameters("__init__"))
    defaults = _defaults(init)
    config = ctx.model.tokenizer_config
    # Only what changes: a value tokenizer_config.json sets that the saved file will not, unlike the default.
    lost = [name for name in dropped if name in config and name in defaults and config[name] != defaults[name]]
    if not lost:
        return
    settings = ", ".join(f"{name}={config[name]!r}" for name in lost)
    ctx.add(
        "tokenizer-saved-switches-dropped",
        f"a tokenizer saved with save_pretrained comes back changed: transformers {ctx.transformers} leaves "
        f"{', '.join(lost)} out of tokenizer_config.json, so the saved tokenizer gets {klass.name}.__init__'s "
        f"default instead of this model's {settings}",
        f"Fixed by {IMPORT_TOKENIZER_FIRST}: its save_pretrained writes them back.",
        fixed_by="import",
        subject=f"{klass.name}.save_pretrained",
    )


def check_tokenizer(ctx: CheckContext) -> None:
    """The tokenizer problems of the model's remote tokenizer class (``auto_map``'s ``AutoTokenizer``)."""
    tokenizer = ctx.model.tokenizer_class
    if ctx.caps is None or tokenizer is None:
        return
    for klass in ctx.model.remote_mro(tokenizer):
        _check_pad(ctx, klass)
        _check_init_order(ctx, klass)
        _check_special_tokens(ctx, klass)
        _check_saved_switches(ctx, klass)
