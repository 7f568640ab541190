"""Shared fixtures: every test runs offline against the tiny Qwen v1 model the package ships."""

from __future__ import annotations

import os
import tempfile

# Set before transformers is imported anywhere: no Hub, and a private cache for the dynamic
# modules that ``trust_remote_code=True`` copies, so test runs never touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qcc-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory):
    """A local model directory holding the tiny Qwen v1 remote-code model (written once per session)."""
    from qwen_ckpt_compat.testing import write_tiny_qwen

    return write_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))
