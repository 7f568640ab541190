"""Each family's remote slow tokenizer, on every row: it loads, encodes, pads, truncates, decodes, applies its
chat format and saves and reloads with the results of the release where it still worked unmodified
(``tests/reference/tokenizers_reference.json``, written by ``tools/make_tokenizer_reference.py``); without the
library it fails where the real one fails; the repairs are detected on the code and undone by ``unpatch``.
"""

from __future__ import annotations

import inspect
import json
import uuid

import pytest
from helpers import TRANSFORMERS
from packaging.version import Version
from tokenizer_cases import (
    REFERENCE_FILE,
    TOKENIZER_FIXTURES,
    basic,
    exercise,
    pad_takes_padding_side,
    padding_side_passed,
)

from qwen_ckpt_compat import unpatch
from qwen_ckpt_compat._loading import remote_code_loading_disabled
from qwen_ckpt_compat._patches import registry
from qwen_ckpt_compat._preparation import prepare_class
from qwen_ckpt_compat._repairs import tokenizers as repairs
from qwen_ckpt_compat.testing import TINY_FAMILIES

REFERENCE = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
V4_34, V4_45, V4_47, V5, V5_3 = (Version(v) for v in ("4.34.0", "4.45.0", "4.47.0", "5.0.0", "5.3.0"))


def _needs(name: str) -> None:
    if TINY_FAMILIES[name].sentencepiece:
        pytest.importorskip("sentencepiece")


def _write(name: str, tmp_path, label: str):
    # A folder name of its own: transformers names the remote module after the folder, and a class loaded before
    # (patched or not) must not be reused.
    return TINY_FAMILIES[name].write(tmp_path / f"tok_{name}_{label}_{uuid.uuid4().hex[:8]}")


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


@pytest.mark.parametrize("name", TOKENIZER_FIXTURES)
def test_tokenizer_matches_reference(name, tmp_path):
    _needs(name)
    path = _write(name, tmp_path, "lib")
    tokenizer = _load(path)
    results = exercise(tokenizer, path, TINY_FAMILIES[name].chat)
    reference = dict(REFERENCE[name]["results"])
    if name == "chatglm" and V4_47 <= TRANSFORMERS < V5_3:
        # 4.47 to 5.2 compute `unk_token_id` from the `unk_token` attribute, which ChatGLM answers with a read-only
        # property: the id of "<unk>", with or without the library; the other releases give None (never set)
        unk = {"unk_token_id": tokenizer.convert_tokens_to_ids("<unk>")}
        reference["ids"] = {**reference["ids"], **unk}
        reference["reloaded"] = {**reference["reloaded"], "ids": {**reference["reloaded"]["ids"], **unk}}
    for case in reference:
        assert results[case] == reference[case], f"{name}: {case} differs from transformers {REFERENCE[name]['transformers']}"
    if pad_takes_padding_side():
        assert padding_side_passed(tokenizer) == reference["padded"]


def _fails_unmodified(name: str) -> bool:
    """Where the real tokenizer of ``name`` fails without the library (docs/facts)."""
    if name in ("baichuan", "internlm"):
        return TRANSFORMERS >= V4_34
    if name == "chatglm":
        return TRANSFORMERS >= V4_45
    return False


@pytest.mark.parametrize("name", TOKENIZER_FIXTURES)
def test_tokenizer_fails_where_the_real_one_fails(name, tmp_path):
    _needs(name)
    path = _write(name, tmp_path, "plain")
    with remote_code_loading_disabled():
        if name in ("baichuan", "internlm") and _fails_unmodified(name):
            # 4.x: "object has no attribute 'sp_model'" (4.45.2, without protobuf, then tries a conversion that
            # wants it and reports that instead); 5.x: the same read, answered by a property object
            with pytest.raises((AttributeError, TypeError, ImportError), match="sp_model|property|protobuf"):
                _load(path)
            return
        tokenizer = _load(path)
        if name == "chatglm" and V4_34 <= TRANSFORMERS < V4_47:
            # its special tokens are read-only properties, which 4.34+ writes to tokenizer_config.json and sets
            # from it when loading (4.47+ keeps set special tokens in a table of its own, past the property)
            tokenizer.save_pretrained(tmp_path / "saved")
            # (4.45.2, without protobuf, then tries a conversion that wants it and reports that instead)
            with pytest.raises((AttributeError, ImportError), match="eos_token|can't set|protobuf"):
                _load(tmp_path / "saved")
        if name == "chatglm" and _fails_unmodified(name):
            with pytest.raises(TypeError, match="padding_side"):
                tokenizer("hello world")
            if TRANSFORMERS >= V5:
                with pytest.raises(AttributeError, match="batch_encode_plus"):
                    tokenizer.build_chat_input("hello")
            return
        results = basic(tokenizer)
    reference = REFERENCE[name]["results"]
    assert {case: results[case] for case in results} == {case: reference[case] for case in results}


def _installs(cls) -> list:
    return [install for install in registry.installed() if install.group == repairs.tokenizer_group(cls)]


@pytest.mark.parametrize("name", ("chatglm", "baichuan"))
def test_tokenizer_repairs_are_undone_and_redone(name, tmp_path):
    _needs(name)
    tokenizer = _load(_write(name, tmp_path, "undo"))
    cls = type(tokenizer)
    expected = {"chatglm": "_pad", "baichuan": "__init__"}[name]
    # detected on the code: the reordered __init__ wherever the code has that order, the _pad wrapper where this
    # transformers passes padding_side
    needed = TRANSFORMERS >= V4_45 if name == "chatglm" else True
    assert (expected in {install.name for install in _installs(cls)}) == needed
    original = cls.__dict__[expected]
    unpatch(tokenizer)
    assert _installs(cls) == []
    if needed:
        assert cls.__dict__[expected] is not original  # the original function object is back
        assert repairs.INSTALLED_MARK not in getattr(cls.__dict__[expected], "__dict__", {})
    prepare_class(cls)  # what the import hook does when the class loads
    assert (expected in {install.name for install in _installs(cls)}) == needed
    assert tokenizer("hello world")["input_ids"]


def _tokenizer_class(source: str):
    """A tokenizer class defined by ``source`` in a module of its own (as remote code is)."""
    import sys
    import types

    module = types.ModuleType(f"qcc_test_tokenizer_{uuid.uuid4().hex[:8]}")
    sys.modules[module.__name__] = module
    import linecache

    filename = f"<{module.__name__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module.Tokenizer


_SUPER_FIRST = '''
from transformers import PreTrainedTokenizer

class Tokenizer(PreTrainedTokenizer):
    def __init__(self, size=8, **kwargs):
        self.offset = 0
        super().__init__(**kwargs)
        self.table = {chr(97 + i): i + self.offset for i in range(size)}
        {extra}

    @property
    def vocab_size(self):
        return len(self.table)

    def get_vocab(self):
        return dict(self.table)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.table.get(token, 0)

    def _convert_id_to_token(self, index):
        return chr(97 + index)
'''


def test_attributes_moved_before_the_base_init_only_where_safe():
    fixed = _tokenizer_class(_SUPER_FIRST.replace("{extra}", "self.ready = True"))
    assert repairs.set_attributes_before_base_init(fixed)
    tokenizer = fixed(size=4)
    assert tokenizer.ready and tokenizer.vocab_size == 4 and tokenizer("abc", add_special_tokens=False)["input_ids"] == [0, 1, 2]
    repairs.undo_tokenizer_repairs(fixed)
    assert repairs.INSTALLED_MARK not in fixed.__dict__["__init__"].__dict__
    # A statement after the call that needs what the base __init__ made: left as it is.
    unsafe = _tokenizer_class(_SUPER_FIRST.replace("{extra}", "self.known = len(self.added_tokens_encoder)"))
    assert repairs.set_attributes_before_base_init(unsafe) == []


def test_pad_with_kwargs_or_padding_side_is_left_alone():
    source = _SUPER_FIRST.replace("{extra}", "pass") + '''
    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             return_attention_mask=None, **kwargs):
        return encoded_inputs
'''
    assert repairs.accept_padding_side(_tokenizer_class(source)) == []


def test_saved_read_only_special_tokens_reload_as_they_were(tmp_path):
    """ChatGLM answers eos/pad/unk with read-only properties: a saved tokenizer reloads with no added token (4.47+
    added them as new ids), and a saved value other than the property's is ignored with a warning."""
    _needs("chatglm")
    tokenizer = _load(_write("chatglm", tmp_path, "saved"))
    tokenizer.save_pretrained(tmp_path / "saved")
    again = _load(tmp_path / "saved")
    assert len(again) == len(tokenizer) and again.added_tokens_encoder == tokenizer.added_tokens_encoder
    assert again.unk_token_id == tokenizer.unk_token_id and again.eos_token_id == tokenizer.eos_token_id
    config_file = tmp_path / "saved" / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["eos_token"] = "<eos-other>"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.warns(UserWarning, match="answers eos_token with a read-only property"):
        other = _load(tmp_path / "saved")
    assert other.eos_token == tokenizer.eos_token


def test_clean_up_tokenization_restored_where_the_base_lacks_it():
    # the table set before the base __init__ (which asks for the vocabulary from 4.34 on)
    source = _SUPER_FIRST.replace("{extra}", "pass").replace(
        "self.offset = 0\n", "self.offset = 0\n        self.table = {chr(97 + i): i for i in range(size)}\n"
    ) + '''
    def convert_tokens_to_string(self, tokens):
        return self.clean_up_tokenization(" ".join(tokens))
'''
    cls = _tokenizer_class(source)
    from transformers import PreTrainedTokenizerBase

    base = inspect.getattr_static(PreTrainedTokenizerBase, "clean_up_tokenization", None)
    installed = repairs.restore_removed_methods(cls)
    assert bool(installed) == (base is None)  # 5.0-5.2 only
    text = "it 's here , is n't it ? yes . ' ok ' they 're , we 've , I 'm !"
    assert cls(size=4).decode([0, 1]) == "a b"
    if base is None:
        assert cls.clean_up_tokenization(text) == "it's here, isn't it? yes.'ok'they're, we've, I'm!"
        repairs.undo_tokenizer_repairs(cls)
        assert "clean_up_tokenization" not in cls.__dict__
    else:  # the repair's replacement answers as the base method does (static in 4.x, a method in 5.3+)
        expected = base.__func__(text) if isinstance(base, staticmethod) else base(None, text)
        assert repairs._clean_up_tokenization(text) == expected


@pytest.mark.parametrize("name", ("chatglm", "baichuan", "baichuan_7b", "internlm", "qwen_vl"))
def test_fixture_directories_hold_a_tokenizer(name, tmp_path):
    path = TINY_FAMILIES[name].write(tmp_path / name)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    module, class_name = config["auto_map"]["AutoTokenizer"][0].split(".")
    assert (path / f"{module}.py").is_file() and config["tokenizer_class"] == class_name
    assert (path / "tokenizer.model").is_file() == TINY_FAMILIES[name].sentencepiece
