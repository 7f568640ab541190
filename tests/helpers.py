"""Helpers shared by the tests: version gates, loading, LoRA, and observing what torch really did."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, Optional

import pytest
import torch
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it
import transformers
from packaging.version import Version

TRANSFORMERS = Version(Version(transformers.__version__).base_version)
TARGET_MODULES = ["c_attn", "c_proj", "w1", "w2"]

# Releases where transformers' enable path itself is broken for old remote code, without the library.
ENABLE_RAISES_TYPEERROR = Version("4.35.0") <= TRANSFORMERS < Version("4.36.0")
HAS_CHECKPOINTING_KWARGS = TRANSFORMERS >= Version("4.35.0")
HAS_FALLBACK = TRANSFORMERS >= Version("4.36.0")

needs_kwargs = pytest.mark.skipif(
    not HAS_CHECKPOINTING_KWARGS, reason=f"transformers {TRANSFORMERS} has no gradient_checkpointing_kwargs"
)
# Selective activation checkpointing: torch.utils.checkpoint.create_selective_checkpoint_contexts (torch >= 2.5).
needs_selective = pytest.mark.skipif(
    not hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts"),
    reason=f"torch {torch.__version__} has no create_selective_checkpoint_contexts (2.5+)",
)


def load_qwen(path, **kwargs) -> torch.nn.Module:
    from qwen_ckpt_compat.testing import load_tiny_qwen

    model = load_tiny_qwen(path, **kwargs)
    model.float()
    model.train()
    return model


def enable(model, **kwargs) -> None:
    """Calls the installed transformers' enable method (the 5.23+ name where it exists)."""
    name = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing_enable"
    if "gradient_checkpointing_kwargs" in kwargs and name == "activation_checkpointing_enable":
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    getattr(model, name)(**kwargs)


def checkpointing_on(model) -> bool:
    """transformers' own view (`is_activation_checkpointing` on 5.23+, the deprecated name before)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return getattr(model, name)


def disable(model) -> None:
    name = "activation_checkpointing_disable" if hasattr(model, "activation_checkpointing_disable") else "gradient_checkpointing_disable"
    getattr(model, name)()


def lora(model, *, random_b: bool = True, seed: int = 0):
    """Wraps ``model`` with a LoRA adapter on the Qwen targets (both A and B random, so all grads are non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES,
                        init_lora_weights=not random_b)
    return get_peft_model(model, config)


def batch(vocab_size: int = 256, batch_size: int = 2, length: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora_grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if "lora_" in name and p.grad is not None}


def step_grads(model, inputs: Optional[dict] = None) -> dict:
    """One forward/backward in train mode; returns the LoRA gradients (and clears them)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**(inputs or batch())).loss
    loss.backward()
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, "both runs must produce the same, non-empty set of LoRA gradients"
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def blocks(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "QWenBlock"]


@contextlib.contextmanager
def count_block_calls(model) -> Iterator[Counter]:
    """Counts how often each decoder block's forward runs (a recompute counts again)."""
    counts: Counter = Counter()
    handles = [
        block.register_forward_pre_hook(lambda module, args, index=index: counts.update([index]))
        for index, block in enumerate(blocks(model))
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def observe_mode(model) -> Iterator[list]:
    """Records the autograd node that produced the hidden states entering the final norm.

    With reentrant checkpointing the last block's output comes out of torch's ``CheckpointFunction``;
    with the non-reentrant variant (or none) it comes from an ordinary op.
    """
    seen: list = []
    ln_f = next(m for name, m in model.named_modules() if name.endswith("ln_f"))
    handle = ln_f.register_forward_pre_hook(
        lambda module, args: seen.append(type(args[0].grad_fn).__name__ if args[0].grad_fn is not None else None)
    )
    try:
        yield seen
    finally:
        handle.remove()


def reentrant_in_effect(model) -> bool:
    """Runs one training step and tells whether the blocks ran under torch's reentrant checkpoint."""
    with observe_mode(model) as seen:
        step_grads(model)
    assert seen, "the final norm never ran"
    return "CheckpointFunction" in (seen[0] or "")
