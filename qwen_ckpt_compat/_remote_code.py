"""Reading a model's remote code without running it: the files ``auto_map`` names, parsed with :mod:`ast`.

Nothing here imports or executes the remote code, and nothing imports torch or transformers. What is read:

* the classes of each file: bases (as written), methods and their parameters, class-level constants,
  the attributes their methods assign on ``self``, the methods they call on ``self``, the ``config`` attributes
  they read;
* the imports of each file: what is imported, whether inside a function body (lazy) or inside a ``try`` block
  or an ``if is_..._available()`` block (guarded, which transformers' own import check skips);
* the sibling files pulled in by relative imports (``from .configuration_qwen import QWenConfig``), which
  transformers copies and loads with the file.

The doctor (:mod:`qwen_ckpt_compat.doctor`) asks the installed transformers about what it finds here; the import
hook asks :func:`lazily_imported_packages` whether a file imports a package only inside function bodies (Qwen v1's
streaming package). This is the one reader of remote code in the library. Parsing holds a lock: CPython's parser
is not safe to run from two threads at once (seen: ``SystemError: AST constructor recursion depth mismatch``).
"""

from __future__ import annotations

import ast
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

__all__ = [
    "ClassFacts",
    "ClassReference",
    "ImportFacts",
    "ModuleFacts",
    "RemoteCode",
    "RemoteCodeError",
    "auto_map_references",
    "lazily_imported_packages",
    "parse",
]

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_OWN = ("self", "self.__class__", "cls")
_TRY = tuple(getattr(ast, name) for name in ("Try", "TryStar") if hasattr(ast, name))
_PARSING = threading.RLock()
_ANALYSING = threading.Lock()  # held while a file's lazy imports are read: each code is read once
_ANALYSED: dict = {}  # sha256 of a file's bytes -> its lazily imported packages


def parse(source: str, filename: str) -> ast.Module:
    """``ast.parse``, one thread at a time."""
    with _PARSING:
        return ast.parse(source, filename=filename)


def parsing() -> Any:
    """The lock :func:`parse` holds: for code that runs CPython's parser otherwise (transformers' ``get_imports``)."""
    return _PARSING


def hard_coded_use_reentrant(filename: Optional[str]) -> frozenset:
    """The ``use_reentrant`` values the code of ``filename`` writes as constants into its own checkpoint calls.

    Calls of a function named ``checkpoint`` (``torch.utils.checkpoint.checkpoint``, however it was imported) with
    a literal ``use_reentrant=True``/``False``: code that checkpoints itself that way ignores the mode it is asked
    for (GLM-4-9B's ``GLMTransformer`` writes ``use_reentrant=False``). Empty when the file cannot be read.
    """
    if not filename:
        return frozenset()
    try:
        tree = parse(Path(filename).read_text(encoding="utf-8"), filename)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return frozenset()
    values = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func).rsplit(".", 1)[-1] == "checkpoint":
            for keyword in node.keywords:
                if keyword.arg == "use_reentrant" and isinstance(keyword.value, ast.Constant):
                    if isinstance(keyword.value.value, bool):
                        values.add(keyword.value.value)
    return frozenset(values)


def lazily_imported_packages(filename: Optional[str]) -> frozenset:
    """Top-level packages a ``.py`` file imports inside function bodies and nowhere at module level.

    Each distinct code is analysed once per process, under a lock: the same file in many folders (transformers
    copies a model's code into its module cache; every copy of a model has it), or loaded from several threads at
    once, is read once. A file that is missing, unreadable or not valid Python imports nothing here (loading it
    then fails where transformers reads it).
    """
    if not filename or not filename.endswith(".py") or not os.path.isfile(filename):
        return frozenset()
    try:
        source = Path(filename).read_bytes()
    except OSError:
        return frozenset()
    key = hashlib.sha256(source).digest()
    with _ANALYSING:
        packages = _ANALYSED.get(key)
        if packages is None:
            packages = _ANALYSED[key] = _lazily_imported(filename, source)
    return packages


def _lazily_imported(filename: str, source: bytes) -> frozenset:
    path = Path(filename)
    try:
        tree = parse(source.decode("utf-8"), filename)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return frozenset()
    facts = _read_module(path.stem, path, tree)
    inside = {item.package for item in facts.imports if item.lazy and item.package}
    outside = {item.package for item in facts.imports if not item.lazy and item.package}
    return frozenset(inside - outside)


class RemoteCodeError(Exception):
    """A remote-code file cannot be read: missing, not UTF-8, or not valid Python.

    Attributes:
        path (`Path`): the file (or the directory where it should be).
        message (`str`): what is wrong, for a one-line error.
    """

    def __init__(self, path: Union[str, Path], message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


@dataclass(frozen=True)
class ClassReference:
    """One ``auto_map`` value: ``"module.Class"``, or ``"owner/repo--module.Class"`` for code in another repo."""

    module: str
    name: str
    repo: Optional[str] = None

    @classmethod
    def parse(cls, value: str) -> "ClassReference":
        """Parses an ``auto_map`` value; raises `ValueError` for anything else."""
        repo, _, reference = value.rpartition("--") if "--" in value else (None, "", value)
        module, _, name = reference.rpartition(".")
        if not module or not name or not all(part.isidentifier() for part in (*module.split("."), name)):
            raise ValueError(f"{value!r} is not of the form 'module.Class' or 'repo--module.Class'")
        return cls(module=module, name=name, repo=repo or None)

    def __str__(self) -> str:
        return f"{self.repo + '--' if self.repo else ''}{self.module}.{self.name}"


def auto_map_references(auto_map: Mapping[str, Any]) -> dict[str, list[ClassReference]]:
    """The class references of an ``auto_map``, by auto class; tokenizer lists give one per non-null entry.

    Raises:
        `ValueError`: a value is neither a reference, nor a list of references and nulls.
    """
    references: dict[str, list[ClassReference]] = {}
    for auto_class, value in auto_map.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is None:
                continue
            if not isinstance(item, str):
                raise ValueError(f"auto_map[{auto_class!r}] holds {item!r}, not a 'module.Class' string")
            references.setdefault(auto_class, []).append(ClassReference.parse(item))
    return references


@dataclass(frozen=True)
class ImportFacts:
    """One imported module (``import a.b`` or ``from a.b import c, d``; relative ones keep their ``level``)."""

    module: str
    names: tuple[str, ...]
    level: int
    lazy: bool
    guarded: bool
    line: int

    @property
    def package(self) -> str:
        """The top-level package (empty for ``from . import x``)."""
        return self.module.split(".")[0] if self.level == 0 else ""


@dataclass
class ClassFacts:
    """What one class of a remote-code file says about itself."""

    name: str
    module: "ModuleFacts"
    line: int
    bases: tuple[ast.expr, ...]
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    attributes: dict[str, ast.expr] = field(default_factory=dict)
    self_assigned: set[str] = field(default_factory=set)
    self_calls: dict[str, int] = field(default_factory=dict)

    def parameters(self, method: str) -> tuple[str, ...]:
        """Parameter names of ``method`` (``self`` included), in order."""
        arguments = self.methods[method].args
        names = [a.arg for a in (*getattr(arguments, "posonlyargs", []), *arguments.args)]
        if arguments.vararg:
            names.append("*" + arguments.vararg.arg)
        names += [a.arg for a in arguments.kwonlyargs]
        if arguments.kwarg:
            names.append("**" + arguments.kwarg.arg)
        return tuple(names)

    def literal(self, attribute: str) -> Any:
        """The class-level constant ``attribute`` as a Python value; `ValueError` when it is not a literal."""
        return ast.literal_eval(self.attributes[attribute])

    def isinstance_targets(self, method: str) -> list[str]:
        """Class names tested with ``isinstance(x, Name)`` (or a tuple of names) in ``method``'s body."""
        names: list[str] = []
        for node in ast.walk(self.methods[method]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                if len(node.args) == 2:
                    target = node.args[1]
                    for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                        text = _dotted(item)
                        if text and text not in names:
                            names.append(text)
        return names

    def defines(self, name: str) -> bool:
        """Whether the class body or its methods define ``name`` (method, class constant or ``self.name = ...``)."""
        return name in self.methods or name in self.attributes or name in self.self_assigned

    def __repr__(self) -> str:
        return f"<ClassFacts {self.module.name}.{self.name}>"


@dataclass
class ModuleFacts:
    """One parsed remote-code file."""

    name: str
    path: Path
    tree: ast.Module
    classes: dict[str, ClassFacts] = field(default_factory=dict)
    imports: list[ImportFacts] = field(default_factory=list)
    #: name bound at module level by an import -> (level, module, imported name or None for `import x`)
    bindings: dict[str, tuple[int, str, Optional[str]]] = field(default_factory=dict)
    #: attributes read on ``config`` / ``self.config`` anywhere in the file -> first line
    config_reads: dict[str, int] = field(default_factory=dict)


#: A class as far as the static analysis can tell: one of the remote code's own (`ClassFacts`), or the
#: dotted name of a class from an installed package (``"transformers.PreTrainedModel"``).
StaticClass = Union[ClassFacts, str]


class RemoteCode:
    """The remote-code files of one model, parsed on demand.

    Args:
        directory (`Path`): the model directory (the files of ``"module.Class"`` references live there).
        resolve_repo (`Callable[[str], Path]`, *optional*): returns the local directory holding another repo's
            files, for ``"repo--module.Class"`` references; raises `RemoteCodeError` when it cannot.
    """

    def __init__(self, directory: Path, resolve_repo: Optional[Callable[[str], Path]] = None) -> None:
        self.directory = Path(directory)
        self._resolve_repo = resolve_repo
        self._modules: dict[tuple[Path, str], ModuleFacts] = {}

    @property
    def modules(self) -> list[ModuleFacts]:
        """Every file parsed so far."""
        return list(self._modules.values())

    def directory_of(self, reference: ClassReference) -> Path:
        if reference.repo is None:
            return self.directory
        if self._resolve_repo is None:
            raise RemoteCodeError(self.directory, f"{reference} names code in another repository")
        return self._resolve_repo(reference.repo)

    def module(self, directory: Path, name: str, needed_by: str) -> ModuleFacts:
        """Parses ``directory/<name>.py`` (once) and the siblings it imports relatively."""
        key = (directory, name)
        if key in self._modules:
            return self._modules[key]
        path = directory.joinpath(*name.split(".")).with_suffix(".py")
        if not path.is_file():
            raise RemoteCodeError(path, f"missing: {needed_by} needs this file, and it is not there")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RemoteCodeError(path, f"cannot be read ({type(error).__name__}: {error})") from None
        try:
            tree = parse(source, filename=str(path))
        except SyntaxError as error:
            where = f"line {error.lineno}" + (f", column {error.offset}" if error.offset else "")
            raise RemoteCodeError(path, f"is not valid Python ({where}: {error.msg})") from None
        facts = _read_module(name, path, tree)
        self._modules[key] = facts
        for item in facts.imports:
            if item.level == 1 and not item.guarded:
                # `from .x import y`, or `from . import x` (then each name is a sibling module)
                siblings = [item.module] if item.module else list(item.names)
                for sibling in siblings:
                    self.module(directory, sibling, f"{path.name} (line {item.line}: relative import)")
        return facts

    def resolve(self, reference: ClassReference, needed_by: str = "config.json's auto_map") -> ClassFacts:
        """The class an ``auto_map`` reference names; `RemoteCodeError` when its file or class is missing."""
        directory = self.directory_of(reference)
        module = self.module(directory, reference.module, f"{needed_by} ({reference})")
        found = self.find_class(module, reference.name)
        if not isinstance(found, ClassFacts):
            raise RemoteCodeError(module.path, f"defines no class {reference.name} ({needed_by} names {reference})")
        return found

    def find_class(self, module: ModuleFacts, name: str) -> Optional[StaticClass]:
        """What ``name`` refers to in ``module``: a remote class, an installed package's class, or ``None``."""
        head, _, rest = name.partition(".")
        if not rest and head in module.classes:
            return module.classes[head]
        binding = module.bindings.get(head)
        if binding is None:
            return None
        level, source, imported = binding
        if level == 0:
            return ".".join(part for part in (source, imported, rest) if part)
        if level != 1:
            return None
        if imported is not None and source:  # from .sibling import Name
            sibling = self.module(module.path.parent, source, f"{module.path.name} (relative import)")
            return self.find_class(sibling, imported + (f".{rest}" if rest else ""))
        if rest:  # from . import sibling; sibling.Name
            sibling = self.module(module.path.parent, imported or head, f"{module.path.name} (relative import)")
            return self.find_class(sibling, rest)
        return None

    def mro(self, cls: ClassFacts) -> list[StaticClass]:
        """``cls`` and its bases, depth first, left to right, each once (enough for single-chain models)."""
        order: list[StaticClass] = []

        def visit(item: StaticClass) -> None:
            if any(item is seen or item == seen for seen in order):
                return
            order.append(item)
            if isinstance(item, ClassFacts):
                for base in item.bases:
                    text = _dotted(base)
                    found = self.find_class(item.module, text) if text else None
                    if found is not None:
                        visit(found)

        visit(cls)
        return order


# ------------------------------------------------------------------------------------------ reading


def _dotted(node: ast.AST) -> str:
    """``a.b.C`` for Name/Attribute chains, else an empty string."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def _is_availability_test(test: ast.expr) -> bool:
    """``if is_flash_attn_available():``-style conditions, whose imports transformers' check skips."""
    for node in ast.walk(test):
        if isinstance(node, ast.Call):
            name = _dotted(node.func).split(".")[-1]
            if name.startswith("is_") and name.endswith("available"):
                return True
    return False


def _read_module(name: str, path: Path, tree: ast.Module) -> ModuleFacts:
    facts = ModuleFacts(name=name, path=path, tree=tree)

    def visit(node: ast.AST, lazy: bool, guarded: bool, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, _FUNCTIONS)
            child_guarded = guarded or isinstance(child, _TRY)
            if isinstance(child, ast.If) and _is_availability_test(child.test):
                child_guarded = True
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                _record_import(facts, child, lazy, guarded, top)
            elif isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load):
                owner = child.value
                if (isinstance(owner, ast.Name) and owner.id == "config") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "config" and _dotted(owner) == "self.config"
                ):
                    facts.config_reads.setdefault(child.attr, child.lineno)
            # Imports in a try's handlers are as guarded as those in its body (transformers skips the whole try).
            visit(child, child_lazy, child_guarded, top and isinstance(child, (ast.If, *_TRY)))

    visit(tree, False, False, True)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            facts.classes[node.name] = _read_class(node, facts)
    return facts


def _record_import(facts: ModuleFacts, node: Union[ast.Import, ast.ImportFrom], lazy: bool, guarded: bool, top: bool) -> None:
    if isinstance(node, ast.Import):
        for alias in node.names:
            facts.imports.append(ImportFacts(alias.name, (), 0, lazy, guarded, node.lineno))
            if top and not lazy:
                bound = alias.asname or alias.name.split(".")[0]
                facts.bindings[bound] = (0, alias.name if alias.asname else bound, None)
        return
    names = tuple(alias.name for alias in node.names)
    facts.imports.append(ImportFacts(node.module or "", names, node.level, lazy, guarded, node.lineno))
    if top and not lazy:
        for alias in node.names:
            if alias.name != "*":
                facts.bindings[alias.asname or alias.name] = (node.level, node.module or "", alias.name)


def _read_class(node: ast.ClassDef, module: ModuleFacts) -> ClassFacts:
    facts = ClassFacts(name=node.name, module=module, line=node.lineno, bases=tuple(node.bases))
    for statement in node.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            facts.methods[statement.name] = statement  # type: ignore[assignment]
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    facts.attributes[target.id] = statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            facts.attributes[statement.target.id] = statement.value
    for method in facts.methods.values():
        for child in ast.walk(method):
            if isinstance(child, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets:
                    for item in ast.walk(target):
                        # `self.x = ...`, and `self.__class__.x = ...` / `cls.x = ...`, which define `self.x` too
                        if isinstance(item, ast.Attribute) and _dotted(item.value) in _OWN:
                            facts.self_assigned.add(item.attr)
            elif isinstance(child, ast.Call):
                function = child.func
                if isinstance(function, ast.Attribute) and _dotted(function.value) == "self":
                    facts.self_calls.setdefault(function.attr, child.lineno)
                elif _dotted(function) == "setattr" and child.args and _dotted(child.args[0]) == "self":
                    if len(child.args) > 1 and isinstance(child.args[1], ast.Constant):
                        facts.self_assigned.add(str(child.args[1].value))
    return facts
