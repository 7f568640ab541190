"""The tiny ChatGLM2/3, Baichuan2, InternLM v1 and Qwen-VL fixtures fail where the real code fails.

The family pages of ``docs/facts/`` record the real remote code measured on a tiny config, release by
release: "as Qwen v1" (4.34.1 works reentrantly only, 4.35.x raises the ``enable`` TypeError, 4.36+ silently
ignores the kwargs, the LoRA-after order has nothing to backpropagate), plus each family's own failures. These
tests pin down the same behaviour of the fixtures with transformers' own loader, no library involved (a class
loaded here is never patched); the rest of the suite shows the library removes each failure.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch
import transformers
from helpers import count_calls, family_batch, family_lora, family_of_fixture
from packaging import version

TF = version.parse(version.parse(transformers.__version__).base_version)
HAS_STREAM_GENERATOR = importlib.util.find_spec("transformers_stream_generator") is not None
LEGACY_ENABLE = TF < version.parse("4.35")  # `apply(partial(_set_gradient_checkpointing, value=True))`
ENABLE_TYPE_ERROR = version.parse("4.35.0") <= TF < version.parse("4.36")  # the new keyword call only
SIGNATURE_FALLBACK = TF >= version.parse("4.36")  # old path picked by `"value" in signature(...)`, kwargs ignored
V5 = TF >= version.parse("5.0")  # meta-device construction; PretrainedConfig without generation defaults
QWEN_LOADS = TF < version.parse("4.57") and HAS_STREAM_GENERATOR  # Qwen-VL's modeling file is Qwen v1's

pytestmark = pytest.mark.usefixtures("transformers_own_loader")


def _loads(name: str) -> bool:
    return {
        "chatglm": not V5,  # `config.max_length`
        "baichuan": not ENABLE_TYPE_ERROR,  # post_init's enable call
        "baichuan_7b": not ENABLE_TYPE_ERROR,
        "internlm": True,
        "qwen_vl": QWEN_LOADS,
    }[name]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One folder per family for this file alone (so no other test's patched classes are ever reused here)."""
    from qwen_ckpt_compat.testing import TINY_FAMILIES

    return {
        name: family.write(tmp_path_factory.mktemp(f"faithful_{name}") / name)
        for name, family in TINY_FAMILIES.items()
        if name != "qwen"
    }


@pytest.fixture
def loaded(request, family_dirs):
    """(family, model, batch) loaded with transformers' own loader; skips where the fixture does not load."""
    family = family_of_fixture(request.param)
    if not _loads(family.name):
        pytest.skip(f"the {family.name} remote code does not load on transformers {transformers.__version__}")
    model = family.load(family_dirs[family.name]).float()
    model.train()
    image = request.getfixturevalue("vl_image") if family.name == "qwen_vl" else None
    return family, model, family_batch(family, image_path=image)


def _owner_flags(model) -> list:
    """The remote code's own flag on the modules its `_set_gradient_checkpointing` marks."""
    return [m.__dict__["gradient_checkpointing"] for m in model.modules() if "gradient_checkpointing" in vars(m)]


def _grad_fn_into(model, final_norm: str, batch: dict) -> str:
    seen = []
    norm = next(m for name, m in model.named_modules() if name.endswith(final_norm))
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(type(args[0].grad_fn).__name__))
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    return seen[0]


GENERIC = ("chatglm", "internlm", "qwen_vl")  # Baichuan2 enables checkpointing while it is built: see below


@pytest.mark.parametrize("loaded", ["chatglm", "baichuan", "baichuan_7b", "internlm", "qwen_vl"], indirect=True)
def test_loads_without_missing_keys_and_computes(loaded, family_dirs):
    family, model, batch = loaded
    _, info = family.load(family_dirs[family.name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__module__.startswith("transformers_modules.")
    if family.name == "baichuan_7b" and V5:
        return  # its forward fails there: test_baichuan_7b_rotary_tables_stay_on_the_meta_device_on_5x
    loss = model(**batch).loss
    if not (family.name == "internlm" and V5):
        assert torch.isfinite(loss)


@pytest.mark.skipif(not ENABLE_TYPE_ERROR, reason="only transformers 4.35.x")
@pytest.mark.parametrize("loaded", GENERIC, indirect=True)
def test_enable_raises_type_error_on_4_35(loaded):
    _, model, _ = loaded
    with pytest.raises(TypeError, match=r"_set_gradient_checkpointing\(\) got an unexpected keyword argument 'enable'"):
        model.gradient_checkpointing_enable()


@pytest.mark.skipif(ENABLE_TYPE_ERROR, reason="enabling raises TypeError on 4.35.x")
@pytest.mark.parametrize("loaded", GENERIC, indirect=True)
def test_enable_checkpoints_every_block_reentrantly_ignoring_kwargs(loaded, caplog):
    family, model, batch = loaded
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if SIGNATURE_FALLBACK else {}
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model.gradient_checkpointing_enable(**kwargs)
    finally:
        transformers.utils.logging.disable_propagation()
    if SIGNATURE_FALLBACK:
        assert "old version of the checkpointing format" in caplog.text
    assert True in _owner_flags(model)
    with count_calls(model, family.block) as counts:
        name = _grad_fn_into(model, family.final_norm, batch)
    assert set(counts.values()) == {2}
    assert "CheckpointFunction" in name, "asked for non-reentrant, got torch's reentrant checkpoint anyway"


@pytest.mark.skipif(
    ENABLE_TYPE_ERROR or V5, reason="4.35.x raises TypeError; 5.x's enable makes the input embeddings require grad"
)
@pytest.mark.parametrize("loaded", GENERIC, indirect=True)
def test_lora_enable_after_get_peft_model_has_nothing_to_backprop(loaded):
    family, model, batch = loaded
    peft_model = family_lora(model, family)
    peft_model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
        peft_model(**batch).loss.backward()


# --- Baichuan2: checkpointing enabled while the model is built --------------------------------------------------


@pytest.mark.skipif(not ENABLE_TYPE_ERROR, reason="only transformers 4.35.x")
@pytest.mark.parametrize("name", ["baichuan", "baichuan_7b"])
def test_baichuan_does_not_even_load_on_4_35(family_dirs, name):
    family = family_of_fixture(name)
    with pytest.raises(TypeError, match="unexpected keyword argument 'enable'"):
        family.load(family_dirs[name])


@pytest.mark.skipif(not V5, reason="4.x builds the model on the CPU: __init__ computes the tables there")
def test_baichuan_7b_rotary_tables_stay_on_the_meta_device_on_5x(family_dirs):
    """5.x builds the model on the meta device; tensors kept as plain attributes are neither loaded nor moved."""
    family = family_of_fixture("baichuan_7b")
    model = family.load(family_dirs["baichuan_7b"])
    rotary = model.model.layers[0].self_attn.rotary_emb
    assert {rotary.inv_freq.device.type, rotary.cos_cached.device.type} == {"meta"}
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        model(**family_batch(family))


@pytest.mark.parametrize("loaded", ["baichuan"], indirect=True)
def test_baichuan_enables_checkpointing_on_every_load(loaded):
    family, model, batch = loaded
    config = model.config
    assert not hasattr(config, "gradient_checkpointing"), "post_init consumed the truthy (False,) tuple"
    assert True in _owner_flags(model), "nobody asked, yet the remote code checkpoints"
    with count_calls(model, family.block) as counts:
        name = _grad_fn_into(model, family.final_norm, batch)
    assert set(counts.values()) == {2} and "CheckpointFunction" in name


def test_baichuan_config_stores_a_truthy_tuple(family_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(family_dirs["baichuan"]), trust_remote_code=True)
    assert config.gradient_checkpointing == (False,) and bool(config.gradient_checkpointing) is True


# --- ChatGLM2/3 on 5.x ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not V5, reason="PretrainedConfig carries max_length before 5.0")
def test_chatglm_does_not_load_on_5x(family_dirs):
    family = family_of_fixture("chatglm")
    with pytest.raises(AttributeError, match="'ChatGLMConfig' object has no attribute 'max_length'"):
        family.load(family_dirs["chatglm"])


@pytest.mark.parametrize("loaded", ["chatglm"], indirect=True)
def test_chatglm_hidden_states_are_sequence_first(loaded):
    family, model, batch = loaded
    shapes = []
    block = next(m for m in model.modules() if type(m).__name__ == family.block)
    handle = block.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        model(**batch)
    finally:
        handle.remove()
    batch_size, length = batch["input_ids"].shape
    assert shapes == [(length, batch_size, model.config.hidden_size)]


# --- InternLM v1 on 5.x ------------------------------------------------------------------------------------------


def _rotary_as_built(model) -> list:
    """(module, name, loaded value, value its __init__ computes) for every rotary table of the model."""
    rows = []
    for module in model.modules():
        if type(module).__name__ != "InternLMRotaryEmbedding":
            continue
        assert module._non_persistent_buffers_set == {"inv_freq", "cos_cached", "sin_cached"}
        fresh = type(module)(module.inv_freq.numel() * 2, max_position_embeddings=module.cos_cached.shape[2])
        rows += [(module, name, getattr(module, name), getattr(fresh, name)) for name in sorted(fresh._buffers)]
    return rows


@pytest.mark.parametrize("loaded", ["internlm"], indirect=True)
def test_internlm_rotary_tables_hold_what_init_computes_only_before_5(loaded):
    _, model, _ = loaded
    rows = _rotary_as_built(model)
    assert len(rows) == 3 * 2
    matches = [torch.equal(loaded_value, expected) for _, _, loaded_value, expected in rows]
    if V5:
        assert not any(matches), "5.x: non-persistent buffers get uninitialised memory (torch.empty_like)"
    else:
        assert all(matches)


@pytest.mark.skipif(not V5, reason="4.x builds the model on the CPU: __init__ computes the tables")
def test_internlm_nan_comes_from_uninitialised_rotary_buffers(family_dirs, monkeypatch):
    """Uninitialised memory that happens to hold NaN (as on the machine that measured the real model) gives NaN.

    ``torch.empty_like`` is made to return NaN-filled memory while loading: every parameter is still finite
    (loaded from the checkpoint; on 5.0 re-initialised in place, see ``_repairs.weights``), only the rotary
    tables, which no checkpoint holds, are NaN, and so is the loss.
    """
    family = family_of_fixture("internlm")
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    poisoned = family.load(family_dirs["internlm"])
    monkeypatch.undo()
    for name, parameter in poisoned.named_parameters():
        assert torch.isfinite(parameter).all(), name
    nan_buffers = sorted({name.rsplit(".", 1)[-1] for name, b in poisoned.named_buffers() if torch.isnan(b).any()})
    assert nan_buffers == ["cos_cached", "inv_freq", "sin_cached"]
    batch = family_batch(family)
    assert torch.isnan(poisoned.eval()(**batch).loss)


# --- Qwen-VL -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (V5 and HAS_STREAM_GENERATOR), reason="only transformers >= 5.0")
def test_qwen_vl_forward_fails_on_get_head_mask_on_5x(family_dirs, monkeypatch, request):
    import transformers.dynamic_module_utils as dynamic_module_utils

    family = family_of_fixture("qwen_vl")
    vl_image = request.getfixturevalue("vl_image")
    monkeypatch.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)
    model = family.load(family_dirs["qwen_vl"])
    with pytest.raises(AttributeError, match="'QWenModel' object has no attribute 'get_head_mask'"):
        model(**family_batch(family, image_path=vl_image))


class _NotInstalled:
    """A meta-path finder that makes ``import <name>`` fail as it does for a package that is not installed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == self.name:
            raise ModuleNotFoundError(f"No module named '{self.name}'", name=self.name)
        return None


def hide_package(monkeypatch, name: str) -> None:
    for module in [m for m in sys.modules if m.split(".")[0] == name]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(name), *sys.meta_path])


@pytest.mark.skipif(not QWEN_LOADS, reason="Qwen's modeling file does not load here (transformers_stream_generator)")
@pytest.mark.parametrize("package", ["PIL", "requests"])
def test_qwen_vl_needs_its_vision_packages_to_load(tmp_path, monkeypatch, package):
    from qwen_ckpt_compat.testing import write_tiny_qwen_vl

    family = family_of_fixture("qwen_vl")
    path = write_tiny_qwen_vl(tmp_path / f"vl_without_{package}")
    hide_package(monkeypatch, package)
    # transformers checks the imports of the modeling file, or fails importing visual.py: either way it names it.
    with pytest.raises(ImportError, match=f"not found in your environment: {package}|No module named '{package}'"):
        family.load(path)
