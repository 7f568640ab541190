"""On this transformers release, what the doctor reports about a family's remote tokenizer and about an enable
override is what really happens (the family fixtures; ``test_doctor_release.py`` does the same for the model).

Each test reads the doctor's report, then runs the behaviour on the original classes (the library's repairs
undone) and compares: a problem reported must happen, and one not reported must not. Run on every matrix row.
"""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import fresh_dir
from tokenizer_cases import TOKENIZER_FIXTURES

from qwen_ckpt_compat import unpatch
from qwen_ckpt_compat._repairs import tokenizers as repairs
from qwen_ckpt_compat.doctor import diagnose
from qwen_ckpt_compat.testing import TINY_FAMILIES

TOKENIZER_PROBLEMS = {
    "tokenizer-pad-padding-side",
    "tokenizer-attributes-after-base-init",
    "tokenizer-saved-special-tokens",
    "tokenizer-saved-switches-dropped",
}
#: How a removed base method the tokenizer code calls shows: the fixture's call that reaches it.
_REACHES = {
    "batch_encode_plus": lambda tokenizer: tokenizer.build_chat_input("hello"),
    "clean_up_tokenization": lambda tokenizer: tokenizer.decode(tokenizer.encode("hello world, it's me!")),
}


def _reported(report) -> set:
    ids = {p.id for p in report.problems if p.id in TOKENIZER_PROBLEMS}
    for problem in report.problems:
        if problem.id == "removed-api-called" and problem.subject in repairs.REMOVED_METHODS:
            assert problem.fixed_by == "import"
            ids.add(f"removed-api-called:{problem.subject}")
    return ids


def _original_class(path):
    """The fixture's tokenizer class as its remote code defines it: loaded with the library, repairs undone."""
    from transformers import AutoTokenizer

    cls = type(AutoTokenizer.from_pretrained(str(path), trust_remote_code=True))
    unpatch(cls)
    return cls


def _happened(cls, path, tmp_path) -> set:
    happened = set()
    # loading (4.45.2 without protobuf tries a conversion that wants it, and reports that instead)
    try:
        tokenizer = cls.from_pretrained(str(path))
    except (AttributeError, TypeError, ImportError) as error:
        assert any(word in str(error) for word in ("sp_model", "property", "protobuf")), error
        happened.add("tokenizer-attributes-after-base-init")
        for klass in cls.__mro__:  # only that repair, to see the rest
            if repairs.is_remote_tokenizer_class(klass):
                repairs.set_attributes_before_base_init(klass)
        tokenizer = cls.from_pretrained(str(path))
    for name, reach in _REACHES.items():
        try:
            reach(tokenizer)
        except AttributeError as error:
            if name in str(error):
                happened.add(f"removed-api-called:{name}")
        except Exception:  # noqa: BLE001 - another fixture's method, or the padding below
            pass
    try:
        tokenizer("hello world")  # 4.45+ pads every encode (to attach the attention mask)
    except TypeError as error:
        assert "padding_side" in str(error)
        happened.add("tokenizer-pad-padding-side")
        repairs.accept_padding_side(next(k for k in cls.__mro__ if "_pad" in k.__dict__))
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(str(saved))
    written = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    given = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if any(name in given and name not in written for name in ("add_bos_token", "add_eos_token")):
        happened.add("tokenizer-saved-switches-dropped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = cls.from_pretrained(str(saved))
    except (AttributeError, ImportError) as error:
        assert any(word in str(error) for word in ("can't set", "setter", "_token", "protobuf")), error
        happened.add("tokenizer-saved-special-tokens")
    else:
        if len(again) != len(tokenizer):
            happened.add("tokenizer-saved-special-tokens")
    return happened


@pytest.mark.parametrize("name", TOKENIZER_FIXTURES)
def test_tokenizer_problems_are_what_the_tokenizer_does(name, tmp_path):
    if TINY_FAMILIES[name].sentencepiece:
        pytest.importorskip("sentencepiece")
    path = fresh_dir(tmp_path, TINY_FAMILIES[name].write, f"doctor_tok_{name}")
    reported = _reported(diagnose(str(path)))
    cls = _original_class(path)
    try:
        assert reported == _happened(cls, path, tmp_path)
    finally:
        repairs.undo_tokenizer_repairs(cls)


def _flags_on(model) -> bool:
    return any(module.__dict__.get("gradient_checkpointing") is True for module in model.modules())


@pytest.mark.parametrize("name", ("chatglm", "chatglm_37fe000"))
def test_enable_override_is_reported_where_enabling_enables_nothing(name, tmp_path):
    family = TINY_FAMILIES[name]
    path = fresh_dir(tmp_path, family.write, f"doctor_enable_{name}")
    problem = diagnose(str(path)).problem("enable-override-enables-nothing")
    model = family.load(path)
    unpatch(model)  # the remote code's own enable method again (5.x loads this code only with the library)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.gradient_checkpointing_enable()
        except TypeError as error:  # 4.35: the 2023 code's old method (another problem, the old-API one)
            assert "'enable'" in str(error) and problem is None
            return
    assert (problem is not None) == (not _flags_on(model))
    if problem is not None:
        assert problem.fixed_by == "import" and problem.subject == "ChatGLMPreTrainedModel.gradient_checkpointing_enable"
