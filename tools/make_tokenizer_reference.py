r"""Write ``tests/reference/tokenizers_reference.json``: what each family's remote tokenizer gives, unmodified.

For each fixture of ``tests/tokenizer_cases.py`` (Qwen v1, Qwen-VL, ChatGLM2/3, Baichuan2, InternLM v1), on the
transformers release where that tokenizer still works without the library (``REFERENCE_RELEASES`` there:
4.32.1, the newest row before 4.34, which breaks Baichuan2's and InternLM's ``__init__`` and ChatGLM's reload of
a saved tokenizer): encoding, padding on both sides (to the longest and to a length, lists and tensors),
truncation on both sides, decoding, the family's chat format, and the same again after ``save_pretrained`` and
a reload. The library's import hook is off (``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1``): these are transformers' and
the remote code's own results. ``tests/test_tokenizers.py`` holds every matrix row to them.

Run it in that matrix row's environment, from the repository root (a run updates the fixtures of its release
and keeps the others):

    uv pip install torch==2.13.0 -c constraints/4.32.1-apply-value.txt transformers peft accelerate \
        transformers_stream_generator safetensors sentencepiece pytest -e .
    python tools/make_tokenizer_reference.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["QWEN_CKPT_COMPAT_NO_IMPORT_HOOK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qcc-reference-hf-home-"))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from tokenizer_cases import REFERENCE_FILE, REFERENCE_RELEASES, exercise  # noqa: E402

from qwen_ckpt_compat.testing import TINY_FAMILIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REFERENCE_FILE)
    args = parser.parse_args()
    release = transformers.__version__
    fixtures = [name for name in REFERENCE_RELEASES if REFERENCE_RELEASES[name] == release]
    if not fixtures:
        sys.exit(f"transformers {release} is the reference release of no fixture: {REFERENCE_RELEASES}")
    document = json.loads(args.output.read_text(encoding="utf-8")) if args.output.is_file() else {}
    from transformers import AutoTokenizer

    for name in fixtures:
        with tempfile.TemporaryDirectory(prefix="qcc-tok-ref-") as tmp:
            path = TINY_FAMILIES[name].write(Path(tmp) / f"tokenizer_{name}")
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
            results = exercise(tokenizer, path, TINY_FAMILIES[name].chat)
        document[name] = {"transformers": release, "results": results}
        print(f"{name}: recorded on transformers {release}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
