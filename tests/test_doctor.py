"""`qwen-ckpt-compat doctor`: what it reads, what it says, its exit status, its JSON and its command line.

What the problems it reports *mean* on each transformers release is checked in test_doctor_release.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doctor_fixtures import (
    SUPPORTED_KEYWORDS,
    cache_repo,
    edit_config,
    prepend,
    schema_keywords,
    validation_errors,
    write_family,
    write_native,
    write_qwen,
)
from helpers import TRANSFORMERS
from packaging.version import Version

from qwen_ckpt_compat import doctor
from qwen_ckpt_compat.doctor import SCHEMA_PATH, diagnose, environment, render_text, run
from qwen_ckpt_compat.doctor.releases import KNOWN_AS_OF, MATRIX_PINS, MatrixPins, matrix_pins
from qwen_ckpt_compat.testing import REMOTE_CODE_FILES

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(SCHEMA_PATH.read_text())
FAMILY_PROBLEM_IDS = {"config-attribute-missing", "checkpointing-enabled-on-load", "load-raises-enable-typeerror",
                      "internlm-nan-loss"}


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m qwen_ckpt_compat doctor ...`` in a fresh interpreter."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    environment.pop("NO_COLOR", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "qwen_ckpt_compat", "doctor", *args],
        capture_output=True, text=True, env=environment, cwd=cwd, timeout=300, check=False,
    )


def _cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``qwen-ckpt-compat doctor ...`` in this process: the command's own parser (``__main__.main``), its output
    captured, returned as ``_cli`` returns the finished command. For what a fresh interpreter adds nothing to."""
    import contextlib
    import functools
    import io
    from unittest import mock

    from qwen_ckpt_compat.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(doctor, "run", functools.partial(doctor.run, out=out, err=err)):
        status = main(["doctor", *args])
    return subprocess.CompletedProcess(["qwen-ckpt-compat", "doctor", *args], status, out.getvalue(), err.getvalue())


_IN_ONE_INTERPRETER = """
import contextlib, functools, io, json, sys
from unittest import mock
from qwen_ckpt_compat import doctor
from qwen_ckpt_compat.__main__ import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \\
            mock.patch.object(doctor, "run", functools.partial(doctor.run, out=out, err=err)):
        status = main(["doctor", *args])
    results.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _clis_in_one_interpreter(*calls: tuple, env: dict, cwd: Path) -> list:
    """Several ``doctor`` commands, run by the command's own parser in one fresh interpreter (the environment read
    at import, as a new process reads it), each returned as ``_cli`` returns a finished command."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    environment.pop("NO_COLOR", None)
    environment.update(env)
    finished = subprocess.run(
        [sys.executable, "-c", _IN_ONE_INTERPRETER, json.dumps([list(call) for call in calls])],
        capture_output=True, text=True, env=environment, cwd=cwd, timeout=300, check=False,
    )
    assert finished.returncode == 0, finished.stderr
    results = json.loads(finished.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess(["doctor", *call], status, out, err)
            for call, (status, out, err) in zip(calls, results)]


def _assert_valid(document: dict) -> None:
    errors = validation_errors(document, SCHEMA)
    assert not errors, errors


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return write_qwen(tmp_path_factory.mktemp("doctor-qwen"))


@pytest.fixture(scope="module")
def qwen_report(qwen_dir):
    return diagnose(str(qwen_dir))


# --- what it reads ---------------------------------------------------------------------------------------


def test_tiny_qwen_model_facts(qwen_report, qwen_dir):
    model = qwen_report.model
    assert qwen_report.error is None and qwen_report.source == "directory"
    assert model["remote_code"] is True and model["model_type"] == model["family"] == "qwen"
    assert model["model_class"] == "QWenLMHeadModel" and model["model_file"] == "modeling_qwen.py"
    assert model["old_gradient_checkpointing_api"] is True
    assert model["checkpointing_class"] == "QWenPreTrainedModel"
    assert model["checkpointing_signature"] == "QWenPreTrainedModel._set_gradient_checkpointing(self, module, value)"
    assert model["checkpointing_owners"] == ["QWenModel"]
    assert model["decoder_blocks"] == ["QWenBlock"]
    assert model["supports_gradient_checkpointing"] is True
    assert model["qwen_style_remote_code"] is True
    # config.json's model and config classes, the tokenizer from tokenizer_config.json, the relative import
    assert model["code_files"] == sorted(REMOTE_CODE_FILES)


def test_reading_never_runs_the_remote_code_nor_loads_weights(tmp_path):
    path = write_qwen(tmp_path / "model")
    marker = tmp_path / "the remote code ran"
    for name in REMOTE_CODE_FILES:
        prepend(path / name, f"open({str(marker)!r}, 'w').close()\n")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    before = {name for name in sys.modules if name.startswith("transformers_modules")}

    report = diagnose(str(path))

    assert report.error is None and report.model["decoder_blocks"] == ["QWenBlock"]
    assert not marker.exists()
    assert {name for name in sys.modules if name.startswith("transformers_modules")} == before


def test_native_model(tmp_path):
    report = diagnose(str(write_native(tmp_path / "llama")))
    model = report.model
    assert model["remote_code"] is False and model["family"] == "llama" and model["model_class"] is None
    assert model["old_gradient_checkpointing_api"] is False and model["checkpointing_class"] is None
    assert model["decoder_blocks"] == ["LlamaDecoderLayer"]  # asked of transformers' own LlamaForCausalLM
    assert model["supports_gradient_checkpointing"] is True
    assert not {"old-gc-api-kwargs-ignored", "old-gc-api-enable-typeerror", "lora-no-input-grads"} & set(report.ids)


@pytest.mark.skipif(TRANSFORMERS >= Version("4.37"), reason="qwen2 exists in transformers >= 4.37")
def test_native_model_type_this_transformers_does_not_have(tmp_path):
    from transformers import AutoConfig

    path = write_native(tmp_path / "qwen2", model_type="qwen2")
    report = diagnose(str(path))
    assert report.problem("unknown-model-type").needs_action and report.exit_status == 1
    with pytest.raises((KeyError, ValueError)):  # what transformers itself does with it
        AutoConfig.from_pretrained(str(path))


def test_remote_code_without_auto_map(tmp_path):
    """The .py files are there, but config.json does not name them: transformers cannot load it."""
    from transformers import AutoConfig

    path = edit_config(write_qwen(tmp_path / "model"), drop=("auto_map",))
    report = diagnose(str(path))
    problem = report.problem("unknown-model-type")
    assert report.model["remote_code"] is False and problem.needs_action and report.exit_status == 1
    assert "modeling_qwen.py" in problem.fix and "auto_map" in problem.fix
    with pytest.raises((KeyError, ValueError)):
        AutoConfig.from_pretrained(str(path), trust_remote_code=True)


@pytest.mark.parametrize("family", ["chatglm", "baichuan", "internlm"])
def test_family_other_than_qwen(tmp_path, family):
    from transformers import PretrainedConfig

    path = write_family(tmp_path / family, family)
    report = diagnose(str(path))
    model = report.model
    prefix = {"chatglm": "ChatGLM", "baichuan": "Baichuan", "internlm": "InternLM"}[family]
    assert report.error is None
    assert model["family"] == family and model["remote_code"] and model["model_class"] == f"{prefix}ForCausalLM"
    assert model["old_gradient_checkpointing_api"] and model["checkpointing_class"] == f"{prefix}PreTrainedModel"
    assert model["checkpointing_owners"] == [{"chatglm": "GLMTransformer"}.get(family, f"{prefix}Model")]
    assert model["decoder_blocks"] == [
        {"chatglm": "GLMBlock", "baichuan": "BaichuanLayer", "internlm": "InternLMDecoderLayer"}[family]
    ]
    assert model["qwen_style_remote_code"] is False
    # the old-API problem of this release, as for Qwen: exactly one of the three
    assert len({"old-gc-api-reentrant-only", "old-gc-api-enable-typeerror", "old-gc-api-kwargs-ignored"} & set(report.ids)) == 1

    found = FAMILY_PROBLEM_IDS & set(report.ids)
    if family == "chatglm":
        # docs/facts/chatglm.md: ChatGLM reads config.max_length, which 5.x's PretrainedConfig no longer has.
        lacks = not hasattr(PretrainedConfig(), "max_length")
        assert found == ({"config-attribute-missing"} if lacks else set())
        if lacks:  # answered by the library's import: known families' configs get the pre-5.0 attributes
            problem = report.problem("config-attribute-missing")
            assert problem.subject == "max_length" and not problem.needs_action and problem.fixed_by == "import"
    elif family == "baichuan":
        assert found in ({"checkpointing-enabled-on-load"}, {"load-raises-enable-typeerror"})
        assert ("load-raises-enable-typeerror" in found) == ("old-gc-api-enable-typeerror" in report.ids)
        assert "tuple" in (report.problem("checkpointing-enabled-on-load") or report.problem("load-raises-enable-typeerror")).summary
    else:
        assert found == ({"internlm-nan-loss"} if TRANSFORMERS >= Version("5.0") else set())


@pytest.mark.release_independent
def test_family_facts_are_problems_the_doctor_names():
    from qwen_ckpt_compat._family_registry import families

    facts = [fact for family in families() for fact in family.doctor_facts]
    assert {fact.id for fact in facts} == {"internlm-nan-loss", "qwen-vl-vision-tower"}
    assert {fact.id for fact in facts} <= doctor.PROBLEM_IDS


@pytest.mark.release_independent
def test_every_problem_id_is_declared_and_documented():
    """Ids the code can emit are in PROBLEM_IDS (read off the source), and each has a row in docs/doctor.md."""
    import ast

    def ids_in(node):  # "id", or `"a" if condition else "b"`
        if isinstance(node, ast.IfExp):
            return ids_in(node.body) | ids_in(node.orelse)
        return {node.value} if isinstance(node, ast.Constant) else set()

    emitted = set()
    for path in Path(doctor.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            position = {"add": 0, "Problem": 0, "FamilyFact": 1}.get(name)
            if position is not None and len(node.args) > position:
                emitted |= ids_in(node.args[position])
    assert len(emitted) > 20 and emitted <= doctor.PROBLEM_IDS, emitted - doctor.PROBLEM_IDS
    documented = (ROOT / "docs" / "doctor.md").read_text()
    assert not [i for i in doctor.PROBLEM_IDS if f"`{i}`" not in documented]
    assert set(SCHEMA["$defs"]["problem"]["properties"]["id"]["enum"]) == doctor.PROBLEM_IDS
    with pytest.raises(ValueError, match="unknown problem id"):
        doctor.Problem("no-such-problem", "summary", "fix")


@pytest.mark.release_independent
def test_json_example_in_the_docs_follows_the_schema():
    text = (ROOT / "docs" / "doctor.md").read_text()
    example = json.loads(text.split("```json\n")[1].split("```")[0])
    _assert_valid(example)
    assert example["model"]["decoder_blocks"] == ["QWenBlock"]


def test_qwen_vl_is_told_apart_by_its_visual_config(tmp_path):
    path = edit_config(write_qwen(tmp_path / "vl"), visual={"image_size": 448})
    report = diagnose(str(path))
    assert report.model["family"] == "qwen_vl" and report.model["model_type"] == "qwen"
    assert "qwen-vl-vision-tower" in report.ids


def test_blocks_unknown_or_absent(tmp_path):
    path = write_qwen(tmp_path / "model")
    modeling = path / "modeling_qwen.py"
    modeling.write_text(modeling.read_text().replace('_no_split_modules = ["QWenBlock"]', "_no_split_modules = None"))
    report = diagnose(str(path))
    assert report.model["decoder_blocks"] is None  # not a literal list: unknown, nothing claimed

    modeling.write_text(modeling.read_text().replace("    _no_split_modules = None\n", ""))
    report = diagnose(str(path))
    assert report.model["decoder_blocks"] == []
    assert report.problem("options-not-honoured").needs_action is False  # reentrant only, even with the library


def test_supports_gradient_checkpointing_false(tmp_path):
    path = write_qwen(tmp_path / "model")
    modeling = path / "modeling_qwen.py"
    modeling.write_text(modeling.read_text().replace("supports_gradient_checkpointing = True", "supports_gradient_checkpointing = False"))
    report = diagnose(str(path))
    assert report.model["supports_gradient_checkpointing"] is False
    assert report.problem("checkpointing-not-supported").needs_action and report.exit_status == 1


def test_new_api_remote_code_is_not_old_api(tmp_path):
    path = write_qwen(tmp_path / "model")
    modeling = path / "modeling_qwen.py"
    modeling.write_text(modeling.read_text().replace(
        "def _set_gradient_checkpointing(self, module, value=False):",
        "def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None):",
    ).replace("module.gradient_checkpointing = value", "module.gradient_checkpointing = enable"))
    report = diagnose(str(path))
    assert report.model["old_gradient_checkpointing_api"] is False and report.model["checkpointing_class"] is None


def test_missing_packages_and_removed_imports_are_named(tmp_path):
    path = write_qwen(tmp_path / "model")
    prepend(path / "modeling_qwen.py", "import qcc_no_such_package_top\ntry:\n    import qcc_optional_package\nexcept ImportError:\n    pass\n")
    modeling = path / "modeling_qwen.py"
    modeling.write_text(modeling.read_text() + "\n\ndef _old():\n    from transformers import QccNoSuchName\n")
    report = diagnose(str(path))
    missing = [p for p in report.problems if p.id == "missing-package"]
    assert [p.subject for p in missing] == ["qcc_no_such_package_top"]  # the guarded import is not demanded
    assert missing[0].needs_action and "pip install qcc_no_such_package_top" in missing[0].fix
    removed = report.problem("removed-transformers-import")
    assert removed.subject == "transformers.QccNoSuchName" and "_old()" in removed.summary
    assert not removed.needs_action  # only calling _old() fails


# --- bad input: exit status 2, one message naming the path ----------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict:
    cases = {}
    cases["missing directory"] = (tmp_path / "nowhere", tmp_path / "nowhere", "no such directory")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    cases["a file"] = (a_file, a_file, "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config.json"] = (empty, empty / "config.json", "is missing")
    broken = write_qwen(tmp_path / "broken_json")
    (broken / "config.json").write_text('{"model_type": "qwen",\n "auto_map": }')
    cases["broken JSON"] = (broken, broken / "config.json", "not valid JSON (line 2, column")
    listed = write_qwen(tmp_path / "list_json")
    (listed / "config.json").write_text("[1, 2]")
    cases["JSON list"] = (listed, listed / "config.json", "must hold a JSON object")
    no_code = write_qwen(tmp_path / "no_modeling")
    (no_code / "modeling_qwen.py").unlink()
    cases["missing modeling file"] = (no_code, no_code / "modeling_qwen.py", "missing")
    no_sibling = write_qwen(tmp_path / "no_sibling")
    (no_sibling / "qwen_generation_utils.py").unlink()
    cases["missing sibling file"] = (no_sibling, no_sibling / "qwen_generation_utils.py", "modeling_qwen.py (line 21")
    syntax = write_qwen(tmp_path / "syntax_error")
    prepend(syntax / "modeling_qwen.py", "def broken(:\n")
    cases["syntax error"] = (syntax, syntax / "modeling_qwen.py", "not valid Python (line 1")
    bad_map = edit_config(write_qwen(tmp_path / "bad_auto_map"), auto_map={"AutoModelForCausalLM": "QWenLMHeadModel"})
    cases["bad auto_map"] = (bad_map, bad_map / "config.json", "auto_map")
    no_class = edit_config(write_qwen(tmp_path / "no_class"), auto_map={"AutoModelForCausalLM": "modeling_qwen.Nope"})
    cases["class not in file"] = (no_class, no_class / "modeling_qwen.py", "defines no class Nope")
    return cases


def test_bad_input_exits_2_naming_the_path(tmp_path):
    for name, (argument, path, words) in _bad_inputs(tmp_path).items():
        report = diagnose(str(argument))
        assert report.exit_status == 2, name
        assert report.error.path == str(path), name
        assert words in report.error.message, (name, report.error.message)
        _assert_valid(report.to_json())


@pytest.mark.release_independent
def test_bad_input_through_the_command_line_has_no_traceback(tmp_path):
    syntax = write_qwen(tmp_path / "syntax_error")
    prepend(syntax / "modeling_qwen.py", "def broken(:\n")
    for argument, extra in ((tmp_path / "nowhere", []), (syntax, ["--json"])):
        result = _cli_in_process(str(argument), *extra)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen-ckpt-compat doctor: cannot read ")
    document = json.loads(result.stdout)
    assert document["exit_status"] == 2 and document["error"]["path"] == str(syntax / "modeling_qwen.py")
    _assert_valid(document)


# --- JSON ------------------------------------------------------------------------------------------------


@pytest.mark.release_independent
def test_schema_uses_only_keywords_the_test_validator_checks():
    assert schema_keywords(SCHEMA) <= SUPPORTED_KEYWORDS


def test_reports_validate_against_the_schema(qwen_report, tmp_path):
    for report in (qwen_report, diagnose(None), diagnose(str(write_native(tmp_path / "llama"))),
                   diagnose(str(write_family(tmp_path / "glm", "chatglm")))):
        document = json.loads(json.dumps(report.to_json()))
        _assert_valid(document)
        assert document["schema_version"] == 3 and document["exit_status"] == report.exit_status


@pytest.mark.release_independent
def test_schema_validator_rejects_what_the_schema_forbids(qwen_report):
    good = json.loads(json.dumps(qwen_report.to_json()))
    assert good["problems"], "the tiny model has at least one problem on every release"
    mutations = {
        "missing required": lambda d: d.pop("versions"),
        "wrong type": lambda d: d["model"].__setitem__("old_gradient_checkpointing_api", "yes"),
        "extra property": lambda d: d["problems"][0].__setitem__("severity", "high"),
        "bad enum": lambda d: d["problems"][0].__setitem__("fixed_by", "magic"),
        "bad id": lambda d: d["problems"][0].__setitem__("id", "Not An Id"),
        "bad const": lambda d: d.__setitem__("schema_version", 1),
        "unknown id": lambda d: d["problems"][0].__setitem__("id", "no-such-problem"),
        "bad exit": lambda d: d.__setitem__("exit_status", 3),
        "decoder blocks not strings": lambda d: d["model"].__setitem__("decoder_blocks", [1]),
    }
    for name, mutate in mutations.items():
        document = json.loads(json.dumps(good))
        mutate(document)
        assert validation_errors(document, SCHEMA), name


def test_problem_fields_agree(qwen_report, tmp_path):
    reports = [qwen_report, diagnose(str(write_family(tmp_path / "b", "baichuan")))]
    for report in reports:
        for problem in report.problems:
            document = problem.to_json()
            assert document["fixed_by_library"] is (problem.fixed_by is not None)
            assert "\n" not in problem.summary and problem.fix
    with pytest.raises(ValueError):
        doctor.Problem("missing-package", "y", "z", fixed_by="magic")


# --- human output ----------------------------------------------------------------------------------------


def test_text_output_is_short_and_names_each_problem(qwen_report):
    text = render_text(qwen_report)
    assert "\033[" not in text
    assert "QWenPreTrainedModel._set_gradient_checkpointing(self, module, value)" in text
    for problem in qwen_report.problems:
        assert f"{problem.id}: " in text
    assert len(text.splitlines()) < 60
    assert max(len(line) for line in text.splitlines()) <= 130


@pytest.mark.release_independent
def test_colour_only_when_asked_or_on_a_terminal(qwen_dir, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    outputs = {}
    for name, stream, choice in (("pipe", io.StringIO(), "auto"), ("always", io.StringIO(), "always"),
                                 ("tty", Terminal(), "auto"), ("tty never", Terminal(), "never")):
        run(str(qwen_dir), colour=choice, out=stream, err=io.StringIO())
        outputs[name] = stream.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    stream = Terminal()
    run(str(qwen_dir), out=stream, err=io.StringIO())
    outputs["tty NO_COLOR"] = stream.getvalue()
    assert {name for name, text in outputs.items() if "\033[" in text} == {"always", "tty"}


@pytest.mark.release_independent
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_colour_on_a_real_terminal(tmp_path):
    """The command itself, writing to a pseudo-terminal: coloured (environment only, transformers shadowed: fast)."""
    import pty

    leader, follower = pty.openpty()
    environment = dict(os.environ, **_shadow(tmp_path, "transformers", "ImportError('shadowed')"))
    environment.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "qwen_ckpt_compat", "doctor"],
                               stdout=follower, stderr=subprocess.DEVNULL, env=environment)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 1
    os.close(leader)
    output = b"".join(chunks)
    assert b"transformers-unusable" in output and b"\033[" in output


# --- through the command line ----------------------------------------------------------------------------


@pytest.mark.release_independent
def test_command_line_json_on_the_tiny_model(qwen_dir, qwen_report):
    result = _cli_in_process(str(qwen_dir), "--json")
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    _assert_valid(document)
    assert result.returncode == document["exit_status"] == qwen_report.exit_status
    assert [p["id"] for p in document["problems"]] == qwen_report.ids
    assert "\033[" not in result.stdout


@pytest.mark.release_independent
def test_console_script_entry_point_runs_doctor():
    from qwen_ckpt_compat.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--help"])
    assert exit_info.value.code == 0


def test_hub_id_from_the_local_cache_only(tmp_path, qwen_dir):
    home = tmp_path / "hf-home"
    cache_repo(home / "hub", "someone/tiny-qwen", qwen_dir)
    # code in another repo: "repo--module.Class" (as some Qwen derivatives and ChatGLM checkpoints do)
    split = write_qwen(tmp_path / "split")
    for name in REMOTE_CODE_FILES:
        (split / name).unlink()
    edit_config(split, auto_map={"AutoConfig": "someone/tiny-qwen--configuration_qwen.QWenConfig",
                                 "AutoModelForCausalLM": "someone/tiny-qwen--modeling_qwen.QWenLMHeadModel"})
    (split / "tokenizer_config.json").unlink()
    cache_repo(home / "hub", "someone/weights-only", split)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env[variable] = str(home / "hub")

    # one run covers both: the model from the cache, its code from another cached repo; then a repo not cached
    result, missing = _clis_in_one_interpreter(
        ("someone/weights-only", "--json"), ("someone/not-cached",), env=env, cwd=tmp_path
    )
    document = json.loads(result.stdout)
    assert document["input"]["source"] == "hub-cache", result.stderr
    assert Path(document["input"]["path"]).parent.parent.name == "models--someone--weights-only"
    assert document["model"]["model_class"] == "QWenLMHeadModel"
    assert document["model"]["old_gradient_checkpointing_api"] is True
    assert document["model"]["decoder_blocks"] == ["QWenBlock"]
    assert result.returncode == document["exit_status"] != 2

    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "'someone/not-cached' is not in the local cache" in missing.stderr
    assert "never downloads" in missing.stderr


def _shadow(tmp_path: Path, package: str, error: str) -> dict:
    shadow = tmp_path / f"shadow-{package}"
    (shadow / package).mkdir(parents=True)
    (shadow / package / "__init__.py").write_text(f"raise {error}\n")
    return {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.release_independent
@pytest.mark.parametrize(
    "package, error, problem",
    [
        ("transformers", "ImportError('this transformers is broken')", "transformers-unusable"),
        ("torch", "ModuleNotFoundError(\"No module named 'torch'\", name='torch')", "torch-unusable"),
    ],
)
def test_broken_transformers_or_torch_is_reported_not_raised(tmp_path, qwen_dir, package, error, problem):
    env = _shadow(tmp_path, package, error)
    result = _cli(str(qwen_dir), "--json", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    document = json.loads(result.stdout)
    _assert_valid(document)
    ids = [p["id"] for p in document["problems"]]
    assert problem in ids and "transformers-unusable" in ids
    assert result.returncode == document["exit_status"] == 1
    assert document["capabilities"] is None
    # what is read statically is still there
    assert document["model"]["old_gradient_checkpointing_api"] is True
    assert document["model"]["decoder_blocks"] == ["QWenBlock"]

    if package == "transformers":
        text = _cli(str(qwen_dir), env=env)
        assert text.returncode == 1 and "Traceback" not in text.stderr and f"ACTION {problem}" in text.stdout


def test_environment_only(qwen_report):
    report = diagnose(None)
    assert report.model is None and report.path is None and report.error is None
    assert set(report.versions) >= {"python", "torch", "transformers", "peft", "accelerate", "deepspeed",
                                    "bitsandbytes", "transformers_stream_generator", "qwen_ckpt_compat"}
    import transformers

    assert report.versions["transformers"] == transformers.__version__
    assert report.capabilities["checkpointing_kwargs"] is (TRANSFORMERS >= Version("4.35"))
    # only the environment's problems; the model's come with a model
    assert set(report.ids) == {p.id for p in qwen_report.problems if p.id in set(report.ids)}
    assert not {"old-gc-api-kwargs-ignored", "import-before-loading", "removed-api-called"} & set(report.ids)


def test_the_doctor_asks_the_speed_wing_what_this_torch_can_do():
    """Asked through the core's hooks: a wrong module path would make both answers None, silently."""
    import torch.utils.checkpoint

    from qwen_ckpt_compat.doctor.environment import Runtime, installed_versions

    runtime = Runtime(installed_versions())
    assert runtime.selective_available is hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")
    assert runtime.attention_class_names == ("QWenAttention",)


# --- what breaks training: a peft that fails, advice naming releases that exist, resuming ----------------


def test_matrix_pins_are_the_constraints_files_pins():
    """The releases the doctor may name are the matrix rows' pins: one truth, constraints/*.txt."""
    found = set()
    for path in (ROOT / "constraints").glob("*.txt"):
        pins = dict(re.findall(r"^(transformers|peft|accelerate)==(\S+)$", path.read_text(), re.MULTILINE))
        found.add(MatrixPins(pins["transformers"], pins["peft"], pins["accelerate"]))
    assert found == set(MATRIX_PINS)
    assert list(MATRIX_PINS) == sorted(MATRIX_PINS, key=lambda row: Version(row.transformers))
    newest = (ROOT / "constraints" / f"{MATRIX_PINS[-1].transformers}-newest.txt").read_text()
    assert f"on {KNOWN_AS_OF}T00:00:00Z" in newest.splitlines()[1]


def _named_releases(text: str) -> set:
    """The releases an advice tells to install: ``'peft>=0.17.1'``, ``peft==0.13.0``."""
    return set(re.findall(r"\b(peft|accelerate|transformers)(?:==|>=)([0-9][0-9.]*[0-9])", text))


def _with_versions(monkeypatch, **versions) -> dict:
    """diagnose() sees these package versions (metadata) instead of the installed ones."""
    seen = dict(doctor.installed_versions(), **versions)
    monkeypatch.setattr(doctor, "installed_versions", lambda: dict(seen))
    return seen


def test_companion_advice_names_only_releases_that_exist(monkeypatch):
    """transformers 5.23/5.24 ask for peft 0.22.0, which has no release: the doctor must not say to install it."""
    minimums = {}
    monkeypatch.setattr(environment.Runtime, "_minimum", lambda self, module, attribute: minimums.get(attribute))
    known = {(package, getattr(row, package)) for row in MATRIX_PINS for package in ("peft", "accelerate")}

    minimums.update(MIN_PEFT_VERSION=Version("0.22.0"), ACCELERATE_MIN_VERSION=Version("2.0.0"))
    _with_versions(monkeypatch, peft="0.21.2", accelerate="1.15.0")
    report = diagnose(None)
    peft_fix = report.problem("peft-too-old-for-transformers").fix
    accelerate_fix = report.problem("accelerate-too-old").fix
    assert "peft >= 0.22.0 has no release yet" in peft_fix and "0.21.2" in peft_fix
    assert "accelerate >= 2.0.0 has no release yet" in accelerate_fix
    assert not _named_releases(peft_fix + accelerate_fix)

    minimums.update(MIN_PEFT_VERSION=Version("0.17.0"), ACCELERATE_MIN_VERSION=Version("0.26.0"))
    _with_versions(monkeypatch, peft="0.13.0", accelerate="0.25.0")
    report = diagnose(None)
    peft_fix = report.problem("peft-too-old-for-transformers").fix
    accelerate_fix = report.problem("accelerate-too-old").fix
    assert "pip install 'peft>=0.17.1'" in peft_fix and "pip install 'accelerate>=0.27.2'" in accelerate_fix
    assert _named_releases(peft_fix + accelerate_fix) <= known


_FAILING_PEFT = """\
class LoraConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def get_peft_model(model, config):
    raise AttributeError("module 'torch.distributed' has no attribute 'tensor'")
"""


def _shadow_peft(tmp_path: Path, source: str, version: str) -> dict:
    """A peft package (and its metadata) ahead of the installed one, on PYTHONPATH."""
    shadow = tmp_path / "shadow-peft"
    (shadow / "peft").mkdir(parents=True)
    (shadow / "peft" / "__init__.py").write_text(source)
    (shadow / f"peft-{version}.dist-info").mkdir()
    (shadow / f"peft-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: peft\nVersion: {version}\n")
    return {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.release_independent  # a stand-in peft: the library's code decides, not the release
def test_peft_whose_get_peft_model_fails_is_reported_not_raised(tmp_path):
    """transformers 4.45.2 with peft 0.21.2 and torch 2.13: peft imports, get_peft_model raises (peft's bug,
    with or without the library); simulated here on every row by a peft that fails the same way."""
    env = _shadow_peft(tmp_path, _FAILING_PEFT, "0.21.1")  # a release no matrix row pins
    result = _cli("--json", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    document = json.loads(result.stdout)
    _assert_valid(document)
    assert document["versions"]["peft"] == "0.21.1"
    problem = next(p for p in document["problems"] if p["id"] == "peft-fails-with-transformers")
    assert problem["needs_action"] and result.returncode == document["exit_status"] == 1
    assert "get_peft_model" in problem["summary"]
    assert "AttributeError: module 'torch.distributed' has no attribute 'tensor'" in problem["summary"]
    pins = matrix_pins(str(TRANSFORMERS))
    assert f"pip install 'peft=={pins.peft}'" in problem["fix"] and pins.transformers in problem["fix"]
    assert "import torch.distributed.tensor" in problem["fix"]  # the workaround for this very error
    text = _cli(env=env)
    assert text.returncode == 1 and "ACTION peft-fails-with-transformers" in text.stdout


@pytest.mark.release_independent  # a stand-in peft: the library's code decides, not the release
def test_peft_that_works_is_not_reported(tmp_path):
    working = _FAILING_PEFT.replace('raise AttributeError("module \'torch.distributed\' has no attribute \'tensor\'")',
                                    "return model")
    document = json.loads(_cli("--json", env=_shadow_peft(tmp_path, working, "0.21.2")).stdout)
    assert "peft-fails-with-transformers" not in [p["id"] for p in document["problems"]]


@pytest.mark.release_independent  # a stand-in peft: the library's code decides, not the release
def test_peft_failing_at_import_is_peft_unusable_with_a_release_to_install(tmp_path):
    env = _shadow_peft(tmp_path, "from transformers.modeling_layers_gone import X\n", "0.18.0")
    document = json.loads(_cli("--json", env=env).stdout)
    ids = [p["id"] for p in document["problems"]]
    assert "peft-unusable" in ids and "peft-fails-with-transformers" not in ids
    fix = next(p for p in document["problems"] if p["id"] == "peft-unusable")["fix"]
    assert f"pip install 'peft=={matrix_pins(str(TRANSFORMERS)).peft}'" in fix


def test_torch_load_probe_is_what_torch_load_does(monkeypatch):
    """torch 2.6 made weights_only=True the default of torch.load: the RNG state Trainer saves (numpy's
    among it) is refused, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set."""
    import torch

    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    refused = environment.torch_load_refuses_rng_state()
    assert (refused is not None) is (Version(torch.__version__).release >= (2, 6))
    if refused:
        assert refused.startswith("UnpicklingError: Weights only load failed")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert environment.torch_load_refuses_rng_state() is None


@pytest.mark.parametrize(
    "transformers_version, torch_refuses, reported",
    [("4.45.2", True, True), ("4.46.3", True, True), ("4.31.0", True, True), ("4.47.0", True, False),
     ("5.24.0", True, False), ("4.45.2", False, False)],
)
def test_resume_from_checkpoint_broken_on_the_installed_pair(monkeypatch, transformers_version, torch_refuses,
                                                              reported):
    refusal = "UnpicklingError: Weights only load failed" if torch_refuses else None
    monkeypatch.setattr(environment, "torch_load_refuses_rng_state", lambda: refusal)
    versions = _with_versions(monkeypatch, transformers=transformers_version)
    problem = diagnose(None).problem("resume-from-checkpoint-fails")
    assert (problem is not None) is reported
    if reported:
        assert not problem.needs_action  # only resuming fails, as chat_stream's or a function's import
        assert f"transformers {transformers_version}" in problem.summary and versions["torch"] in problem.summary
        assert "resume_from_checkpoint" in problem.summary and "Weights only load failed" in problem.summary
        assert "pip install 'transformers>=4.47.0'" in problem.fix and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" in problem.fix


_OVERRIDE_BODY = (
    "        if not self.supports_gradient_checkpointing:\n"
    "            raise ValueError(f\"{type(self).__name__} cannot checkpoint its layers.\")\n"
)


@pytest.mark.release_independent
@pytest.mark.parametrize(
    ("body", "reported"),
    [
        ("        pass\n", True),
        ("        return None\n", True),
        ("        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs)\n", False),
        ("        self._set_gradient_checkpointing(self.transformer.encoder, True)\n", False),
        ("        self.apply(lambda module: None)\n", False),
        ("        self.transformer.encoder.gradient_checkpointing = True\n", False),
        ("        setattr(self.transformer.encoder, 'gradient_checkpointing', True)\n", False),
    ],
)
def test_an_enable_override_is_judged_by_what_its_body_can_turn_on(tmp_path, body, reported):
    """ChatGLM3's revision 37fe000 only refuses; an override that enables anything its own way is not reported."""
    from qwen_ckpt_compat.testing import TINY_FAMILIES

    path = TINY_FAMILIES["chatglm_37fe000"].write(tmp_path / "glm")
    modeling = path / "modeling_chatglm.py"
    text = modeling.read_text()
    assert text.count(_OVERRIDE_BODY) == 1
    modeling.write_text(text.replace(_OVERRIDE_BODY, body))
    problem = diagnose(str(path)).problem("enable-override-enables-nothing")
    assert (problem is not None) is reported
    if reported:
        assert "modeling_chatglm.py line" in problem.summary and problem.fixed_by == "import"
