"""GLM-4-9B(-chat): what only this family does (docs/facts/glm4.md). The generic suites (test_families.py,
test_families_newer.py, test_house.py) take its fixture from ``TINY_FAMILIES`` by themselves.

- Recognised apart from ChatGLM2/3 (both say ``model_type`` "chatglm"), on a class and on a ``config.json``.
- Without the library the fixture fails where the real code fails: on 4.31-4.35 it does not load (its config has no
  ``_attn_implementation``), on 4.36-4.57 its own ``gradient_checkpointing_enable`` enables nothing, on 5.x it does
  not load (``max_length``); its tokenizer stops encoding on 4.45 (``_pad``).
- With it: the latest revision (no enable override, no old form) recomputes every block, in the remote code's own
  hard-coded non-reentrant mode; the tokenizer gives 4.43.4's results on every row.
"""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import (
    TRANSFORMERS,
    count_calls,
    family_batch,
    family_of_fixture,
    fresh_dir,
    load_family,
    step_grads,
)
from packaging.version import Version
from tokenizer_cases import REFERENCE_FILE, exercise, pad_takes_padding_side, padding_side_passed

from qwen_ckpt_compat import unpatch
from qwen_ckpt_compat._family_registry import family_for_config, family_of
from qwen_ckpt_compat._loading import remote_code_loading_disabled
from qwen_ckpt_compat.testing._glm4 import write_tiny_glm4_latest

V4_36, V4_45, V5 = Version("4.36.0"), Version("4.45.0"), Version("5.0.0")


@pytest.fixture
def glm4():
    return family_of_fixture("glm4")


def test_glm4_is_told_apart_from_chatglm(glm4, tmp_path):
    model = load_family(glm4, fresh_dir(tmp_path, glm4.write, "glm4_family"))
    assert family_of(model).name == "glm4"
    assert family_for_config({"model_type": "chatglm", "padded_vocab_size": 151552}).name == "glm4"
    assert family_for_config({"model_type": "chatglm", "padded_vocab_size": 65024}).name == "chatglm"
    chatglm = load_family(
        family_of_fixture("chatglm"), fresh_dir(tmp_path, family_of_fixture("chatglm").write, "glm3")
    )
    assert family_of(chatglm).name == "chatglm"
    unpatch(model)
    unpatch(chatglm)


def test_glm4_fails_without_the_library_where_the_real_code_fails(glm4, tmp_path):
    path = fresh_dir(tmp_path, glm4.write, "glm4_plain")
    with remote_code_loading_disabled():
        if TRANSFORMERS < V4_36:
            with pytest.raises(AttributeError, match="_attn_implementation"):
                glm4.load(path)
            return
        if TRANSFORMERS >= V5:
            with pytest.raises(AttributeError, match="max_length"):
                glm4.load(path)
            return
        model = load_family(glm4, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()  # the June 2024 override: enables nothing
    with count_calls(model, glm4.block) as counts:
        step_grads(model, family_batch(glm4))
    assert set(counts.values()) == {1}, "no block recomputed"


def test_glm4_latest_revision_recomputes_every_block_in_its_own_mode(glm4, tmp_path, monkeypatch):
    """The revision after its discussion 60 has neither the old form nor an enable override: transformers' own
    enable call flags its ``GLMTransformer``, which checkpoints with its hard-coded ``use_reentrant=False``. The
    library installs ChatGLM's repairs on it all the same (without them it does not load on 5.x). Before 4.35
    transformers has no enable call for such code (AttributeError); that revision asks for transformers >= 4.44."""
    from helpers import spy_checkpoint

    model = load_family(glm4, fresh_dir(tmp_path, write_tiny_glm4_latest, "glm4_latest"))
    if TRANSFORMERS < Version("4.35.0"):
        with pytest.raises(AttributeError, match="_set_gradient_checkpointing"):
            model.gradient_checkpointing_enable()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, glm4.block) as counts:
        grads = step_grads(model, family_batch(glm4))
    assert set(counts.values()) == {2}
    assert calls and all(c.get("use_reentrant") is False for c in calls), "hard-coded in the owner's call"
    assert all(g.abs().sum() > 0 for g in grads.values())
    unpatch(model)


def test_glm4_config_answers_attn_implementation_on_old_releases(glm4, tmp_path):
    """The generic repair (`_repairs/config.py`, LATER_CONFIG_DEFAULTS): 4.31-4.35's PretrainedConfig lacks it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        str(fresh_dir(tmp_path, glm4.write, "glm4_config")), trust_remote_code=True
    )
    if TRANSFORMERS < V4_36:
        assert config._attn_implementation == "eager" and "_attn_implementation" not in config.to_dict()


def test_glm4_tokenizer_matches_the_4_43_reference(glm4, tmp_path):
    from transformers import AutoTokenizer

    reference = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))["glm4"]
    assert reference["transformers"] == "4.43.4"
    path = fresh_dir(tmp_path, glm4.write, "glm4_tok")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    results = exercise(tokenizer, path, glm4.chat)
    expected = dict(reference["results"])
    if not hasattr(tokenizer, "apply_chat_template"):  # before 4.34: transformers has no chat templates
        expected["chat"] = {k: v for k, v in expected["chat"].items() if k != "template_ids"}
    for case in expected:
        assert results[case] == expected[case], f"glm4: {case} differs from transformers 4.43.4"
    if pad_takes_padding_side():
        assert padding_side_passed(tokenizer) == expected["padded"]


def test_glm4_tokenizer_fails_unmodified_from_4_45(glm4, tmp_path):
    from transformers import AutoTokenizer

    path = fresh_dir(tmp_path, glm4.write, "glm4_tok_plain")
    with remote_code_loading_disabled():
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    if TRANSFORMERS < V4_45:
        assert tokenizer("hello world")["input_ids"][:2] == tokenizer.get_prefix_tokens()
        return
    with pytest.raises(TypeError, match="padding_side"):
        tokenizer("hello world")
    if TRANSFORMERS >= V5:
        with pytest.raises(AttributeError, match="batch_encode_plus"):
            tokenizer.build_chat_input("hello")


def test_glm4_latest_revision_warns_that_a_reentrant_request_cannot_be_honoured(glm4, tmp_path):
    """Left to transformers, its own checkpoint call writes use_reentrant=False: asking for True warns, False not."""
    from qwen_ckpt_compat import CompatWarning, prepare_for_lora

    if TRANSFORMERS < Version("4.35.0"):
        pytest.skip("transformers < 4.35 has no enable call for code without the old form (see the test above)")
    model = load_family(glm4, fresh_dir(tmp_path, write_tiny_glm4_latest, "glm4_latest_modes"))
    with pytest.warns(CompatWarning, match=r"use_reentrant=True cannot be honoured"):
        prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    unpatch(model)
