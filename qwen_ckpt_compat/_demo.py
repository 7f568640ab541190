"""``python -m qwen_ckpt_compat demo``: the problem on the installed transformers, then the fix, offline.

Builds the tiny Qwen v1 model the package ships, shows what the installed transformers does with it
without this library (the error, or the checkpointing kwargs it ignores), then trains a few LoRA steps
with :func:`prepare_for_lora` and prints the loss, the gradients and the checkpoint mode in effect. Seeded: two
runs print the same losses.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, TextIO

from ._versions import capabilities

__all__ = ["run_demo"]


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    from .testing import TARGET_MODULES

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    return get_peft_model(model, config)


def _batch(vocab_size: int, batch_size: int, length: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@contextlib.contextmanager
def _observe(model: Any) -> Iterator[dict]:
    """Counts block runs and notes whether the last block ran under torch's reentrant checkpoint."""
    seen: dict = {"runs": Counter(), "reentrant": None}
    blocks = [m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", []) or [])]
    ln_f = [m for name, m in model.named_modules() if name.endswith("ln_f")]

    def final_norm_input(module: Any, args: tuple) -> None:
        node = args[0].grad_fn
        seen["reentrant"] = node is not None and "CheckpointFunction" in type(node).__name__

    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen["runs"].update([i])) for i, b in enumerate(blocks)]
    handles += [m.register_forward_pre_hook(final_norm_input) for m in ln_f]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _enable_call(model: Any, kwargs: dict) -> Callable[[], None]:
    name = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing_enable"
    method = getattr(model, name)
    parameter = next((p for p in inspect.signature(method).parameters if p.endswith("checkpointing_kwargs")), None)
    if parameter is None:
        return lambda: method()
    return lambda: method(**{parameter: kwargs})


def _try_without_library(path: Any, lora_first: bool, out: TextIO) -> None:
    from ._loading import remote_code_loading_disabled
    from .testing import load_tiny_qwen

    try:
        with remote_code_loading_disabled():
            model = load_tiny_qwen(path)
    except Exception as error:  # noqa: BLE001 - the point is to show it
        print(f"   loading fails: {type(error).__name__}: {str(error).splitlines()[0]}", file=out)
        return
    model.float().train()
    try:
        if lora_first:
            model = _lora(model)
            _enable_call(model, {"use_reentrant": False})()
        else:
            _enable_call(model, {"use_reentrant": False})()
            model = _lora(model)
        with _observe(model.get_base_model()) as seen:
            model(**_batch(model.config.vocab_size, 2, 32)).loss.backward()
    except Exception as error:  # noqa: BLE001
        print(f"   fails: {type(error).__name__}: {str(error).splitlines()[0]}", file=out)
        return
    runs = sorted(seen["runs"].values())
    if not runs or max(runs) < 2:
        print("   runs, but no block is checkpointed", file=out)
    elif seen["reentrant"]:
        why = "kwargs ignored" if capabilities().checkpointing_kwargs else "this release takes no checkpointing kwargs"
        print(f"   runs, but checkpointing is reentrant although use_reentrant=False was asked ({why})", file=out)
    else:
        print("   runs, non-reentrant as asked", file=out)


def _without_library(path: Any, out: TextIO) -> None:
    print("\n1. Without qwen-ckpt-compat, checkpointing with use_reentrant=False:", file=out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print("   a) LoRA first, then checkpointing (the tutorial order):", file=out)
        _try_without_library(path, True, out)
        print("   b) checkpointing first, then LoRA:", file=out)
        _try_without_library(path, False, out)


def run_demo(*, steps: int = 5, layers: int = 2, seq_length: int = 64, out: TextIO) -> None:
    """Runs the demo and prints to ``out``; see the module docstring.

    Seeded: every run prints the same losses (LoRA's initialisation draws from torch's CPU generator, which is
    seeded inside and given back to the caller as it was).
    """
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings():
        # Deprecation notices that peft and transformers print on newer releases, not about this library.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            _run(steps=steps, layers=layers, seq_length=seq_length, out=out)


def _run(*, steps: int, layers: int, seq_length: int, out: TextIO) -> None:
    import torch

    from . import checkpoint_settings, prepare_for_lora
    from .testing import load_tiny_qwen, write_tiny_qwen

    caps = capabilities()
    peft_version = caps.peft or "not installed"
    print(f"qwen-ckpt-compat demo: transformers {caps.transformers}, torch {caps.torch}, peft {peft_version}", file=out)
    with tempfile.TemporaryDirectory(prefix="qwen-ckpt-compat-demo-") as tmp:
        path = write_tiny_qwen(tmp, num_hidden_layers=layers, seq_length=max(seq_length, 64))
        print(f"tiny Qwen v1 remote-code model ({layers} blocks) written to {path}", file=out)
        _without_library(path, out)

        print("\n2. With qwen-ckpt-compat: model = prepare_for_lora(model), then LoRA", file=out)
        model = load_tiny_qwen(path)
        model.float().train()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = _lora(prepare_for_lora(model)).to(device)
        settings = checkpoint_settings(model)
        assert settings is not None, "prepare_for_lora enabled routed checkpointing"
        print(f"   checkpoint kwargs in effect: {settings.kwargs}, every_n_layers={settings.every_n_layers}", file=out)
        batch = {k: v.to(device) for k, v in _batch(model.config.vocab_size, 4, seq_length).items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            with _observe(model.get_base_model()) as seen:
                loss = model(**batch).loss
                loss.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            flowing = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
            norm = torch.norm(torch.stack([g.norm() for g in grads if g is not None])).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            runs = sorted(seen["runs"].values())
            mode = "reentrant" if seen["reentrant"] else "non-reentrant"
            print(
                f"   step {step}: loss {loss.item():.4f}  LoRA grads flowing {flowing}/{len(grads)}"
                f" (norm {norm:.3e})  block runs per step {runs} -> {mode} checkpointing",
                file=out,
            )
            if step == 1 and flowing < len(grads):
                print("           (lora_A gradients are zero until lora_B leaves its zero initialisation)", file=out)
        elapsed = time.perf_counter() - start
        memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else ""
        print(f"   {steps} steps in {elapsed:.2f} s on {device.type}{memory}", file=out)
