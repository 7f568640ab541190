"""The package itself: cheap import, public API, typing marker, capability flags against the releases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TRANSFORMERS
from packaging.version import Version

import qwen_ckpt_compat


@pytest.mark.release_independent
def test_import_is_cheap_and_does_not_import_peft_transformers_or_torch():
    code = (
        "import sys, qwen_ckpt_compat; "
        "print(sorted(m for m in ('peft', 'transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.release_independent
def test_public_api_resolves():
    for name in qwen_ckpt_compat.__all__:
        assert getattr(qwen_ckpt_compat, name) is not None, name
    assert set(qwen_ckpt_compat.__all__) <= set(dir(qwen_ckpt_compat))
    with pytest.raises(AttributeError):
        qwen_ckpt_compat.no_such_name  # noqa: B018


@pytest.mark.release_independent
def test_typed_package_and_version():
    assert (Path(qwen_ckpt_compat.__file__).parent / "py.typed").is_file()
    assert Version(qwen_ckpt_compat.__version__) >= Version("0.1.0")


@pytest.mark.parametrize(
    "flag, first_release",
    [
        ("new_set_gradient_checkpointing_call", "4.35.0"),
        ("checkpointing_kwargs", "4.35.0"),
        ("old_format_fallback", "4.36.0"),
        ("every_n_layers", "5.16.0"),
        ("offload", "5.17.0"),
        ("activation_checkpointing_api", "5.23.0"),
    ],
)
def test_capability_flags_match_the_documented_releases(flag, first_release):
    """Detected on the installed transformers; from which release each exists:
    docs/facts/transformers-releases.md ("Capabilities and how they are detected")."""
    assert getattr(qwen_ckpt_compat.capabilities(), flag) is (TRANSFORMERS >= Version(first_release))


def test_native_default_use_reentrant():
    expected = None if TRANSFORMERS < Version("4.38") else TRANSFORMERS < Version("5.0")
    assert qwen_ckpt_compat.capabilities().native_default_use_reentrant is expected


def test_demo_shows_the_problem_then_trains_with_falling_loss():
    import io
    import re

    from qwen_ckpt_compat._demo import run_demo

    out = io.StringIO()
    run_demo(steps=3, out=out)
    text = out.getvalue()
    without, with_library = text.split("2. With qwen-ckpt-compat")
    assert "fails" in without or "kwargs ignored" in without or "no checkpointing kwargs" in without
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", with_library)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert with_library.count("-> non-reentrant checkpointing") == 3
    assert "LoRA grads flowing 20/20" in with_library


def test_demo_prints_the_same_losses_every_run():
    """The demo is seeded (LoRA's initialisation drew from torch's global generator)."""
    import io
    import re

    import torch

    from qwen_ckpt_compat._demo import run_demo

    runs = []
    for seed in (1, 2):  # whatever the caller's random state
        torch.manual_seed(seed)
        out = io.StringIO()
        run_demo(steps=3, out=out)
        runs.append(re.findall(r"step \d: loss (\d+\.\d+)", out.getvalue()))
    assert len(runs[0]) == 3 and runs[0] == runs[1]
    generator_after = torch.random.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(generator_after, torch.random.get_rng_state()), "the caller's random state is left as it was"
