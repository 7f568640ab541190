"""Generating in training mode keeps the KV cache; training still turns it off and recomputes.

Tutorials call ``model.chat()`` straight after ``trainer.train()``, so the model is still in training mode with
routed checkpointing on. ``generate`` runs without grad, where no block checkpoints, so the cache must stay on:
otherwise every new token recomputes the whole prefix. What the first decoder block sees tells which happened:
with the cache, the prompt once and then one token per step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import pytest
import torch
from helpers import TRANSFORMERS, batch, blocks, count_block_calls, lora, step_grads

from qwen_ckpt_compat import checkpoint_settings, prepare_for_lora

NEW_TOKENS = 6


@contextlib.contextmanager
def first_block_lengths(model) -> Iterator[list]:
    """Records the sequence length of every input to the first decoder block."""
    lengths: list = []
    handle = blocks(model)[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        yield lengths
    finally:
        handle.remove()


def _generate(model, prompt: torch.Tensor) -> torch.Tensor:
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )


def _tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    try:
        tokenizer.encode("hi")
    except ValueError as error:  # as in test_newer_transformers.test_chat_replies
        pytest.skip(f"the remote tokenizer cannot encode on transformers {TRANSFORMERS}: {error}")
    return tokenizer


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_generate_in_training_mode_uses_the_kv_cache(qwen, use_reentrant, with_lora):
    model = prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if with_lora:
        model = lora(model)
    prompt = batch(batch_size=1, length=10, seed=3)["input_ids"]
    model.eval()
    expected = _generate(model, prompt)
    model.train()
    with first_block_lengths(model) as lengths:
        generated = _generate(model, prompt)
    assert model.training and checkpoint_settings(qwen).use_reentrant is use_reentrant
    assert generated.shape == (1, prompt.shape[1] + NEW_TOKENS)
    assert lengths == [prompt.shape[1]] + [1] * (NEW_TOKENS - 1), "the prompt once, then one token per step"
    assert torch.equal(generated, expected), "the same ids as in eval mode"


def test_chat_in_training_mode_uses_the_kv_cache(qwen, tiny_qwen_dir):
    """The tutorial's order: training mode, routed checkpointing on, a peft model, then model.chat()."""
    tokenizer = _tokenizer(tiny_qwen_dir)
    model = lora(prepare_for_lora(qwen))
    model.eval()
    expected, _ = model.chat(tokenizer, "hi", history=None, max_new_tokens=NEW_TOKENS)
    model.train()
    with first_block_lengths(model) as lengths:
        response, history = model.chat(tokenizer, "hi", history=None, max_new_tokens=NEW_TOKENS)
    assert len(lengths) >= 2, "at least two generation steps"
    assert lengths[0] > 1 and lengths[1:] == [1] * (len(lengths) - 1)
    assert (response, history) == (expected, [("hi", expected)])


def test_training_still_turns_the_cache_off_and_recomputes(qwen, caplog):
    model = lora(prepare_for_lora(qwen))
    inputs = batch()
    model.train()
    with caplog.at_level(logging.WARNING), count_block_calls(model) as counts:
        outputs = model(**inputs, use_cache=True)
        outputs.loss.backward()
    assert outputs.past_key_values is None, "no cache while blocks are checkpointed"
    assert set(counts.values()) == {2}, "each block forward once and recomputed once"
    assert "use_cache=True` is incompatible with gradient checkpointing" in caplog.text
    assert len(step_grads(model)) == 20


def test_no_grad_in_training_mode_returns_a_cache(qwen):
    prepare_for_lora(qwen)
    qwen.train()
    with torch.no_grad(), count_block_calls(qwen) as counts:
        outputs = qwen(input_ids=batch()["input_ids"], use_cache=True)
    assert outputs.past_key_values is not None and len(outputs.past_key_values) == len(blocks(qwen))
    assert set(counts.values()) == {1}, "nothing is checkpointed without grad"
