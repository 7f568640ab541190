"""ChatGLM2/3, Baichuan2, InternLM v1 and Qwen-VL with the library: the same guarantees as Qwen v1.

Each test runs on the tiny fixture of each family (``qwen_ckpt_compat.testing.TINY_FAMILIES``): checkpointing
recomputes every block, the requested ``use_reentrant`` reaches torch, LoRA trains in both peft orders with
gradients equal to no checkpointing, ``Trainer`` works, the owner's ``use_cache`` duty is done, and the library
import alone honours a request (what peft's ``prepare_model_for_kbit_training`` makes).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers
from conftest import FAMILIES
from helpers import (
    count_calls,
    family_lora,
    max_relative_difference,
    needs_kwargs,
    reentrant_after,
    spy_checkpoint,
    step_grads,
)

from qwen_ckpt_compat import checkpoint_settings, describe, prepare_for_lora

by_family = pytest.mark.parametrize("family_model", FAMILIES, indirect=True)


def _enable(model, **kwargs) -> None:
    """The enable call peft and user code make (on 5.23+ a deprecated alias, still honoured)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)


@pytest.mark.behaviour("kwargs")
@needs_kwargs
@by_family
def test_import_alone_honours_the_request(family_model, monkeypatch):
    family, model, batch = family_model
    _enable(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = family_lora(model, family)
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        grads = step_grads(peft_model, batch)
    assert calls and all(c.get("use_reentrant") is False for c in calls), calls
    assert set(counts.values()) == {2}, "each block once forward, once more in the backward pass"
    assert grads and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.behaviour("kwargs")
@by_family
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_requested_mode_reaches_torch(family_model, monkeypatch, use_reentrant):
    family, model, batch = family_model
    prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpoint_settings(model).use_reentrant is use_reentrant
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        step_grads(model, batch)
    blocks = len([m for m in model.modules() if type(m).__name__ == family.block])
    assert [c.get("use_reentrant") for c in calls][:blocks] == [use_reentrant] * blocks
    assert set(counts.values()) == {2}
    assert reentrant_after(model, family.final_norm, batch) is use_reentrant


@pytest.mark.behaviour("grads_equal")
@by_family
@pytest.mark.parametrize("order", ["prepare_then_peft", "peft_then_prepare"])
def test_lora_grads_with_checkpointing_equal_those_without(family_model, order):
    family, model, batch = family_model
    if order == "prepare_then_peft":
        prepare_for_lora(model, use_gradient_checkpointing=False)
        peft_model = family_lora(model, family)
    else:
        peft_model = family_lora(model, family)
        prepare_for_lora(peft_model, use_gradient_checkpointing=False)  # Baichuan2 enabled it while being built
    with count_calls(model, family.block) as counts:
        reference = step_grads(peft_model, batch)
    assert set(counts.values()) == {1}, "no checkpointing for the reference"
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    with count_calls(model, family.block) as counts:
        checkpointed = step_grads(peft_model, batch)
    assert set(counts.values()) == {2}
    assert max_relative_difference(checkpointed, reference) <= 1e-5
    assert all(g.abs().sum() > 0 for g in checkpointed.values())


@pytest.mark.behaviour("trainer")
@by_family
def test_trainer_updates_every_lora_tensor(family_model, tmp_path):
    from test_trainer import _training_arguments

    family, model, batch = family_model
    peft_model = family_lora(prepare_for_lora(model), family)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    arguments = _training_arguments(tmp_path / "out")
    with count_calls(model, family.block) as counts:
        transformers.Trainer(model=peft_model, args=arguments, train_dataset=rows).train()
    assert set(counts.values()) == {4}, "2 steps, each block forward and recomputed in the backward pass"
    unchanged = [n for n, p in peft_model.named_parameters() if n in before and torch.equal(p.detach(), before[n])]
    assert before and unchanged == []


@pytest.mark.behaviour("enables")
@by_family
def test_use_cache_is_off_while_training_checkpointed(family_model, caplog):
    """The owner's duty (its forward used to turn use_cache off when checkpointing) is done for its signature."""
    family, model, batch = family_model
    prepare_for_lora(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with caplog.at_level(logging.WARNING):
        out = model(**inputs, use_cache=True)
    assert not out.past_key_values
    assert "use_cache=False" in caplog.text
    model.eval()
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.past_key_values is not None and len(out.past_key_values) == 2


@pytest.mark.behaviour("enables")
@by_family
def test_use_gradient_checkpointing_false_means_off(family_model):
    family, model, batch = family_model
    prepare_for_lora(model)
    prepare_for_lora(model, use_gradient_checkpointing=False)
    with count_calls(model, family.block) as counts:
        step_grads(model, batch)
    assert set(counts.values()) == {1}
    assert not any(m.__dict__.get("gradient_checkpointing") is True for m in model.modules())


@by_family
def test_describe_names_the_family(family_model):
    family, model, _ = family_model
    from qwen_ckpt_compat._detection import find_enable_override

    info = describe(model)
    # GLM-4's code has no old form, only an enable override of its own (which the library routes)
    assert info.is_remote_code and (info.old_checkpointing_api or find_enable_override(model) is not None)
    assert family.block in info.decoder_blocks and info.num_decoder_blocks == 2


# --------------------------------------------------------------------------------------------- the registry


def test_every_fixture_is_recognised_as_its_family(tmp_path):
    from helpers import fresh_dir

    from qwen_ckpt_compat._family_registry import families, family_of

    names = [family.name for family in families()]
    assert names.index("qwen_vl") < names.index("qwen"), "the more specific family first"
    import importlib.util

    from qwen_ckpt_compat.testing import TINY_FAMILIES

    for name in ("qwen", *FAMILIES):
        family = TINY_FAMILIES[name]
        if any(importlib.util.find_spec(package) is None for package in family.packages):
            continue  # Qwen-VL without Pillow/requests: its own tests skip, saying so
        model = family.load(fresh_dir(tmp_path, family.write, name))
        assert family_of(model).name == family.family
        assert family_of(type(model.config)).model_types == family_of(model).model_types


# ---------------------------------------------------------------------------------------------- Baichuan2


@pytest.mark.behaviour("loads")
def test_baichuan_loads_everywhere_enables_itself_warns_once_and_routes(tmp_path, monkeypatch):
    """4.35.x: the load itself raised the enable TypeError without the library (test_fixture_faithful_families)."""
    from helpers import family_of_fixture, fresh_dir, load_family

    from qwen_ckpt_compat import CompatWarning

    family = family_of_fixture("baichuan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_family(family, fresh_dir(tmp_path, family.write))
    ours = [w for w in caught if issubclass(w.category, CompatWarning)]
    assert len(ours) == 1 and "use_gradient_checkpointing=False" in str(ours[0].message)
    assert checkpoint_settings(model).use_reentrant is False
    batch = family_batch_of(family)
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        step_grads(model, batch)
    assert set(counts.values()) == {2} and [c.get("use_reentrant") for c in calls] == [False, False]
    # The user's explicit choice wins over the config's.
    prepare_for_lora(model, use_gradient_checkpointing=False)
    with count_calls(model, family.block) as counts:
        step_grads(model, batch)
    assert set(counts.values()) == {1}


def family_batch_of(family):
    from helpers import family_batch

    return family_batch(family)


# --------------------------------------------------------------------------------------------- ChatGLM2/3


@pytest.mark.parametrize("family_model", ["chatglm"], indirect=True)
def test_chatglm_owner_called_positionally_gets_no_cache_while_checkpointed(family_model):
    """GLMTransformer.forward(hidden_states, attention_mask, rotary_pos_emb, kv_caches, use_cache, ...)."""
    family, model, batch = family_model
    prepare_for_lora(model)
    encoder = model.transformer.encoder
    length, width = batch["input_ids"].shape[1], model.config.hidden_size
    hidden = torch.randn(length, 2, width)  # sequence-first
    rotary = model.transformer.rotary_pos_emb(length)[None, :length].transpose(0, 1).contiguous()
    with count_calls(model, family.block) as counts:
        hidden_out, presents, _, _ = encoder(hidden, None, rotary, None, True)
        hidden_out.sum().backward()
    assert presents is None, "use_cache=True passed positionally was turned off"
    assert set(counts.values()) == {2}
    model.eval()
    with torch.no_grad():
        _, presents, _, _ = encoder(hidden, None, rotary, None, True)
    assert presents is not None and len(presents) == 2


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize("family_model", ["chatglm"], indirect=True)
def test_chatglm_config_answers_old_attributes_without_saving_them(family_model, tmp_path):
    family, model, batch = family_model
    config = model.config
    assert config.max_length == 20 and config.use_cache is True  # max_length: the pre-5.0 default
    assert model.max_sequence_length == 20
    assert "max_length" not in config.to_dict() or "max_length" in vars(config)
    model.save_pretrained(tmp_path / "saved")  # 5.x refuses to save generation parameters in a model config
    reloaded = family.load(tmp_path / "saved").float().eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


# ------------------------------------------------------------------------------------------- InternLM v1


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize("family_model", ["internlm"], indirect=True)
def test_internlm_rotary_tables_hold_what_init_computes(family_model):
    family, model, batch = family_model
    for module in model.modules():
        if type(module).__name__ == "InternLMRotaryEmbedding":
            fresh = type(module)(module.inv_freq.numel() * 2, max_position_embeddings=module.cos_cached.shape[2])
            for name in ("inv_freq", "cos_cached", "sin_cached"):
                assert torch.equal(getattr(module, name), getattr(fresh, name)), name
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.behaviour("loads")
def test_internlm_nan_is_gone_even_from_nan_filled_memory(tmp_path, monkeypatch):
    """The library's repair, against the worst uninitialised memory (see test_fixture_faithful_families)."""
    from helpers import family_batch, family_of_fixture, fresh_dir, load_family

    family = family_of_fixture("internlm")
    path = fresh_dir(tmp_path, family.write)
    clean = load_family(family, path).eval()
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    poisoned = load_family(family, path).eval()
    monkeypatch.undo()
    batch = family_batch(family)
    with torch.no_grad():
        assert torch.equal(poisoned(**batch).logits, clean(**batch).logits)
    assert not any(torch.isnan(b).any() for b in poisoned.buffers())


# --------------------------------------------------------------------------------------------------- Qwen-VL


@pytest.mark.behaviour("grads_equal")
@pytest.mark.parametrize("family_model", ["qwen_vl"], indirect=True)
@pytest.mark.parametrize("train_vision", [False, True])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_qwen_vl_image_text_batches_checkpoint_what_holds_activations(family_model, train_vision, use_reentrant):
    """Language blocks are recomputed; vision blocks only when a gradient flows through them (trained tower), in
    either mode: in reentrant mode the tower's first block gets an input that requires a gradient (its patch
    embedding is frozen), or its LoRA weights would get none."""
    from qwen_ckpt_compat.testing._qwen_vl import VISION_TARGET_MODULES

    family, model, batch = family_model
    targets = family.target_modules + (VISION_TARGET_MODULES if train_vision else ())
    peft_model = family_lora(model, family, targets=targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".visual." in n for n in trainable) is train_vision
    prepare_for_lora(peft_model, use_gradient_checkpointing=False)
    reference = step_grads(peft_model, batch)
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with count_calls(model, "QWenBlock") as text, count_calls(model, "VisualAttentionBlock") as vision:
        grads = step_grads(peft_model, batch)
    assert set(text.values()) == {2}
    assert set(vision.values()) == ({2} if train_vision else {1}), "a frozen tower keeps nothing to recompute"
    assert max_relative_difference(grads, reference) <= 1e-5
    assert any(".visual." in k for k in grads) is train_vision


@pytest.mark.parametrize("family_model", ["qwen_vl"], indirect=True)
def test_qwen_vl_text_only_batches_still_run_the_vision_tower_in_training(family_model):
    from helpers import family_batch

    family, model, _ = family_model
    prepare_for_lora(model)
    with count_calls(model, "VisualAttentionBlock") as vision:
        step_grads(model, family_batch(family))
    assert set(vision.values()) == {2}, "a blank image goes through the tower, whose parameters all train here"


def test_qwen_vl_missing_vision_package_is_still_reported(tmp_path, monkeypatch):
    """The library excuses transformers_stream_generator only; Pillow missing is reported as transformers does."""
    from helpers import family_of_fixture
    from test_fixture_faithful_families import hide_package

    family = family_of_fixture("qwen_vl")
    path = family.write(tmp_path / "vl_without_pil")
    hide_package(monkeypatch, "PIL")
    with pytest.raises(ImportError, match="not found in your environment: PIL|No module named 'PIL'"):
        family.load(path)


# -------------------------------------------------------------------------------- new API: left untouched


@pytest.mark.behaviour("unpatch")
def test_new_api_remote_code_is_left_to_transformers(tmp_path):
    """internlm2 / MiniCPM define no _set_gradient_checkpointing: nothing is patched, transformers drives them."""
    from helpers import HAS_CHECKPOINTING_KWARGS, fresh_dir

    from qwen_ckpt_compat import is_patched
    from qwen_ckpt_compat._family_registry import family_of
    from qwen_ckpt_compat._preparation import prepare_class
    from qwen_ckpt_compat.testing import load_tiny_new_api_model, write_tiny_new_api_model

    path = fresh_dir(tmp_path, write_tiny_new_api_model)
    model = load_tiny_new_api_model(path).float().train()
    remote = [k for k in type(model).__mro__ if k.__module__.startswith("transformers_modules.")]
    before = {k: dict(vars(k)) for k in (*remote, type(model.config))}
    assert not any(hasattr(v, "__wrapped__") for attributes in before.values() for v in attributes.values())
    assert prepare_class(type(model)) == [] and prepare_class(type(model.config)) == []
    assert family_of(model) is None and not is_patched(model) and not describe(model).old_checkpointing_api
    if not HAS_CHECKPOINTING_KWARGS:
        return  # written for the new API (4.35+): transformers <= 4.34 cannot enable it, with or without us
    batch = {"input_ids": torch.randint(3, 256, (2, 8)), "labels": torch.randint(3, 256, (2, 8))}
    for use_reentrant in (True, False):  # transformers' own checkpoint function, built from the request
        prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        with count_calls(model, "InternLM2DecoderLayer") as counts:
            assert reentrant_after(model, "model.norm", batch) is use_reentrant
        assert set(counts.values()) == {2}
    assert {k: dict(vars(k)) for k in before} == before
