"""The house: the package's import graph, the patch registry, the per-module state and the family registry.

The layering itself (the core never imports a wing, wings never import each other) is checked by import-linter in
``nox -s lint``; here the import graph, read off the source with :mod:`ast`, must have no cycle, counting the
imports inside functions too (an import moved into a function to dodge a cycle is still a cycle).
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

import qwen_ckpt_compat
from qwen_ckpt_compat import describe, prepare_for_lora, unpatch
from qwen_ckpt_compat._family_registry import families, family_for_config
from qwen_ckpt_compat._model_state import ATTRIBUTE
from qwen_ckpt_compat._patches import PatchRegistry
from qwen_ckpt_compat.testing import TINY_FAMILIES

PACKAGE = Path(qwen_ckpt_compat.__file__).resolve().parent
# The tiny fixtures' remote-code files are data loaded by transformers, not modules of the package.
FIXTURE_CODE = {path.parent for path in (PACKAGE / "testing").glob("*/modeling_*.py")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict:
    return {
        _module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if path.parent not in FIXTURE_CODE and "__pycache__" not in path.parts
    }


def _imports(name: str, path: Path, known: set) -> set:
    """The package's modules that ``name`` imports anywhere in its file (functions included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import x` imports the module x when there is one, else a name of the package.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def _cycle(graph: dict) -> list:
    """One import cycle of ``graph`` (a list of modules), or an empty list."""
    state: dict = {}
    stack: list = []

    def visit(node: str) -> list:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


@pytest.mark.release_independent
def test_the_package_import_graph_has_no_cycle():
    modules = _package_modules()
    # The package __init__ imports the modules it names in its lazy table on first use: those count as imports.
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert "qwen_ckpt_compat._class_patch" in graph and "qwen_ckpt_compat.speed.budget" in graph
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


@pytest.mark.release_independent
def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.release_independent
def test_the_core_imports_no_wing():
    """What import-linter checks in the lint session, also checked on every row, without import-linter."""
    modules = _package_modules()
    wings = ("qwen_ckpt_compat.speed", "qwen_ckpt_compat.engines", "qwen_ckpt_compat.families",
             "qwen_ckpt_compat.doctor", "qwen_ckpt_compat.testing")
    core = [name for name in modules if name.count(".") >= 1 and name.split(".")[1].startswith("_")
            and name not in ("qwen_ckpt_compat.__main__", "qwen_ckpt_compat._demo", "qwen_ckpt_compat._version")]
    assert "qwen_ckpt_compat._lora" in core and "qwen_ckpt_compat._repairs.streaming" in core
    for name in core:
        imported = _imports(name, modules[name], set(modules))
        assert not [m for m in imported if m.startswith(wings)], f"{name} imports a wing"


# ------------------------------------------------------------------------------------------ the registry


def _third_party_wrapper(function):
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return function(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def _owner() -> types.ModuleType:
    owner = types.ModuleType("owner")
    owner.greet = lambda name: f"hi {name}"
    return owner


@pytest.mark.release_independent
def test_undo_restores_the_exact_original_and_is_idempotent():
    registry = PatchRegistry()
    owner = _owner()
    original = owner.greet
    seen = []

    def loud(wrapped, instance, args, kwargs):
        seen.append(args)
        return wrapped(*args, **kwargs).upper()

    assert registry.wrap(owner, "greet", loud, group=("g",), what="loud") is True
    assert registry.wrap(owner, "greet", loud, group=("g",), what="loud") is False, "installed once"
    assert owner.greet("x") == "HI X" and seen == [("x",)]
    assert [str(i) for i in registry.installed()] == ["owner.greet: loud"]
    assert registry.undo(("g",)) == []
    assert owner.greet is original and registry.installed() == []


@pytest.mark.release_independent
def test_undo_leaves_a_later_wrapper_of_another_library_in_place():
    registry = PatchRegistry()
    owner = _owner()

    def loud(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs).upper()

    registry.wrap(owner, "greet", loud, group=("g",), what="loud")
    theirs = owner.greet = _third_party_wrapper(owner.greet)
    left = registry.undo(("g",))
    assert owner.greet is theirs, "their wrapper stays"
    assert owner.greet("x") == "hi x" and theirs.calls == 1, "ours passes through, theirs still runs"
    assert [install.active for install in left] == [False]
    assert "inert" in str(registry.installed()[0])
    assert registry.wrap(owner, "greet", loud, group=("g",), what="loud") is True, "active again, under theirs"
    assert owner.greet is theirs and owner.greet("x") == "HI X" and theirs.calls == 2
    assert len(registry.installed()) == 1


def test_disabling_the_import_hook_keeps_a_later_wrapper_of_check_imports(monkeypatch):
    import transformers.dynamic_module_utils as dynamic_module_utils

    from qwen_ckpt_compat import disable_remote_code_loading, enable_remote_code_loading

    enable_remote_code_loading()
    ours = dynamic_module_utils.check_imports
    theirs = _third_party_wrapper(ours)
    monkeypatch.setattr(dynamic_module_utils, "check_imports", theirs)
    try:
        disable_remote_code_loading()
        assert dynamic_module_utils.check_imports is theirs, "the later wrapper was not overwritten"
    finally:
        enable_remote_code_loading()
    assert dynamic_module_utils.check_imports is theirs, "enabled again: ours, beneath theirs, active again"


# ----------------------------------------------------------------------------------- state and description


def test_one_state_attribute_per_module_and_none_after_unpatch(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True}, fused_attention=True)
    attributes = {name for module in qwen.modules() for name in vars(module) if name.startswith("_qcc")}
    assert attributes == {ATTRIBUTE}
    info = describe(qwen)
    assert any("QWenBlock.__call__: checkpoint layer" in line for line in info.patches)
    assert any("fused causal attention" in line for line in info.patches)
    unpatch(qwen)
    assert not any(name.startswith("_qcc") for module in qwen.modules() for name in vars(module))
    after = describe(qwen).patches
    assert not any("checkpoint layer" in line or "fused" in line for line in after), "the class patch is undone"
    assert any("records its arguments" in line for line in after), "the repairs stay: the model's code needs them"


# ------------------------------------------------------------------------------------ the family registry


def test_every_family_owns_its_facts_and_every_fixture_belongs_to_one():
    names = [family.name for family in families()]
    assert len(names) == len(set(names))
    fixtures = [fixture for family in families() for fixture in family.fixtures]
    assert sorted(fixtures) == sorted(TINY_FAMILIES)
    for name, fixture in TINY_FAMILIES.items():
        family = next(f for f in families() if name in f.fixtures)
        assert fixture.family == family.name and fixture.target_modules == family.lora_targets
        assert family.lora_targets and family.model_types and family.checkpointed


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "qwen"}, "qwen"),
        ({"model_type": "qwen", "visual": {"layers": 2}}, "qwen_vl"),
        ({"model_type": "qwen", "audio": {"n_layer": 2}}, "qwen_audio"),
        ({"model_type": "chatglm"}, "chatglm"),
        ({"model_type": "chatglm", "padded_vocab_size": 65024}, "chatglm"),
        ({"model_type": "chatglm", "padded_vocab_size": 151552}, "glm4"),
        ({"model_type": "llama"}, None),
    ],
)
def test_the_doctor_and_the_core_name_a_family_the_same_way(config, expected):
    family = family_for_config(config)
    assert (family.name if family else None) == expected


@pytest.mark.release_independent
def test_importing_the_package_imports_no_wing_and_no_torch():
    import subprocess

    code = (
        "import sys, qwen_ckpt_compat\n"
        "heavy = [m for m in ('torch', 'transformers', 'qwen_ckpt_compat.speed', 'qwen_ckpt_compat.engines',"
        " 'qwen_ckpt_compat.families') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
