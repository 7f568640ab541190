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
# Selective recompute at every length: the tiny models' batches are far below its threshold (the threshold's own
# tests set it themselves).
os.environ["QWEN_CKPT_COMPAT_SELECTIVE_MIN_TOKENS"] = "0"

import pytest  # noqa: E402

from qwen_ckpt_compat.testing import TINY_FAMILIES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory):
    """A local model directory holding the tiny Qwen v1 remote-code model (written once per session)."""
    from qwen_ckpt_compat.testing import write_tiny_qwen

    return write_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(autouse=True)
def _library_environment_kept():
    """No test leaves a ``QWEN_CKPT_COMPAT_*`` variable changed: the next tests' subprocesses (examples, engines,
    the doctor's command line) inherit it. Importing ``tools/make_reference.py`` once set
    ``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1`` for the rest of the session."""
    before = {k: v for k, v in os.environ.items() if k.startswith("QWEN_CKPT_COMPAT_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("QWEN_CKPT_COMPAT_")}
    assert after == before, f"the test changed the environment: {before} -> {after}"


@pytest.fixture(scope="session", autouse=True)
def _record_python_and_torch(record_testsuite_property):
    """The Python and torch this run used, as JUnit properties: docs/compatibility.md shows them per row."""
    import platform

    import torch

    record_testsuite_property("python", platform.python_version())
    record_testsuite_property("torch", torch.__version__)


# Test files about Qwen v1 alone; the family tests say their family through a parameter or their name.
_QWEN_FILES = (
    "test_checkpointing", "test_lora", "test_patch", "test_trainer", "test_newer_transformers", "test_fixture_faithful",
    "test_loading_patch",
)
_FAMILY_PARAMETERS = ("family_model", "setup", "loaded")  # the fixtures parametrized by family name
# Every fixture's name (the family registry's), longest first: "baichuan_7b" is matched before "baichuan".
_NAMED_FAMILIES = tuple(sorted((*TINY_FAMILIES, "new_api"), key=len, reverse=True))


def _family_of(item) -> "str | None":
    callspec = getattr(item, "callspec", None)
    for key in _FAMILY_PARAMETERS:
        if callspec is not None and key in callspec.params:
            return str(callspec.params[key])
    name = f"{getattr(item, 'originalname', None) or item.name}_"
    named = [family for family in _NAMED_FAMILIES if f"_{family}_" in name]
    if named:
        return named[0]
    return "qwen" if item.module.__name__ in _QWEN_FILES else None


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--skip-marked", action="append", default=[], metavar="MARKER=REASON",
        help="skip the tests carrying MARKER, with REASON (noxfile.py: the `spawns` tests off their rows)",
    )


def pytest_collection_modifyitems(config, items: list) -> None:
    """Writes each test's `behaviour` marker and family into the JUnit report, for docs/compatibility.md.

    Tests carrying a marker named by ``--skip-marked`` are skipped, not deselected: the report keeps them with the
    reason, so docs/compatibility.md notes where a column was only partly proven on a row.
    """
    skipped = dict(value.partition("=")[::2] for value in config.getoption("skip_marked"))
    for item in items:
        for marker, reason in skipped.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason or f"tests marked {marker} do not run here"))
        for mark in item.iter_markers("behaviour"):
            item.user_properties.append(("behaviour", mark.args[0]))
        family = _family_of(item)
        if family is not None:
            item.user_properties.append(("family", family))


@pytest.fixture
def qwen(tiny_qwen_dir):
    """A freshly loaded tiny Qwen v1 model (float32, train mode), its classes unpatched, whatever ran before.

    The import hook patches a class when transformers first loads it, and transformers reuses the class of a folder
    it has loaded before; so the class-level patch is undone here, and the tests start from the classes as their
    code defines them (the load-time patching has tests of its own, on folders of their own). The removed-API
    repairs stay: the model needs them to run. Undone again afterwards.
    """
    from helpers import load_qwen

    from qwen_ckpt_compat import unpatch

    model = load_qwen(tiny_qwen_dir)
    unpatch(model)
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


FAMILIES = tuple(name for name in TINY_FAMILIES if name != "qwen")  # the old-API fixtures besides Qwen v1


@pytest.fixture(scope="session")
def vl_image():
    """A small RGB PNG at a short absolute path (its UTF-8 bytes must fit in a tiny Qwen-VL image span)."""
    import shutil

    from PIL import Image

    folder = tempfile.mkdtemp(prefix="qvl")
    image = Image.new("RGB", (20, 30), (200, 10, 50))
    for x in range(0, 20, 3):
        image.putpixel((x, x), (0, 255, 0))
    path = os.path.join(folder, "img.png")
    image.save(path)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def family_model(request, tmp_path):
    """(family, model, batch) for the family named by ``request.param``: a fresh folder, loaded as users do.

    Each test gets classes of its own (a folder of its own): loading patches them (the import hook), and the test
    may unpatch them. Qwen-VL batches hold an image and text; the test skips where Pillow or requests is missing.
    """
    from helpers import family_batch, family_of_fixture, fresh_dir, load_family

    from qwen_ckpt_compat import unpatch

    family = family_of_fixture(request.param)
    model = load_family(family, fresh_dir(tmp_path, family.write, family.name))
    image = request.getfixturevalue("vl_image") if family.name == "qwen_vl" else None
    yield family, model, family_batch(family, image_path=image)
    unpatch(model)


@pytest.fixture
def transformers_own_loader(monkeypatch):
    """Transformers' own `check_imports` / `get_class_in_module` during a test.

    Importing the `qwen_ckpt_compat` package wraps them process-wide; the faithfulness tests pin down what
    transformers itself does, so any wrapper (anything with `__wrapped__`) is peeled off for the test.
    """
    import inspect

    import transformers.dynamic_module_utils as dynamic_module_utils

    for name in ("check_imports", "get_class_in_module", "get_cached_module_file"):
        current = getattr(dynamic_module_utils, name)
        original = inspect.unwrap(current)
        if original is not current:
            monkeypatch.setattr(dynamic_module_utils, name, original)
