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


@pytest.fixture(scope="session", autouse=True)
def _record_python_and_torch(record_testsuite_property):
    """The Python and torch this run used, as JUnit properties: docs/compatibility.md shows them per row."""
    import platform

    import torch

    record_testsuite_property("python", platform.python_version())
    record_testsuite_property("torch", torch.__version__)


def pytest_collection_modifyitems(items: list) -> None:
    """Writes each test's `behaviour` marker into the JUnit report (skipped tests too), for docs/compatibility.md."""
    for item in items:
        for mark in item.iter_markers("behaviour"):
            item.user_properties.append(("behaviour", mark.args[0]))


@pytest.fixture
def qwen(tiny_qwen_dir):
    """A freshly loaded tiny Qwen v1 model (float32, train mode); the library's patch is undone afterwards."""
    from helpers import load_qwen

    from qwen_ckpt_compat import unpatch

    model = load_qwen(tiny_qwen_dir)
    yield model
    unpatch(model)


NATIVE_ARCHITECTURES = {
    # name: (config class, model class); tiny shapes, built locally.
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # transformers >= 4.37
}


def _native(name: str):
    import torch
    import transformers

    config_name, model_name = NATIVE_ARCHITECTURES[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, use_cache=True,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float()
    model.train()
    return model


@pytest.fixture
def native_llama():
    return _native("llama")


@pytest.fixture(params=sorted(NATIVE_ARCHITECTURES))
def native_model_factory(request):
    """A function returning fresh, identical tiny native models (Llama, Qwen2)."""
    return lambda: _native(request.param)
