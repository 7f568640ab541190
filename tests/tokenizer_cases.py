"""What the tokenizer tests do to each family's remote tokenizer, shared by ``tools/make_tokenizer_reference.py``
(which records the results on the release where that tokenizer still worked unmodified) and
``tests/test_tokenizers.py`` (which compares every row's results with them).

Every operation's result is recorded as plain JSON (lists, strings, numbers); one that raises is recorded as
``{"error": "<exception type>"}``, so that a failure of the real code on its own release (ChatGLM's tokenizer
pads on the left only: right padding is an ``AssertionError`` there) is part of the reference too.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

#: The fixtures whose tokenizers are exercised (baichuan_7b has Baichuan2's tokenizer, as the real 7B has).
TOKENIZER_FIXTURES = ("qwen", "qwen_vl", "chatglm", "baichuan", "internlm")
#: The release each fixture's reference is recorded on: the newest on which its real tokenizer works unmodified.
#: ChatGLM's saved tokenizer no longer loads from 4.34 (its special tokens are read-only properties) and its
#: ``_pad`` breaks on 4.45; Baichuan2's and InternLM's ``__init__`` breaks on 4.34: so 4.32.1, the newest row
#: before 4.34, for all of them (Qwen's works on every 4.x release).
REFERENCE_RELEASES = {name: "4.32.1" for name in TOKENIZER_FIXTURES}
# Families added later test their tokenizer in their own test file, against the same kind of reference: GLM-4's
# on 4.43.4, the newest row before 4.45 breaks its `_pad` (it was written for 4.40+ and has no
# `apply_chat_template` before 4.34); Qwen-Audio's (Qwen v1's, with audio spans) on 4.32.1 as Qwen's.
REFERENCE_RELEASES.update({"glm4": "4.43.4", "qwen_audio": "4.32.1"})
REFERENCE_FILE = Path(__file__).resolve().parent / "reference" / "tokenizers_reference.json"

TEXTS = ["hello world, how are you?", "你好，世界", "the test token is good: 42!"]
PAIR = ("hello", "how are you?")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):  # GLM-4's tokens are bytes
        return repr(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        return {str(k): _plain(value[k]) for k in sorted(value.keys())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _record(operation: Callable[[], Any]) -> Any:
    try:
        return _plain(operation())
    except Exception as error:  # noqa: BLE001 - a failure is a result too
        return {"error": type(error).__name__}


def pad_takes_padding_side() -> bool:
    """Whether this transformers' ``pad`` / ``__call__`` take ``padding_side`` (4.45 and later)."""
    from transformers import PreTrainedTokenizerBase

    return "padding_side" in inspect.signature(PreTrainedTokenizerBase.pad).parameters


def _padded(tokenizer: Any, side: str, passed: bool, **kwargs: Any) -> Any:
    def run() -> Any:
        before = tokenizer.padding_side
        try:
            if passed:  # the attribute says the other side: the argument must win
                tokenizer.padding_side = "right" if side == "left" else "left"
                return tokenizer(TEXTS, padding_side=side, **kwargs)
            tokenizer.padding_side = side
            return tokenizer(TEXTS, **kwargs)
        finally:
            tokenizer.padding_side = before

    return _record(run)


def _pad_cases(tokenizer: Any, passed: bool) -> Dict[str, Any]:
    results = {}
    for side in ("left", "right"):
        results[f"{side}_longest"] = _padded(tokenizer, side, passed, padding=True)
        results[f"{side}_max_length"] = _padded(tokenizer, side, passed, padding="max_length", max_length=24)
        results[f"{side}_pt"] = _padded(tokenizer, side, passed, padding=True, return_tensors="pt")
    return results


def basic(tokenizer: Any) -> Dict[str, Any]:
    """Encoding, padding (attribute), truncation, decoding: what a reloaded tokenizer must give again."""
    results: Dict[str, Any] = {
        "tokenize": _record(lambda: tokenizer.tokenize(TEXTS[0])),
        "encode": [_record(lambda t=t: tokenizer(t)["input_ids"]) for t in TEXTS],
        "encode_plain": _record(lambda: tokenizer.encode(TEXTS[2], add_special_tokens=False)),
        "pair": _record(lambda: tokenizer(*PAIR)["input_ids"]),
        "truncate": _record(lambda: tokenizer(TEXTS[0], truncation=True, max_length=5)["input_ids"]),
        "padded": _pad_cases(tokenizer, passed=False),
    }
    ids = _record(lambda: tokenizer(TEXTS[2])["input_ids"])
    results["decode"] = _record(lambda: tokenizer.decode(ids))
    results["decode_skip"] = _record(lambda: tokenizer.decode(ids, skip_special_tokens=True))
    results["batch_decode"] = _record(
        lambda: tokenizer.batch_decode([tokenizer(t)["input_ids"] for t in TEXTS], skip_special_tokens=True)
    )
    results["ids"] = _record(
        lambda: {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    )
    results["vocab_size"] = _record(lambda: tokenizer.vocab_size)
    return results


def exercise(tokenizer: Any, path: Path, chat: Callable[[Any, Path], Dict[str, Any]]) -> Dict[str, Any]:
    """Every case on ``tokenizer`` (loaded from ``path``), its chat format, and its save and reload."""
    results = basic(tokenizer)
    results["chat"] = _record(lambda: chat(tokenizer, path))
    results["truncate_left"] = _record(lambda: _truncate_left(tokenizer))

    def reload() -> Any:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="qcc-tok-") as saved:
            tokenizer.save_pretrained(saved)
            again = AutoTokenizer.from_pretrained(saved, trust_remote_code=True)
            return basic(again)

    results["reloaded"] = _record(reload)
    return results


def _truncate_left(tokenizer: Any) -> Any:
    before = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(TEXTS[0], truncation=True, max_length=5)["input_ids"]
    finally:
        tokenizer.truncation_side = before


def padding_side_passed(tokenizer: Any) -> Dict[str, Any]:
    """The padding cases with ``padding_side=`` passed (4.45+); each must equal :func:`basic`'s ``padded``."""
    return _pad_cases(tokenizer, passed=True)


def write_fixture(name: str, directory: os.PathLike) -> Path:
    from qwen_ckpt_compat.testing import TINY_FAMILIES

    return TINY_FAMILIES[name].write(Path(directory))
