#!/usr/bin/env python
"""Peak memory and step time of every checkpointing mode, with Qwen-7B shapes, on one GPU, in one command.

    python bench/run.py --out $OUT              # one H200: about 6 minutes; writes $OUT/bench.json
    python bench/run.py --suite --out $OUT      # the speed targets' measurements (docs/speed.md); repeat until complete
    python bench/run.py --tiny --out /tmp/b     # the same pipeline with tiny shapes on the CPU, in seconds
    python bench/report.py $OUT/bench.json      # docs/performance.md and docs/performance.png from it

Each mode gets a fresh model: Qwen-7B shapes (32 layers, hidden 4096, 32 heads, intermediate 22016, vocabulary
151936) built from the shipped fixture's remote code with random bf16 weights, allocated directly on the GPU (no
download, nothing written but the config); LoRA r=8 on c_attn/c_proj/w1/w2; batch 1 of random tokens with an
all-ones attention mask, as a collator gives; AdamW. Per mode: 2 warm-up steps, then the median of 6 timed steps
(forward, backward, optimizer step; the device synchronised around each); the peak is ``max_memory_allocated``
since the mode began (reset after the previous mode was freed); one more step then names the attention kernels.
The modes: no checkpointing; transformers' own path without this library (a separate process; recorded as not
runnable, with the reason, where it fails); every library mode (reentrant, non-reentrant, every 2nd block,
offload, the memory budget, selective recompute), each with and without the fused attention kernel; native
Qwen2 of the same shapes with transformers' own checkpointing, as the peer. Results are written after every
mode, so a run cut short still leaves them, and ``--resume`` (implied by ``--suite``) carries on from them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository as checked out: no install needed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qcc-bench-hf-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

QWEN_TARGETS = ["c_attn", "c_proj", "w1", "w2"]
NATIVE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_IMPORT_HOOK = "QWEN_CKPT_COMPAT_NO_IMPORT_HOOK"


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    heads: int
    intermediate: int  # Qwen v1's: the MLP is half as wide
    vocab: int
    seqs: tuple
    dtype: str
    device: str
    warmup: int
    steps: int
    budget: str
    lora_r: int = 8
    long_steps: Optional[tuple] = None  # (from this length on, warm-up steps, timed steps): fewer steps at long lengths


FULL = Shapes(32, 4096, 32, 22016, 151936, (2048, 8192), "bfloat16", "cuda", 2, 6, "70GiB")
TINY = Shapes(4, 64, 4, 256, 512, (32, 64), "float32", "cpu", 1, 2, "70GiB")


@dataclass(frozen=True)
class Suite:
    """``--suite``: every measurement the speed targets need (docs/speed.md), in one command.

    A device call may be cut short (the lent GPU machine stops a command at 600 s; the suite needs about 16
    minutes on one H200), so the suite resumes: the same command, run again with the same ``--out``, keeps the
    rows already measured and runs the rest, until it prints ``complete``.
    """

    seqs: tuple
    modes: tuple
    long_steps: tuple  # Shapes.long_steps
    longest: tuple  # LONGEST setups, searched in this order: the first is the peer the others are timed against
    longest_range: tuple  # (start, step, limit)


SUITE = Suite(
    seqs=(2048, 8192, 32768),
    modes=("non_reentrant", "default", "default+chunked", "default+chunked+offload", "selective+fused", "native_qwen2"),
    long_steps=(16384, 1, 3),
    longest=("native_qwen2", "leanest", "default"),
    longest_range=(32768, 8192, 131072),
)
TINY_SUITE = Suite(seqs=(32, 64, 128), modes=SUITE.modes, long_steps=(128, 1, 1), longest=SUITE.longest,
                   longest_range=(32, 32, 128))


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "qwen" or "native" (transformers' own path is measured apart: transformers_own_measure)
    prepare: Optional[dict] = None  # prepare_for_lora options; None: the library is not used
    description: str = ""
    variant: Optional[str] = None  # an earlier implementation, for A/B in one run (see VARIANTS)


def modes(budget: str) -> list:
    library = [
        ("reentrant", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "every block, reentrant"),
        ("non_reentrant", {}, "every block, non-reentrant (the default's checkpointing)"),
        ("every_2nd", {"every_n_layers": 2}, "every 2nd block, non-reentrant"),
        ("offload", {"offload": True}, "every block, inputs offloaded to pinned host memory"),
        ("budget", {"memory_budget": budget}, f"memory_budget={budget}, planned from the first step"),
        ("selective", {"selective": True}, "every block, selective recompute (attention and projection outputs kept)"),
    ]
    result = [
        Mode("no_checkpointing", "qwen", None, description="no checkpointing"),
        Mode("no_checkpointing+fused", "qwen", {"use_gradient_checkpointing": False, "fused_attention": True},
             "no checkpointing, fused attention kernel"),
    ]
    for name, options, text in library:
        result.append(Mode(name, "qwen", {**options, "fused_attention": False}, description=text + ", fused attention off"))
        result.append(Mode(f"{name}+fused", "qwen", {**options, "fused_attention": True}, text + ", fused attention"))
    result += [
        Mode("default", "qwen", {}, "prepare_for_lora(model): every block, non-reentrant, fused attention in training"),
        Mode("default+chunked", "qwen", {"chunked_loss": True}, "the default, chunked loss (1,024 tokens a chunk)"),
        Mode("default+chunked+offload", "qwen", {"chunked_loss": True, "offload": True},
             "the default, chunked loss, block inputs offloaded to pinned host memory"),
    ]
    result += [
        # A/B against what the library did before, in the same run (the H200's absolute times drift between machines)
        Mode("default+padding_mask", "qwen", {}, "the default, the all-zero padding mask passed on (before 2026-12-04)",
             variant="padding_mask"),
        Mode("default+chunked+own_loss", "qwen", {"chunked_loss": True}, "the default, the library's own chunked loss "
             "(Liger-Kernel not used even where installed)", variant="own_loss"),
        Mode("default+chunked+offload+save_on_cpu", "qwen", {"chunked_loss": True, "offload": True},
             "the default, chunked loss, offload through torch's save_on_cpu (before 2026-12-04)", variant="save_on_cpu"),
    ]
    result.append(Mode("native_qwen2", "native", description="native Qwen2, same shapes, transformers' own non-reentrant checkpointing"))
    return result


#: Earlier implementations a mode can ask for (``Mode.variant``), each undone after the mode.
VARIANTS = ("padding_mask", "own_loss", "save_on_cpu")


@contextlib.contextmanager
def variant(name: Optional[str]):
    """Runs a mode with one earlier implementation in place: ``padding_mask`` passes an all-zero padding mask on to
    the remote attention (which then builds its (q x q) additive mask); ``own_loss`` hides Liger-Kernel from the
    chunked loss; ``save_on_cpu`` offloads through torch's ``save_on_cpu`` (synchronous copies on the compute
    stream) instead of the side-stream hooks."""
    if name is None:
        yield
        return
    from qwen_ckpt_compat import _settings
    from qwen_ckpt_compat.speed import attention, loss

    patches = {
        "padding_mask": (attention, "_replaced", lambda forward, args, kwargs, name, value: (args, kwargs)),
        "own_loss": (loss, "_liger_loss", lambda: None),
        "save_on_cpu": (_settings, "_offload_context",
                        lambda: torch.autograd.graph.save_on_cpu(**_settings._save_on_cpu_options())),
    }
    module, attribute, replacement = patches[name]
    before = getattr(module, attribute)
    setattr(module, attribute, replacement)
    try:
        yield
    finally:
        setattr(module, attribute, before)


def chunked_loss_kernel(device: torch.device) -> str:
    """Which chunked loss runs on ``device``: Liger-Kernel's on CUDA where it is installed and usable, else the
    library's."""
    from qwen_ckpt_compat.speed import loss

    return "liger-kernel" if device.type == "cuda" and loss._liger_loss() is not None else "qwen-ckpt-compat"


@dataclass
class Result:
    mode: str
    seq: int
    description: str
    status: str = "ok"  # "ok", "not runnable", "error", "skipped"
    reason: Optional[str] = None
    peak_bytes: Optional[int] = None
    step_s: Optional[float] = None
    step_times_s: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    attention_kernels: list = field(default_factory=list)
    plan: Optional[dict] = None
    leftover_bytes: Optional[int] = None
    wall_s: Optional[float] = None
    loss_kernel: Optional[str] = None  # the chunked loss's implementation, where the mode chunks it
    call: Optional[int] = None  # which call measured it (1, 2, ...: a resumed run; meta["calls"])


# ------------------------------------------------------------------------------------------- devices


def _reason(error: BaseException) -> str:
    """One line for the JSON: the exception's type and the first line of its message (which may be empty)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _allocated(device: torch.device) -> Optional[int]:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _clean(device: torch.device, collect: bool = True) -> None:
    if collect:
        gc.collect()  # models hold reference cycles (hooks, peft): their memory comes back only with a collection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class _AttentionKernels(TorchDispatchMode):
    """Names the attention kernels a step runs (flash, memory-efficient, math...)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "attention" in name and "backward" not in name:
            self.names.add(name.replace("aten.", "").replace(".default", ""))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------- models


def write_remote_code(shapes: Shapes, folder: Path) -> Path:
    """Config and remote-code files of the fixture at ``shapes``; no weights (they are built on the device)."""
    from qwen_ckpt_compat.testing import write_tiny_qwen

    bf16 = shapes.dtype == "bfloat16"
    return write_tiny_qwen(
        folder, num_hidden_layers=shapes.layers, hidden_size=shapes.hidden, num_attention_heads=shapes.heads,
        intermediate_size=shapes.intermediate, vocab_size=shapes.vocab, seq_length=max(shapes.seqs),
        weights=False, bf16=bf16, fp32=not bf16, torch_dtype=shapes.dtype, use_cache=False,
    )


def build_qwen(shapes: Shapes, code: Path, device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(code), trust_remote_code=True)
    with torch.device(device), _default_dtype(getattr(torch, shapes.dtype)):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return _checked(model, shapes, device)


def build_native(shapes: Shapes, device: torch.device) -> Any:
    import transformers

    if not hasattr(transformers, "Qwen2ForCausalLM"):
        raise _NotRunnable(f"transformers {transformers.__version__} has no Qwen2ForCausalLM")
    config = transformers.Qwen2Config(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate // 2,
        num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.heads,
        max_position_embeddings=max(shapes.seqs), tie_word_embeddings=False, use_cache=False,
    )
    with torch.device(device), _default_dtype(getattr(torch, shapes.dtype)):
        model = transformers.Qwen2ForCausalLM(config)
    return _checked(model, shapes, device)


def _checked(model: Any, shapes: Shapes, device: torch.device) -> Any:
    """The weights were created where they belong, in the benchmark's dtype (never copied there)."""
    found = {(p.device.type, p.dtype) for p in model.parameters()}
    if found != {(device.type, getattr(torch, shapes.dtype))}:
        raise RuntimeError(f"{type(model).__name__} was built with parameters {sorted(map(str, found))}")
    return model


def add_lora(model: Any, targets: list, r: int) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))


def enable_transformers_checkpointing(model: Any, kwargs: Optional[dict]) -> None:
    """transformers' own enable method (the 5.23+ name where it exists), kwargs where it takes them."""
    import inspect

    name = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing_enable"
    enable = getattr(model, name)
    parameters = inspect.signature(enable).parameters
    key = next((p for p in parameters if p.endswith("checkpointing_kwargs")), None)
    enable(**({key: kwargs} if key and kwargs is not None else {}))


#: Whether each mode runs one more step to name its attention kernels (``--no-kernel-names``: not, at long lengths).
NAME_KERNELS = True


class _NotRunnable(Exception):
    pass


def make_batch(shapes: Shapes, seq: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, shapes.vocab, (1, seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------------------------------ one mode


def steps_at(shapes: Shapes, seq: int) -> tuple:
    """(warm-up steps, timed steps) at ``seq`` tokens, and whether a step names the attention kernels there."""
    if shapes.long_steps is not None and seq >= shapes.long_steps[0]:
        return shapes.long_steps[1], shapes.long_steps[2], False
    return shapes.warmup, shapes.steps, NAME_KERNELS


def measure(model: Any, batch: dict, shapes: Shapes, device: torch.device, result: Result) -> None:
    warmup, timed, name_kernels = steps_at(shapes, result.seq)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return round(float(loss.detach()), 4)

    for index in range(warmup + timed):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        elapsed = time.perf_counter() - start
        if index >= warmup:
            result.step_times_s.append(round(elapsed, 5))
        result.losses.append(loss)
    result.step_s = statistics.median(result.step_times_s)
    result.peak_bytes = _peak(device)
    # The kernels are named in one more step, after the peak was read: no measured step runs under an extra
    # dispatch mode.
    if not name_kernels:
        return
    with _AttentionKernels() as kernels:
        step()
    result.attention_kernels = sorted(kernels.names)


def run_mode(mode: Mode, seq: int, shapes: Shapes, code: Path, device: torch.device) -> Result:
    from qwen_ckpt_compat import UnsupportedTorchError, memory_plan, prepare_for_lora, unpatch

    result = Result(mode.name, seq, mode.description)
    start = time.perf_counter()
    model = None
    try:
        _clean(device, collect=False)  # the previous mode cleaned up after itself
        batch = make_batch(shapes, seq, device)
        if mode.kind == "native":
            model = build_native(shapes, device)
            enable_transformers_checkpointing(model, {"use_reentrant": False})
            model = add_lora(model, NATIVE_TARGETS, shapes.lora_r)
        else:
            model = build_qwen(shapes, code, device)
            if mode.prepare is not None:
                prepare_for_lora(model, **mode.prepare)
            model = add_lora(model, QWEN_TARGETS, shapes.lora_r)
        with variant(mode.variant):
            if (mode.prepare or {}).get("chunked_loss"):
                result.loss_kernel = chunked_loss_kernel(device)
            measure(model, batch, shapes, device, result)
        plan = memory_plan(model) if mode.kind == "qwen" else None
        if plan is not None:
            result.plan = _plan_dict(plan)
    except (_NotRunnable, UnsupportedTorchError) as error:  # e.g. selective recompute on torch < 2.5
        result.status, result.reason = "not runnable", str(error)
    except Exception as error:  # noqa: BLE001 - one mode failing must not lose the others
        result.status, result.reason = "error", _reason(error)
        traceback.print_exc()
    finally:
        if model is not None and mode.kind == "qwen":
            unpatch(model)
        model = batch = None
        _clean(device)
        result.leftover_bytes = _allocated(device)
        result.wall_s = round(time.perf_counter() - start, 2)
    return result


def _plan_dict(plan: Any) -> dict:
    data = asdict(plan)
    data["text"] = str(plan)
    data["kept"] = plan.count("keep")
    data["selective"] = plan.count("selective")
    data["checkpointed"] = plan.count("checkpoint")
    return data


# ------------------------------------------------------------------------------------ longest context

#: The setups whose longest trainable sequence ``--longest`` searches: (kind, prepare_for_lora options).
LONGEST = {
    "default": ("qwen", {}),
    # every block checkpointed, its input offloaded; fused attention; the loss by chunks
    "leanest": ("qwen", {"offload": True, "chunked_loss": True}),
    "native_qwen2": ("native", None),
}


def _one_step(model: Any, batch: dict, optimizer: Any, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def longest_context(name: str, shapes: Shapes, code: Path, device: torch.device, start: int, step: int, limit: int,
                    deadline: float, timed_at: Optional[int] = None, time_longest: bool = False) -> dict:
    """The longest sequence (batch 1, a multiple of ``step``) that one setup trains within the device's memory.

    One model for every probe: from ``start``, the length doubles until a step fails (out of memory) or passes
    ``limit``, then the failing interval is halved down to ``step``. Each probe is one training step (the first
    length gets a warm-up step before); its peak and time are recorded. ``timed_at``: a length also timed with
    two more steps (the longest length another setup reached), for the step-time comparison; ``time_longest``:
    the longest length found is timed so too. Timed probes say ``"timed": True``; ``"complete"`` is false where
    the deadline cut the search short.
    """
    from qwen_ckpt_compat import prepare_for_lora

    kind, options = LONGEST[name]
    found: dict = {"setup": name, "options": options, "probes": [], "longest": None, "status": "ok",
                   "range": [start, step, limit], "complete": False}
    model = None
    try:
        _clean(device)
        if kind == "native":
            model = build_native(shapes, device)
            enable_transformers_checkpointing(model, {"use_reentrant": False})
            model = add_lora(model, NATIVE_TARGETS, shapes.lora_r)
        else:
            model = build_qwen(shapes, code, device)
            prepare_for_lora(model, **(options or {}))
            model = add_lora(model, QWEN_TARGETS, shapes.lora_r)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def probe(seq: int, repeats: int = 1, timed: bool = False) -> bool:
            batch = make_batch(shapes, seq, device)
            torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
            try:
                times = [_one_step(model, batch, optimizer, device) for _ in range(repeats)]
            except torch.cuda.OutOfMemoryError as error:
                optimizer.zero_grad(set_to_none=True)
                batch = None
                _clean(device)
                found["probes"].append({"seq": seq, "ok": False, "reason": _reason(error)})
                return False
            found["probes"].append({"seq": seq, "ok": True, "peak_bytes": _peak(device), "step_s": round(min(times), 4),
                                    "step_times_s": [round(t, 4) for t in times], "timed": timed})
            return True

        def in_time() -> bool:
            found["complete"] = found["complete"] and time.monotonic() < deadline
            return found["complete"]

        found["complete"] = True
        probe(start)  # warm-up: kernels, allocator
        good, bad = (start, None) if probe(start) else (None, start)
        while good is not None and bad is None and good * 2 <= limit and in_time():
            bad_or_good = good * 2
            if probe(bad_or_good):
                good = bad_or_good
            else:
                bad = bad_or_good
        low, high = (good or step), (bad or limit + step)
        while good is not None and high - low > step and in_time():
            middle = (low + high) // 2 // step * step
            if middle in (low, high):
                break
            if probe(middle):
                low = good = middle
            else:
                high = middle
        found["longest"] = good
        for seq in dict.fromkeys([timed_at, good if time_longest else None]):
            if seq is not None and in_time():
                probe(seq, repeats=2, timed=True)
    except _NotRunnable as error:  # native Qwen2 on a transformers without it
        found["status"], found["reason"], found["complete"] = "not runnable", str(error), True
    except Exception as error:  # noqa: BLE001 - one setup failing must not lose the others
        found["status"], found["reason"] = "error", _reason(error)
        traceback.print_exc()
    finally:
        model = None
        _clean(device)
    return found


# ------------------------------------------------------------------------------ transformers' own path


def transformers_own_check(tiny: Shapes, folder: Path) -> dict:
    """In a process without this library's hooks: can transformers alone train the remote code with checkpointing?"""
    from qwen_ckpt_compat.testing import write_tiny_qwen  # the package import installs nothing here

    path = write_tiny_qwen(folder / "tiny-with-weights")
    stage = "load"
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
        stage = "enable checkpointing"
        enable_transformers_checkpointing(model, None)
        model.enable_input_require_grads()
        model = add_lora(model, QWEN_TARGETS, 4)
        stage = "train step"
        model.train()
        batch = make_batch(tiny, 16, torch.device("cpu"))
        model(**batch).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
        if not grads:
            return {"runnable": False, "reason": f"{stage}: no LoRA parameter received a gradient"}
    except Exception as error:  # noqa: BLE001 - the failure is the finding
        return {"runnable": False, "reason": f"{stage}: {_reason(error)}"}
    return {"runnable": True, "reason": None}


def transformers_own_measure(shapes: Shapes, seq: int, folder: Path, device: torch.device) -> Result:
    """transformers' own checkpointing on the remote code (reentrant, every layer), where it runs."""
    result = Result("transformers_own", seq, "transformers' own path, no library (remote code's reentrant checkpointing)")
    start = time.perf_counter()
    try:
        _clean(device)
        model = build_qwen(shapes, write_remote_code(shapes, folder / "code"), device)
        enable_transformers_checkpointing(model, None)
        model.enable_input_require_grads()
        model = add_lora(model, QWEN_TARGETS, shapes.lora_r)
        measure(model, make_batch(shapes, seq, device), shapes, device, result)
    except Exception as error:  # noqa: BLE001
        result.status, result.reason = "error", _reason(error)
    finally:
        model = None
        _clean(device)
        result.wall_s = round(time.perf_counter() - start, 2)
    return result


def _child(arguments: list) -> subprocess.Popen:
    env = {**os.environ, NO_IMPORT_HOOK: "1", "HF_HOME": tempfile.mkdtemp(prefix="qcc-bench-child-hf-")}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _child_json(process: subprocess.Popen, timeout: float) -> Any:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"runnable": False, "reason": f"the check did not finish within {timeout:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith("{") or line.startswith("[")]
    if process.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"runnable": False, "reason": f"the check process failed (exit {process.returncode}): {last[:300]}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ main


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "qwen-ckpt-compat"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    from qwen_ckpt_compat import __version__

    found["qwen-ckpt-compat (tree)"] = __version__
    found["cuda"] = torch.version.cuda
    return found


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


#: Rows a resumed run keeps (errors and rows skipped for time run again).
KEPT = ("ok", "not runnable")
#: What must be the same for a resumed run to add rows to an earlier call's file.
SAME_ON_RESUME = ("shapes", "tiny", "device")


def resumed(out_file: Path, meta: dict) -> Optional[dict]:
    """The earlier calls' report in ``out_file``, to be continued; ``None`` where there is none.

    Raises ``SystemExit`` where it was measured otherwise (other shapes, device or versions): rows of different
    setups must not meet in one table.
    """
    if not out_file.is_file():
        return None
    earlier = json.loads(out_file.read_text(encoding="utf-8"))
    meta = json.loads(json.dumps(meta))  # tuples as the file has them: lists
    earlier_versions = {k: v for k, v in earlier["meta"]["versions"].items() if k != "qwen-ckpt-compat (tree)"}
    versions_now = {k: v for k, v in meta["versions"].items() if k != "qwen-ckpt-compat (tree)"}
    differs = [key for key in SAME_ON_RESUME if earlier["meta"].get(key) != meta.get(key)]
    differs += ["versions"] if earlier_versions != versions_now else []
    if differs:
        raise SystemExit(f"{out_file} was measured with other {', '.join(differs)}: give another --out to start anew")
    return earlier


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the pipeline in seconds")
    parser.add_argument("--suite", action="store_true",
                        help="every measurement of the speed targets (lengths, modes, longest context); resumes")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUT/bench.json, run the rest")
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default: 2048 8192; tiny: 32 64)")
    parser.add_argument("--only", nargs="+", help="run only these modes (names as in the JSON)")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("WARMUP", "TIMED"), help="steps per mode (default: 2 6)")
    parser.add_argument("--deadline", type=float, default=510.0, help="seconds; modes not started by then are skipped")
    parser.add_argument("--longest", nargs="+", choices=sorted(LONGEST), help="search the longest trainable sequence")
    parser.add_argument("--longest-range", type=int, nargs=3, default=(32768, 4096, 262144), metavar=("START", "STEP", "LIMIT"),
                        help="first length, granularity and upper limit of the search")
    parser.add_argument("--longest-timed-at", type=int, help="also time each setup at this length (2 steps)")
    parser.add_argument("--no-kernel-names", action="store_true", help="no extra step per mode naming the attention kernels")
    parser.add_argument("--transformers-own-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transformers-own-measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global NAME_KERNELS
    NAME_KERNELS = not args.no_kernel_names
    began = time.monotonic()
    shapes = TINY if args.tiny else FULL
    suite = (TINY_SUITE if args.tiny else SUITE) if args.suite else None
    if suite is not None:
        if args.seq or args.only or args.longest:
            parser.error("--suite chooses the lengths, the modes and the longest-context setups itself")
        shapes = Shapes(**{**asdict(shapes), "seqs": suite.seqs, "long_steps": suite.long_steps})
        args.only, args.longest, args.longest_range, args.resume = list(suite.modes), list(suite.longest), suite.longest_range, True
    if args.seq:
        shapes = Shapes(**{**asdict(shapes), "seqs": tuple(args.seq)})
    if args.steps:
        shapes = Shapes(**{**asdict(shapes), "warmup": args.steps[0], "steps": args.steps[1]})
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qcc-bench-"))

    if args.transformers_own_check:  # child process, library hooks off
        print(json.dumps(transformers_own_check(TINY, work)))
        return 0
    device = torch.device(shapes.device if shapes.device == "cpu" or torch.cuda.is_available() else "cpu")
    if args.transformers_own_measure:  # child process, library hooks off
        print(json.dumps([asdict(transformers_own_measure(shapes, seq, work, device)) for seq in shapes.seqs]))
        return 0
    if device.type != shapes.device:
        print(f"no {shapes.device} device here; use --tiny for a CPU run", file=sys.stderr)
        return 2

    import peft  # noqa: F401 - imported before gc.freeze(), like transformers below
    import transformers  # noqa: F401

    torch.manual_seed(0)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    call = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": _git_commit(),
    }
    report = {
        "meta": {
            **call,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
            "versions": versions(),
            "shapes": asdict(shapes),
            "tiny": args.tiny,
            "suite": suite is not None,
        },
        "results": [],
    }
    out_file = args.out / "bench.json"
    earlier = resumed(out_file, report["meta"]) if args.resume else None
    kept_rows: dict = {}
    kept_longest: dict = {}
    if earlier is not None:
        report["meta"] = earlier["meta"]
        kept_rows = {(r["mode"], r["seq"]): r for r in earlier["results"] if r["status"] in KEPT}
        kept_longest = {f["setup"]: f for f in earlier.get("longest", []) if f["status"] in KEPT and f.get("complete")}
    calls = report["meta"].setdefault("calls", [])
    calls.append(call)
    selected = [m for m in modes(shapes.budget) if not args.only or m.name in args.only]
    planned = [(mode, seq) for seq in sorted(shapes.seqs, reverse=True) for mode in selected]
    own_kept = [row for row in kept_rows.values() if row["mode"] == "transformers_own"]
    wanted = (not args.only or "transformers_own" in args.only) and not (args.longest and suite is None) and not own_kept
    check = _child(["--transformers-own-check", "--out", str(work)]) if wanted else None  # on the CPU beside the GPU modes
    gc.freeze()  # what is alive now stays: each mode's collection then only walks that mode's objects

    def save() -> None:
        call["wall_s"] = round(time.monotonic() - began, 1)
        report["meta"]["wall_s"] = round(sum(c.get("wall_s") or 0.0 for c in calls), 1)
        out_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    if not args.longest or suite is not None:
        code = write_remote_code(shapes, work / "code")
        for mode, seq in planned:  # the longest first: it matters most if time runs out
            if (mode.name, seq) in kept_rows:
                report["results"].append(kept_rows[(mode.name, seq)])
                continue
            if time.monotonic() - began > args.deadline:
                result = Result(mode.name, seq, mode.description, status="skipped", reason=f"time limit ({args.deadline:.0f} s)")
            else:
                result = run_mode(mode, seq, shapes, code, device)
                result.call = len(calls)
            report["results"].append(asdict(result))
            print(f"{seq:>6} {mode.name:<28} {result.status:<8} peak={result.peak_bytes} step={result.step_s}", flush=True)
            save()

    if args.longest:
        start, step, limit = args.longest_range
        longest_shapes = Shapes(**{**asdict(shapes), "seqs": (limit,)})  # the models' position limits cover the search
        code = write_remote_code(longest_shapes, work / "code-longest")
        report["longest"] = []
        peer: Optional[int] = args.longest_timed_at
        for index, name in enumerate(args.longest):
            if name in kept_longest:
                found = kept_longest[name]
            elif time.monotonic() - began > args.deadline:
                found = {"setup": name, "options": LONGEST[name][1], "probes": [], "longest": None, "status": "skipped",
                         "range": [start, step, limit], "complete": False}
            else:
                # In the suite the first setup is the peer: it is timed at its own longest length, the others there
                # too (each at its own where the peer has none: native Qwen2 not runnable, or nothing trained).
                found = longest_context(name, longest_shapes, code, device, start, step, limit, began + args.deadline,
                                        timed_at=peer, time_longest=suite is not None and (index == 0 or peer is None))
                found["call"] = len(calls)
            if suite is not None and index == 0:
                peer = found["longest"]
            report["longest"].append(found)
            print(f"longest {name:<14} {found['longest']} ({len(found['probes'])} probes, {found['status']})", flush=True)
            save()

    report["results"] += own_kept  # last, where a new call puts them
    if check is not None:
        verdict = _child_json(check, timeout=max(30.0, args.deadline - (time.monotonic() - began)))
        report["meta"]["transformers_own"] = verdict
        if verdict["runnable"] and time.monotonic() - began < args.deadline:
            measured = _child_json(_child(["--transformers-own-measure", "--out", str(work), *(["--tiny"] if args.tiny else []),
                                           "--seq", *map(str, shapes.seqs)]), timeout=args.deadline)
            rows = measured if isinstance(measured, list) else []
            report["results"] += rows or [asdict(Result("transformers_own", s, "transformers' own path", "error", str(measured))) for s in shapes.seqs]
        else:
            status = "not runnable" if not verdict["runnable"] else "skipped"
            reason = verdict["reason"] or f"time limit ({args.deadline:.0f} s)"
            report["results"] += [asdict(Result("transformers_own", s, "transformers' own path, no library", status, reason)) for s in shapes.seqs]
    left = [f"{r['mode']}@{r['seq']}" for r in report["results"] if r["status"] not in KEPT]
    left += [f"longest {f['setup']}" for f in report.get("longest", []) if not (f["status"] in KEPT and f.get("complete"))]
    report["meta"]["complete"] = not left
    save()
    print(f"wrote {out_file} in {time.monotonic() - began:.0f} s: "
          + ("complete" if not left else f"incomplete ({len(left)} left: {', '.join(left)}); run the same command again"
             if args.resume else f"{len(left)} not measured: {', '.join(left)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
