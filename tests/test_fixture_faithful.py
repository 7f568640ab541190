"""The tiny Qwen v1 fixture behaves like the real remote code (docs/facts/qwen-v1.md), without the library.

Nothing from `qwen_ckpt_compat` is imported here except `qwen_ckpt_compat.testing`: these tests pin down
the *unpatched* behaviour, release by release, that the rest of the package exists to fix.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version

from qwen_ckpt_compat.testing import (
    REMOTE_CODE_DIR,
    REMOTE_CODE_FILES,
    TARGET_MODULES,
    load_tiny_qwen,
    write_tiny_qwen,
)

TF = version.parse(version.parse(transformers.__version__).base_version)
HAS_STREAM_GENERATOR = importlib.util.find_spec("transformers_stream_generator") is not None

# One gate per behaviour boundary (docs/facts/qwen-v1.md, "Behaviour per release";
# docs/facts/transformers-releases.md).
LOADS = TF < version.parse("4.57") and HAS_STREAM_GENERATOR  # 4.57 drops BeamSearchScorer (stream generator)
LEGACY_ENABLE = TF <= version.parse("4.34.1")  # `apply(partial(_set_gradient_checkpointing, value=True))`
ENABLE_TYPE_ERROR = version.parse("4.35.0") <= TF < version.parse("4.36")  # always the new keyword call
SIGNATURE_FALLBACK = TF >= version.parse("4.36")  # old path picked by `"value" in signature(...)`
ENABLE_WORKS = LOADS and (LEGACY_ENABLE or SIGNATURE_FALLBACK)
GENERATES = LOADS and TF < version.parse("4.56")  # the range the fixture promises generate() for
IMPORT_BREAKS = HAS_STREAM_GENERATOR and TF >= version.parse("4.57")
NO_HEAD_MASK = TF >= version.parse("5.0")  # `PreTrainedModel.get_head_mask` removed



def _torch_warns_without_use_reentrant() -> bool:
    """torch >= 2.1 warns when `checkpoint` is called without `use_reentrant`; torch 2.0 stays silent."""
    import torch.utils.checkpoint

    x = torch.ones(1, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.utils.checkpoint.checkpoint(lambda t: t * 2, x)
    return any("use_reentrant" in str(w.message) for w in caught)


WHY_NOT_LOADS = f"the remote code does not load on transformers {transformers.__version__} here"
pytestmark = pytest.mark.usefixtures("transformers_own_loader")
ROOT = Path(__file__).resolve().parents[1]


def _batch(batch_size: int = 2, seq_len: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, 256, (batch_size, seq_len), generator=generator)


def _train_step(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss


def _grad_fn_entering_ln_f(model, input_ids: torch.Tensor) -> str:
    """Name of the autograd node that produced the hidden state fed to `ln_f` (after the last block)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []
    hook = base.transformer.ln_f.register_forward_pre_hook
    handle = hook(lambda module, args: seen.append(args[0].grad_fn))
    try:
        _train_step(model, input_ids)
    finally:
        handle.remove()
    return type(seen[0]).__name__


def _count_block_calls(model) -> tuple[list[int], list]:
    counts = [0] * len(model.transformer.h)
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """This file's own model directory.

    Its own folder name gives it its own `transformers_modules.*` module, so classes that other test files
    loaded (and the library patched) from the session-wide `tiny_qwen_dir` are never reused here.
    """
    return write_tiny_qwen(tmp_path_factory.mktemp("faithful_qwen"))


@pytest.fixture
def model(qwen_dir):
    """A fresh float32 tiny Qwen v1, loaded through the user's door."""
    return load_tiny_qwen(qwen_dir)


@pytest.fixture
def no_import_check(monkeypatch):
    """Skips transformers' `check_imports` (which imports transformers_stream_generator) while loading."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "check_imports", dynamic_module_utils.get_relative_imports)


# --- the directory itself (every release) -----------------------------------------------------------------


def test_directory_holds_remote_code_config_and_weights(qwen_dir):
    names = {p.name for p in Path(qwen_dir).iterdir()}
    assert set(REMOTE_CODE_FILES) | {"config.json", "model.safetensors"} <= names
    assert not (REMOTE_CODE_DIR / "__init__.py").exists()  # a data folder, not a package

    config = json.loads((Path(qwen_dir) / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["model_type"] == "qwen"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    }
    assert config["kv_channels"] * config["num_attention_heads"] == config["hidden_size"]
    assert (config["fp32"], config["bf16"], config["fp16"]) == (True, False, False)
    assert config["emb_dropout_prob"] == config["attn_dropout_prob"] == 0.0
    assert config["use_flash_attn"] is False and config["use_cache"] is True
    assert config["tie_word_embeddings"] is False


@pytest.mark.release_independent
def test_weights_come_from_torch_alone_and_are_deterministic(tmp_path):
    """The weights are written without importing transformers, so every release gets the same bytes."""
    script = (
        "import sys\n"
        "from qwen_ckpt_compat.testing import write_tiny_qwen\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "write_tiny_qwen(sys.argv[1])\n"
        "assert 'transformers' not in sys.modules, 'write_tiny_qwen imported transformers'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "child")], check=True, env=env)

    write_tiny_qwen(tmp_path / "same")
    write_tiny_qwen(tmp_path / "other", seed=1)
    child = (tmp_path / "child" / "model.safetensors").read_bytes()
    assert child == (tmp_path / "same" / "model.safetensors").read_bytes()
    assert child != (tmp_path / "other" / "model.safetensors").read_bytes()


def test_session_fixture_is_the_same_model(tiny_qwen_dir, qwen_dir):
    for name in ("config.json", "model.safetensors", *REMOTE_CODE_FILES):
        assert (Path(tiny_qwen_dir) / name).read_bytes() == (Path(qwen_dir) / name).read_bytes(), name


def test_byte_level_tokenizer_round_trips(qwen_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir, trust_remote_code=True)
    assert type(tokenizer).__module__.startswith("transformers_modules.")
    ids = tokenizer("héllo<|im_end|>")["input_ids"]
    assert ids == list("h".encode()) + list("é".encode()) + list(b"llo") + [tokenizer.im_end_id]
    assert tokenizer.decode(ids) == "héllo<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo"
    assert tokenizer.eos_token_id == tokenizer.eod_id == 0


# --- loading and inference ------------------------------------------------------------------------------


@pytest.mark.skipif(not LOADS, reason=WHY_NOT_LOADS)
def test_loads_offline_as_remote_code_without_missing_keys(qwen_dir):
    model, info = load_tiny_qwen(qwen_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert type(model).__name__ == "QWenLMHeadModel"
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(model.transformer).__name__ == "QWenModel"
    assert [type(block).__name__ for block in model.transformer.h] == ["QWenBlock", "QWenBlock"]
    assert model.dtype == torch.float32
    # The interface transformers keys its decisions on.
    assert model.supports_gradient_checkpointing and model.base_model_prefix == "transformer"
    assert model._no_split_modules == ["QWenBlock"]
    assert list(inspect.signature(model._set_gradient_checkpointing).parameters) == ["module", "value"]
    assert model.transformer.gradient_checkpointing is False
    assert model.get_input_embeddings() is model.transformer.wte


@pytest.mark.skipif(not LOADS, reason=WHY_NOT_LOADS)
def test_forward_with_labels_gives_the_shifted_cross_entropy(model):
    input_ids = _batch()
    model.eval()
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (2, 12, 256)
    logits, targets = out.logits[:, :-1].reshape(-1, 256), input_ids[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(out.loss, expected)
    # Legacy cache: one (key, value) tuple per layer.
    assert isinstance(out.past_key_values, tuple) and len(out.past_key_values) == 2
    assert out.past_key_values[0][0].shape[-2] == 12


@pytest.mark.skipif(not LOADS, reason=WHY_NOT_LOADS)
def test_two_loads_give_identical_logits(qwen_dir):
    input_ids = _batch()
    first, second = (load_tiny_qwen(qwen_dir).eval() for _ in range(2))
    with torch.no_grad():
        assert torch.equal(first(input_ids).logits, second(input_ids).logits)


@pytest.mark.skipif(not GENERATES, reason="generate() is only promised up to transformers 4.55")
def test_greedy_generate_matches_uncached_argmax(model):
    model.eval()
    input_ids = _batch(batch_size=1, seq_len=6)
    generated = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8, do_sample=False
    )
    assert input_ids.shape[1] < generated.shape[1] <= input_ids.shape[1] + 8
    sequence = input_ids
    with torch.no_grad():
        while sequence.shape[1] < generated.shape[1]:
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(sequence, generated)  # the kv cache path agrees with full recomputation


@pytest.mark.skipif(not GENERATES, reason="generate() is only promised up to transformers 4.55")
def test_chat_returns_a_reply_and_history(model, qwen_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir, trust_remote_code=True)
    response, history = model.eval().chat(tokenizer, "hi", history=None, max_new_tokens=4)
    assert isinstance(response, str) and history == [("hi", response)]


# --- gradient checkpointing without the library ----------------------------------------------------------


@pytest.mark.skipif(not ENABLE_WORKS, reason="enabling only works on <= 4.34.1 and on 4.36-4.56")
def test_enable_checkpoints_every_block_reentrantly(qwen_dir):
    input_ids = _batch()
    reference = load_tiny_qwen(qwen_dir)
    _train_step(reference, input_ids)

    model = load_tiny_qwen(qwen_dir)
    model.gradient_checkpointing_enable()
    assert model.transformer.gradient_checkpointing is True
    counts, handles = _count_block_calls(model)
    # The remote code calls torch.utils.checkpoint.checkpoint without use_reentrant (torch 2.0 does not warn).
    if _torch_warns_without_use_reentrant():
        with pytest.warns(UserWarning, match="use_reentrant parameter should be passed explicitly"):
            _train_step(model, input_ids)
    else:
        _train_step(model, input_ids)
    for handle in handles:
        handle.remove()
    assert counts == [2, 2]  # each block: once in the forward, once more in the backward

    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=name)


@pytest.mark.skipif(not (LOADS and ENABLE_TYPE_ERROR), reason="only transformers 4.35.x")
def test_enable_raises_type_error_on_4_35(model):
    message = r"_set_gradient_checkpointing\(\) got an unexpected keyword argument 'enable'"
    with pytest.raises(TypeError, match=message):
        model.gradient_checkpointing_enable()


@pytest.mark.skipif(
    not (LOADS and SIGNATURE_FALLBACK), reason="gradient_checkpointing_kwargs exist from 4.36"
)
def test_use_reentrant_false_is_silently_ignored(model, caplog):
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    finally:
        transformers.utils.logging.disable_propagation()
    assert "silently ignore `gradient_checkpointing_kwargs`" in caplog.text
    assert model.transformer.gradient_checkpointing is True
    # Asked for non-reentrant, got torch's reentrant CheckpointFunction anyway.
    assert "CheckpointFunction" in _grad_fn_entering_ln_f(model, _batch())


# --- LoRA (peft) without the library --------------------------------------------------------------------


@pytest.mark.skipif(not ENABLE_WORKS, reason="enabling only works on <= 4.34.1 and on 4.36-4.56")
def test_lora_enable_after_get_peft_model_has_nothing_to_backprop(model):
    peft_model = _lora(model)
    peft_model.gradient_checkpointing_enable()
    assert peft_model.get_base_model().transformer.gradient_checkpointing is True
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
        _train_step(peft_model, _batch())


@pytest.mark.skipif(not ENABLE_WORKS, reason="enabling only works on <= 4.34.1 and on 4.36-4.56")
def test_lora_enable_before_get_peft_model_trains_lora(model):
    model.gradient_checkpointing_enable()
    peft_model = _lora(model)  # sees checkpointing on, so it makes the embedding output require grad
    assert "CheckpointFunction" in _grad_fn_entering_ln_f(peft_model, _batch())

    lora_a = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n}
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == len(lora_a) == 2 * 5  # per layer: c_attn, attn.c_proj, w1, w2, mlp.c_proj
    for name, param in lora_b.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in lora_a.items():  # lora_B starts at zero, so A gets no gradient on the first step
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)


# --- releases where the remote code no longer loads ------------------------------------------------------


@pytest.mark.skipif(not IMPORT_BREAKS, reason="needs transformers >= 4.57 with transformers_stream_generator")
def test_stream_generator_import_breaks_loading(qwen_dir):
    missing = "BeamSearchScorer" if TF < version.parse("5.0") else "DisjunctiveConstraint"
    with pytest.raises(ImportError, match=f"cannot import name '{missing}' from 'transformers'"):
        load_tiny_qwen(qwen_dir)


@pytest.mark.skipif(not (IMPORT_BREAKS and not NO_HEAD_MASK), reason="only transformers 4.57.x")
def test_4_57_works_once_the_import_check_is_bypassed(qwen_dir, no_import_check):
    model = load_tiny_qwen(qwen_dir)
    assert torch.isfinite(model(input_ids=_batch(), labels=_batch()).loss)


@pytest.mark.skipif(not (HAS_STREAM_GENERATOR and NO_HEAD_MASK), reason="only transformers >= 5.0")
def test_5x_forward_fails_on_get_head_mask_once_loaded(qwen_dir, no_import_check):
    model, info = load_tiny_qwen(qwen_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(AttributeError, match="'QWenModel' object has no attribute 'get_head_mask'"):
        model(input_ids=_batch(), labels=_batch())


@pytest.mark.skipif(
    not (HAS_STREAM_GENERATOR and TF >= version.parse("5.23")), reason="the deprecated alias arrives in 5.23"
)
def test_5x_enable_is_a_deprecated_alias_that_takes_the_old_path(qwen_dir, no_import_check):
    model = load_tiny_qwen(qwen_dir)
    with pytest.warns(FutureWarning, match="`gradient_checkpointing_enable` is deprecated"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.transformer.gradient_checkpointing is True
    # every_n_layers / offload are accepted but there is nothing per layer to apply them to.
    model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    assert model.transformer.gradient_checkpointing is True
    assert not any(hasattr(block, "gradient_checkpointing") for block in model.transformer.h)


@pytest.mark.skipif(HAS_STREAM_GENERATOR, reason="transformers_stream_generator is installed")
def test_loading_requires_transformers_stream_generator(qwen_dir):
    with pytest.raises(ImportError, match="not found in your environment: transformers_stream_generator"):
        load_tiny_qwen(qwen_dir)
