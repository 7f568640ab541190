"""On this transformers release, what the doctor reports for the tiny model is what really happens.

Each test runs both sides on the installed release: the doctor's report, and the behaviour itself, seen through
transformers' own loading (``remote_code_loading_disabled()``) where the model loads without the library, and
through the user's door with the library where it does not. A problem reported must happen; a problem not
reported must not. Run on every matrix row.
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch
import torch.utils.checkpoint
from doctor_fixtures import prepend, write_native
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    TRANSFORMERS,
    batch,
    enable,
    lora,
    reentrant_in_effect,
    step_grads,
)
from packaging.version import Version

from qwen_ckpt_compat import (
    CompatWarning,
    StreamingUnavailableError,
    UnsupportedTorchError,
    prepare_for_lora,
    unpatch,
)
from qwen_ckpt_compat._loading import remote_code_loading_disabled
from qwen_ckpt_compat._repairs.streaming import STREAM_PACKAGE
from qwen_ckpt_compat.doctor import diagnose
from qwen_ckpt_compat.testing import load_tiny_qwen, write_tiny_qwen

OLD_API_PROBLEMS = {"old-gc-api-reentrant-only", "old-gc-api-enable-typeerror", "old-gc-api-kwargs-ignored"}


@pytest.fixture
def fresh(tmp_path_factory):
    """Writes a new tiny Qwen directory: its own `transformers_modules` module, classes nobody patched."""

    def make(**config_overrides):
        return write_tiny_qwen(tmp_path_factory.mktemp("doctor-release"), **config_overrides)

    return make


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return diagnose(str(write_tiny_qwen(tmp_path_factory.mktemp("doctor-release-report"))))


def _load(path, report, **kwargs):
    """The model as transformers itself loads it; with the library's import fix only where the doctor says
    transformers cannot load it alone (checked in test_import_before_loading_is_what_loading_needs)."""
    if "import-before-loading" in report.ids:
        model = load_tiny_qwen(path, **kwargs)
        unpatch(model)  # the import also patched its classes as they loaded: transformers' own checkpointing again
    else:
        with remote_code_loading_disabled():
            model = load_tiny_qwen(path, **kwargs)
    return model.float().train()


def test_tiny_model_needs_no_action_with_the_library(report):
    """The rest of the test suite shows the tiny model loading and training with the library on every row."""
    assert report.exit_status == 0, [p for p in report.problems if p.needs_action]
    assert report.model["old_gradient_checkpointing_api"] and report.model["decoder_blocks"] == ["QWenBlock"]
    assert not {"config-attribute-missing", "missing-package", "removed-transformers-import",
                "checkpointing-enabled-on-load"} & set(report.ids)
    assert _not_honoured(report) == _TORCH_LACKS


def test_old_api_problem_is_what_enabling_does(report, fresh):
    model = _load(fresh(), report)
    try:
        enable(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        error = None
    except TypeError as raised:
        error = str(raised)
    if error and "gradient_checkpointing_kwargs" in error:
        happened = "old-gc-api-reentrant-only"  # <= 4.34: no kwargs at all; enabling without them is reentrant
        enable(model)
        assert reentrant_in_effect(model)
    elif error:
        assert "_set_gradient_checkpointing() got an unexpected keyword argument 'enable'" in error
        happened = "old-gc-api-enable-typeerror"
    else:
        assert reentrant_in_effect(model), "use_reentrant=False was asked, and honoured without the library"
        happened = "old-gc-api-kwargs-ignored"
    assert OLD_API_PROBLEMS & set(report.ids) == {happened}
    if happened == "old-gc-api-kwargs-ignored":
        summary = report.problem(happened).summary
        for option, present in (("every_n_layers", "every_n_layers"), ("offload", "offload")):
            assert (option in summary) is bool(report.capabilities[present])


def test_lora_after_enabling_is_reported_where_it_fails(report, fresh):
    peft_model = lora(_load(fresh(), report))
    try:
        enable(peft_model)
    except TypeError:
        assert "old-gc-api-enable-typeerror" in report.ids and "lora-no-input-grads" not in report.ids
        return
    if "lora-no-input-grads" in report.ids:
        with pytest.raises(RuntimeError, match="does not require grad"):
            step_grads(peft_model)
    else:  # 5.x: the enable method makes the embeddings' output require grad itself
        grads = step_grads(peft_model)
        assert grads and all(g.abs().sum() > 0 for g in grads.values())


def test_the_import_fixes_the_old_api_problems_it_is_said_to_fix(report, fresh):
    """Said fixed by the import (4.35 on): with the library imported before loading, transformers' own enable
    call after get_peft_model checkpoints non-reentrantly and every LoRA tensor gets its gradient."""
    by_import = {p.id for p in report.problems if p.fixed_by == "import"} & (OLD_API_PROBLEMS | {"lora-no-input-grads"})
    old_api = OLD_API_PROBLEMS & set(report.ids)
    assert len(old_api) == 1, "every release has one of the old-API problems"
    if old_api == {"old-gc-api-reentrant-only"}:
        assert by_import <= {"lora-no-input-grads"}, "<= 4.34: no kwargs to pass, the options need prepare_for_lora"
    else:
        assert old_api <= by_import
    if not by_import:
        return
    model = load_tiny_qwen(fresh()).float().train()
    try:
        peft_model = lora(model)
        # <= 4.34 takes no kwargs: the patched class's default (non-reentrant) is what the import gives there.
        enable(peft_model, **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if HAS_CHECKPOINTING_KWARGS else {}))
        assert not reentrant_in_effect(peft_model)
        grads = step_grads(peft_model)
        assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())
    finally:
        unpatch(model)


def test_prepare_for_lora_fixes_a_model_loaded_before_the_import(report, fresh):
    """What the import fixes, prepare_for_lora fixes on a model whose classes were not patched as they loaded."""
    assert {p.id for p in report.problems if p.id in OLD_API_PROBLEMS}, "every release has the old-API problem"
    model = load_tiny_qwen(fresh()).float().train()
    unpatch(model)  # as if loaded before the import
    try:
        peft_model = lora(model)
        prepare_for_lora(peft_model)
        assert not reentrant_in_effect(peft_model)  # the library's non-reentrant default reached torch
        grads = step_grads(peft_model)
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
    finally:
        unpatch(model)


def test_import_before_loading_is_what_loading_needs(report, fresh):
    problem = report.problem("import-before-loading")
    with remote_code_loading_disabled():
        if problem is None:
            load_tiny_qwen(fresh())
        else:
            with pytest.raises(ImportError) as error:
                load_tiny_qwen(fresh())
            message = str(error.value)
            assert STREAM_PACKAGE in message or "cannot import name" in message
            if "cannot import name" in message:
                missing = message.split("cannot import name ")[1].split()[0]
                assert missing in problem.summary  # BeamSearchScorer / DisjunctiveConstraint, as reported
            assert problem.fixed_by == "import"
    model = load_tiny_qwen(fresh())  # with the library imported: loads on every row
    assert torch.isfinite(model(**batch()).loss)


def test_import_hook_disabled_is_reported_when_loading_needs_it(report, fresh, monkeypatch):
    monkeypatch.setenv("QWEN_CKPT_COMPAT_NO_IMPORT_HOOK", "1")
    with remote_code_loading_disabled():
        without_hook = diagnose(str(fresh()))
    old_api = OLD_API_PROBLEMS | {"lora-no-input-grads"}
    needs_hook = any(p.fixed_by == "import" and p.id not in old_api for p in report.problems)
    assert ("import-hook-disabled" in without_hook.ids) is needs_hook
    assert "import-hook-disabled" not in report.ids
    # Without the hook the classes are not patched as they load: the old API's problems are prepare_for_lora's.
    assert {p.fixed_by for p in without_hook.problems if p.id in old_api} == {"prepare_for_lora"}


def test_chat_stream_is_reported_where_it_cannot_stream(report, fresh):
    from transformers import AutoTokenizer

    path = fresh()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    model = load_tiny_qwen(path).eval()
    if report.problem("chat-stream-unavailable") is None:
        pieces = list(model.chat_stream(tokenizer, "hi", max_new_tokens=4))
        assert pieces and all(isinstance(piece, str) for piece in pieces)
        return
    with pytest.raises(StreamingUnavailableError):
        list(model.chat_stream(tokenizer, "hi", max_new_tokens=4))
    if "import-before-loading" not in report.ids:  # transformers alone loads it: its chat_stream fails too
        alone = _load(fresh(), report).eval()
        with pytest.raises(Exception) as error:  # noqa: PT011 - whatever the stream package trips on
            list(alone.chat_stream(tokenizer, "hi", max_new_tokens=4))
        assert not isinstance(error.value, StreamingUnavailableError)


def test_removed_api_is_reported_where_the_forward_fails(report, fresh):
    import transformers.dynamic_module_utils as dynamic_module_utils

    problem = report.problem("removed-api-called")
    # transformers' own loading, with its load-time import check set aside (the stream package is not the point)
    with remote_code_loading_disabled(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)
        model = load_tiny_qwen(fresh()).float()
    if problem is None:
        assert torch.isfinite(model(**batch()).loss)
    else:
        assert problem.subject == "get_head_mask" and problem.fixed_by == "import"
        with pytest.raises(AttributeError, match="get_head_mask"):
            model(**batch())
        assert torch.isfinite(load_tiny_qwen(fresh())(**batch()).loss)  # with the library's import fix


def _transformers_alone(path, **kwargs):
    """Loaded by transformers' own loader, its load-time import check set aside (Qwen's stream package on 4.57+)."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    with remote_code_loading_disabled(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)
        return load_tiny_qwen(path, **kwargs)


def _checkpointing_on(model) -> bool:
    """The remote code's own flag, or the library's routed blocks."""
    return any(module.__dict__.get("gradient_checkpointing") is True for module in model.modules())


def test_checkpointing_turned_on_by_the_config_is_reported(report, fresh):
    path = fresh(gradient_checkpointing=True)
    with_flag = diagnose(str(path))
    assert not {"checkpointing-enabled-on-load", "load-raises-enable-typeerror"} & set(report.ids)
    if "load-raises-enable-typeerror" in with_flag.ids:
        problem = with_flag.problem("load-raises-enable-typeerror")
        assert problem.fixed_by == "import" and not problem.needs_action
        with pytest.raises(TypeError, match="unexpected keyword argument 'enable'"):
            _transformers_alone(path)  # inside from_pretrained
    else:
        assert "checkpointing-enabled-on-load" in with_flag.ids
        assert _checkpointing_on(_transformers_alone(path))  # nobody asked for it
    with pytest.warns(CompatWarning, match="turned gradient checkpointing on by itself"):
        # the library imported (a folder of its own: classes transformers loaded above would be reused unpatched)
        model = load_tiny_qwen(fresh(gradient_checkpointing=True))  # loads on every release, and says so
    assert _checkpointing_on(model)
    assert not _checkpointing_on(load_tiny_qwen(fresh()))


def test_missing_package_is_reported_where_loading_fails(fresh):
    path = fresh()
    prepend(path / "modeling_qwen.py", "import qcc_doctor_missing_package\n")
    found = diagnose(str(path))
    assert [p.subject for p in found.problems if p.id == "missing-package"] == ["qcc_doctor_missing_package"]
    assert found.exit_status == 1
    with pytest.raises(ImportError, match="not found in your environment: qcc_doctor_missing_package"):
        load_tiny_qwen(path)


def test_removed_transformers_import_is_reported_where_loading_fails(fresh):
    path = fresh()
    prepend(path / "modeling_qwen.py", "from transformers import BeamSearchScorer\n")
    problem = diagnose(str(path)).problem("removed-transformers-import")
    if problem is None:
        load_tiny_qwen(path)
    else:
        assert problem.subject == "transformers.BeamSearchScorer" and problem.needs_action
        with pytest.raises(ImportError, match="BeamSearchScorer"):
            load_tiny_qwen(path)


def test_config_attribute_missing_is_what_pretrained_config_lacks(fresh):
    """ChatGLM's case (config.max_length), on the tiny model: its config class never sets max_length."""
    from transformers import PretrainedConfig

    path = fresh()
    modeling = path / "modeling_qwen.py"
    modeling.write_text(modeling.read_text().replace(
        "        self.lm_head = nn.Linear(", "        self.max_sequence_length = config.max_length\n        self.lm_head = nn.Linear(", 1
    ))
    problem = diagnose(str(path)).problem("config-attribute-missing")
    if hasattr(PretrainedConfig(), "max_length"):
        assert problem is None
        assert load_tiny_qwen(path).max_sequence_length == PretrainedConfig().max_length
    else:
        # A known family (Qwen): the import answers the attribute with PretrainedConfig's value before 5.0.
        assert problem.subject == "max_length" and problem.fixed_by == "import" and not problem.needs_action
        with pytest.raises(AttributeError, match="max_length"):
            _transformers_alone(path)
        assert load_tiny_qwen(path).max_sequence_length == 20


# How each option shows up in prepare_for_lora's CompatWarnings when it cannot be honoured (whole words:
# torch's op `_scaled_dot_product_fused_attention_overrideable` is not `fused_attention`).
_WARNED_AS = {
    "gradient_checkpointing_kwargs": r"gradient_checkpointing_kwargs=|\{'use_reentrant': False",
    "every_n_layers": r"\bevery_n_layers=",
    "offload": r"\boffload=",
    "memory_budget": r"\bmemory_budget\b",
    "fused_attention": r"\bfused_attention\b",
    "selective": r"\bcontext_fn\b",  # selective recompute travels in the checkpoint kwargs
}


def _compat_warnings(model, **options) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_lora(model, **options)
    return "\n".join(str(w.message) for w in caught if issubclass(w.category, CompatWarning))


# torch < 2.5 has no selective activation checkpointing: prepare_for_lora refuses selective=True outright.
_TORCH_LACKS = set() if hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts") else {"selective"}


def _options_warned(make_model) -> set:
    """The options prepare_for_lora warns about (or refuses), asked for all (memory_budget apart: it excludes two
    others)."""
    selective = "selective" not in _TORCH_LACKS
    text = _compat_warnings(make_model(), every_n_layers=2, offload=True, selective=selective, fused_attention=True)
    text += "\n" + _compat_warnings(make_model(), memory_budget="1GiB")
    found = {option for option, marker in _WARNED_AS.items() if re.search(marker, text)}
    if not selective:
        with pytest.raises(UnsupportedTorchError, match="selective"):
            prepare_for_lora(make_model(), selective=True)
        found.add("selective")
    return found


def _not_honoured(report) -> set:
    problem = report.problem("options-not-honoured")
    return set(problem.subject.split(", ")) if problem else set()


def test_options_not_honoured_is_what_prepare_for_lora_warns_native(tmp_path):
    from conftest import _native

    report = diagnose(str(write_native(tmp_path / "llama")))
    assert _not_honoured(report) == _options_warned(lambda: _native("llama"))
    assert {"memory_budget", "fused_attention"} <= _not_honoured(report)  # old remote code only, everywhere


def test_options_not_honoured_is_what_prepare_for_lora_warns_remote(report, fresh):
    models = []

    def make():
        models.append(load_tiny_qwen(fresh()).float().train())
        return models[-1]

    try:
        assert _not_honoured(report) == _options_warned(make) == _TORCH_LACKS  # the tiny model: all that torch has
        path = fresh()
        modeling = path / "modeling_qwen.py"
        modeling.write_text(modeling.read_text().replace('    _no_split_modules = ["QWenBlock"]\n', ""))
        without_blocks = diagnose(str(path))
        assert without_blocks.model["decoder_blocks"] == []

        def make_without_blocks():
            models.append(load_tiny_qwen(path).float().train())
            return models[-1]

        assert _not_honoured(without_blocks) == _options_warned(make_without_blocks) == set(_WARNED_AS) - {"fused_attention"}
    finally:
        for model in models:
            unpatch(model)


def test_companion_problems_are_transformers_own_judgement(report, native_llama):
    import transformers.utils as transformers_utils

    accelerate = report.problem("accelerate-too-old")
    try:
        minimum = importlib.import_module("transformers.utils.import_utils").ACCELERATE_MIN_VERSION
    except AttributeError:
        assert accelerate is None  # this release names no minimum: nothing claimed
    else:
        assert (accelerate is not None) is (not transformers_utils.is_accelerate_available(minimum))

    peft_problem = report.problem("peft-too-old-for-transformers")
    try:
        minimum = importlib.import_module("transformers.integrations.peft").MIN_PEFT_VERSION
    except (ImportError, AttributeError):
        assert peft_problem is None
        return
    from peft import LoraConfig
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(minimum)
        transformers_says_too_old = False
    except ValueError:
        transformers_says_too_old = True
    assert (peft_problem is not None) is transformers_says_too_old
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    if peft_problem is None:
        native_llama.add_adapter(config)
    else:
        with pytest.raises(ValueError, match="version of PEFT"):
            native_llama.add_adapter(config)


def test_the_reported_input_grads_capability_is_the_release_s(report):
    """5.0 made the enable method add the input-embedding hook itself (measured on the matrix rows)."""
    assert report.capabilities["enable_adds_input_grads"] is (TRANSFORMERS >= Version("5.0"))


def test_resume_from_checkpoint_is_reported_where_it_fails(report, native_llama, tmp_path):
    """Trainer saves a checkpoint (its rng_state.pth too), then a second Trainer resumes from it."""
    import pickle

    from transformers import Trainer, TrainingArguments

    def trainer(model, steps):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=1,
                                 per_device_train_batch_size=2, report_to=[], logging_steps=100, seed=0)
        ids = batch(vocab_size=native_llama.config.vocab_size, batch_size=4, length=8)["input_ids"]
        data = [{"input_ids": row, "labels": row} for row in ids]
        return Trainer(model=model, args=args, train_dataset=data)

    trainer(native_llama, 1).train()
    resumed = trainer(native_llama, 2)
    problem = report.problem("resume-from-checkpoint-fails")
    if problem is None:
        resumed.train(resume_from_checkpoint=True)
        assert resumed.state.global_step == 2
    else:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            resumed.train(resume_from_checkpoint=True)
        assert "UnpicklingError: Weights only load failed" in problem.summary


_LORA_IN_A_FRESH_INTERPRETER = """\
import sys
from qwen_ckpt_compat.testing import load_tiny_qwen, write_tiny_qwen
model = load_tiny_qwen(write_tiny_qwen(sys.argv[1]))
from helpers import lora
lora(model)
"""


def test_peft_failing_is_reported_where_get_peft_model_fails(report, tmp_path):
    """What a training script gets: LoRA on the tiny Qwen, in a fresh interpreter, with the library."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", _LORA_IN_A_FRESH_INTERPRETER, str(tmp_path / "model")]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path),
                            timeout=600, check=False)
    problem = report.problem("peft-fails-with-transformers")
    if problem is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert problem.summary.rsplit("): ", 1)[1] in result.stderr.strip().splitlines()[-1]
