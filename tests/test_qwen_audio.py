"""Qwen-Audio(-Chat): what only this family does (docs/facts/qwen-audio.md). The generic suites take its fixture
from ``TINY_FAMILIES`` (text batches: the audio encoder does not run).

- Recognised apart from Qwen v1 and Qwen-VL (all say ``model_type`` "qwen").
- Audio and text batches (the tokenizer's ``audio_info`` passed to the model): with LoRA on the language model the
  frozen encoder runs once and the ``QWenBlock`` s are recomputed; with LoRA inside the encoder its
  ``ResidualAttentionBlock`` s are recomputed too, in the requested mode, with gradients equal to no checkpointing.
- The tokenizer (spans as ``process_audio`` says) gives 4.32.1's results on every row.
"""

from __future__ import annotations

import json

import pytest
from helpers import (
    count_calls,
    family_of_fixture,
    fresh_dir,
    load_family,
    max_relative_difference,
    step_grads,
)
from tokenizer_cases import REFERENCE_FILE, exercise, pad_takes_padding_side, padding_side_passed

from qwen_ckpt_compat import prepare_for_lora, unpatch
from qwen_ckpt_compat._family_registry import family_for_config, family_of
from qwen_ckpt_compat.testing._qwen_audio import AUDIO_TARGET_MODULES, SAMPLE


@pytest.fixture
def audio_model(tmp_path):
    from transformers import AutoTokenizer

    family = family_of_fixture("qwen_audio")
    path = fresh_dir(tmp_path, family.write, "qwen_audio")
    model = load_family(family, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    query = f"<audio>{path / SAMPLE}</audio>what does the person say? hello"
    info = tokenizer.process_audio(query)
    encoded = tokenizer([query, query], audio_info=info, return_tensors="pt")
    info = {**info, "input_audios": info["input_audios"].repeat(2, 1, 1)}
    info["input_audio_lengths"] = info["input_audio_lengths"].repeat(2, 1)
    info["audio_span_tokens"] = info["audio_span_tokens"] * 2
    batch = {**encoded, "labels": encoded["input_ids"].clone(), "audio_info": info}
    yield family, model, batch
    unpatch(model)


def test_qwen_audio_is_told_apart_from_qwen_and_qwen_vl(audio_model):
    _, model, _ = audio_model
    assert family_of(model).name == "qwen_audio"
    assert family_for_config({"model_type": "qwen", "audio": {"n_layer": 2}}).name == "qwen_audio"
    assert family_for_config({"model_type": "qwen"}).name == "qwen"


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    )


def test_frozen_audio_encoder_runs_once_and_the_text_blocks_are_recomputed(audio_model):
    family, model, batch = audio_model
    peft_model = _lora(prepare_for_lora(model), family.target_modules)
    with count_calls(model, family.block) as text, count_calls(model, "ResidualAttentionBlock") as audio:
        grads = step_grads(peft_model, batch)
    assert set(text.values()) == {2} and set(audio.values()) == {1}
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_trained_audio_encoder_is_recomputed_with_grads_equal_to_no_checkpointing(audio_model, use_reentrant):
    family, model, batch = audio_model
    prepare_for_lora(model, use_gradient_checkpointing=False)
    peft_model = _lora(model, (*family.target_modules, *AUDIO_TARGET_MODULES))
    with count_calls(model, "ResidualAttentionBlock") as audio:
        reference = step_grads(peft_model, batch)
    assert set(audio.values()) == {1}
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with count_calls(model, family.block) as text, count_calls(model, "ResidualAttentionBlock") as audio:
        checkpointed = step_grads(peft_model, batch)
    assert set(text.values()) == {2} and set(audio.values()) == {2}
    assert any(".audio." in name for name in checkpointed)
    assert max_relative_difference(checkpointed, reference) <= 1e-5


def test_qwen_audio_tokenizer_matches_the_4_32_reference(tmp_path):
    from transformers import AutoTokenizer

    family = family_of_fixture("qwen_audio")
    reference = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))["qwen_audio"]
    assert reference["transformers"] == "4.32.1"
    path = fresh_dir(tmp_path, family.write, "qwen_audio_tok")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    results = exercise(tokenizer, path, family.chat)
    for case in reference["results"]:
        assert results[case] == reference["results"][case], (
            f"qwen_audio: {case} differs from transformers 4.32.1"
        )
    if pad_takes_padding_side():
        assert padding_side_passed(tokenizer) == reference["results"]["padded"]
