"""The scripts in examples/ run end to end on this transformers release, each asserting what it shows.

Each runs in a subprocess, as a user runs it (no arguments: the tiny built-in model, offline, CPU;
``finetune_families.py`` once per family, with ``--family``). They take
about 10-20 s each, so the nox matrix runs them on its quick rows only (4.31, 4.35, 4.55 and the newest 5.x on
Python 3.11 and torch 2.13; ``QCC_RUN_EXAMPLES=0`` on the other rows, the era rows included); ``nox -s package``
also runs one from the installed wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))

pytestmark = pytest.mark.skipif(
    os.environ.get("QCC_RUN_EXAMPLES") == "0", reason="the examples run on the quick matrix rows (QCC_RUN_EXAMPLES=0)"
)


#: Run once per family (``--family``), each its own test: Qwen-VL's runs where its vision packages are installed.
FAMILY_EXAMPLE = "finetune_families.py"
FAMILIES = ("qwen", "qwen_vl", "qwen_audio", "chatglm", "glm4", "baichuan", "internlm")


def test_the_expected_examples_are_there():
    assert {"tutorial_lora.py", "finetune_qwen_style.py", FAMILY_EXAMPLE} <= set(SCRIPTS)


@pytest.mark.parametrize("script", [script for script in SCRIPTS if script != FAMILY_EXAMPLE])
def test_example_runs_and_its_checks_pass(script, tmp_path):
    _run(tmp_path, script)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_example_runs_and_its_checks_pass(family, tmp_path):
    """Model and tokenizer, the family's chat format, LoRA + checkpointing under Trainer, save, reload, generate."""
    from qwen_ckpt_compat.testing import TINY_FAMILIES

    fixture = TINY_FAMILIES[family]
    for package in fixture.packages + (("sentencepiece",) if fixture.sentencepiece else ()):
        pytest.importorskip(package)
    output = _run(tmp_path, FAMILY_EXAMPLE, "--family", family)
    assert f"{family}: loss " in output


def _run(tmp_path, script: str, *arguments: str) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TMPDIR": str(tmp_path),  # the tiny model and the outputs go to temporary folders: keep them here
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-8000:]}"
    assert result.returncode == 0, output
    assert result.stdout.rstrip().endswith(": OK"), output
    return output
