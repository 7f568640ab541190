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
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_ckpt_compat._family_registry import family_named
from qwen_ckpt_compat._model_state import existing_state
from qwen_ckpt_compat.speed.selective import attention_ops, keeps_output

TRANSFORMERS = Version(Version(transformers.__version__).base_version)
TARGET_MODULES = list(family_named("qwen").lora_targets)

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


def fresh_dir(tmp_path, write, name: str = "model", **kwargs):
    """A model folder with a name of its own, hence its own `transformers_modules.*` classes (loaded afresh).

    transformers names the dynamic module after the folder (plus, on 5.x, a hash of the code) and reuses the
    classes of a folder it has loaded before, without going through its loader again.
    """
    import re

    return write(tmp_path / re.sub(r"\W", "_", f"{tmp_path.name}_{name}"), **kwargs)


@contextlib.contextmanager
def spy_checkpoint(monkeypatch) -> Iterator[list]:
    """Records the keyword arguments of every ``torch.utils.checkpoint.checkpoint`` call."""
    calls: list = []
    real = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(dict(kwargs))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    yield calls


# ------------------------------------------------------------------------------------ the other families


def family_of_fixture(name: str):
    """The `qwen_ckpt_compat.testing.TinyFamily` of ``name``; skips (with the reason) if its packages are missing."""
    import importlib.util

    from qwen_ckpt_compat.testing import TINY_FAMILIES

    family = TINY_FAMILIES[name]
    missing = [p for p in family.packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the {name} remote code imports {', '.join(missing)} when it loads, and it is not installed here")
    return family


def load_family(family, path, **kwargs) -> torch.nn.Module:
    model = family.load(path, **kwargs)
    model.float()
    model.train()
    return model


def family_blocks(model, name: str) -> list:
    return [m for m in model.modules() if type(m).__name__ == name]


@contextlib.contextmanager
def count_calls(model, block_name: str) -> Iterator[Counter]:
    """Counts how often each block of class ``block_name`` runs its forward (a recompute counts again)."""
    counts: Counter = Counter()
    handles = [
        block.register_forward_pre_hook(lambda module, args, kwargs=None, index=index: counts.update([index]))
        for index, block in enumerate(family_blocks(model, block_name))
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def family_lora(model, family, *, targets=None, seed: int = 0):
    """A LoRA adapter on the family's targets, A and B random (every LoRA gradient non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets or family.target_modules), init_lora_weights=False
    )
    return get_peft_model(model, config)


def family_batch(family, image_path: Optional[str] = None, batch_size: int = 2, length: int = 12, seed: int = 0) -> dict:
    """Ids, mask and labels; for Qwen-VL an image+text batch when ``image_path`` is given (one image per row)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(family.vocab_size, 256), (batch_size, length), generator=generator)
    if image_path is not None:
        from qwen_ckpt_compat.testing import qwen_vl_image_span

        span = torch.tensor(qwen_vl_image_span(image_path)).expand(batch_size, -1)
        ids = torch.cat([ids[:, :3], span, ids[:, 3:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def reentrant_after(model, final_norm: str, inputs: dict) -> bool:
    """One training step; whether the last block's output came out of torch's reentrant ``CheckpointFunction``."""
    seen: list = []
    norm = next(m for name, m in model.named_modules() if name.endswith(final_norm))
    handle = norm.register_forward_pre_hook(
        lambda module, args: seen.append(type(args[0].grad_fn).__name__ if args[0].grad_fn is not None else None)
    )
    try:
        step_grads(model, inputs)
    finally:
        handle.remove()
    return "CheckpointFunction" in (seen[0] or "")


MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}


class OpCounts(TorchDispatchMode):
    """Counts the aten operators that really run (an output served by selective recompute does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.kept_kind: Counter = Counter()  # matmuls by whether selective recompute keeps their outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        if str(func) in MATMULS:
            self.kept_kind[keeps_output(func, args)] += 1
        return func(*args, **(kwargs or {}))

    def attention(self) -> int:
        names = {str(op) for op in attention_ops()}
        return sum(n for op, n in self.counts.items() if op in names)

    def matmuls(self) -> int:
        return sum(n for op, n in self.counts.items() if op in MATMULS)


def has_our_input_grads_hook(model) -> bool:
    """Whether the library's own input-embedding hook (for reentrant checkpointing with a frozen base) is in place."""
    state = existing_state(model)
    return state is not None and state.input_grads_hook is not None
