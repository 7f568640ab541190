"""One rank of a multi-process training run on the CPU (gloo), for tests/test_engines.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/engines_worker.py MODEL_DIR OUT_DIR ENGINE...

For each engine it loads the tiny Qwen v1 model, calls ``prepare_for_lora``, adds LoRA, hands the model to the
engine, checks that every public function accepts what the engine handed back, trains 3 steps on this rank's
half of a fixed global batch and writes ``OUT_DIR/<engine>.rank<r>.json`` with what torch really did.
Engines: ddp, accelerate, fsdp1, fsdp1-bf16, fsdp2, fsdp2-bf16, fsdp2-bf16-engine-ac.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it
from helpers import OpCounts  # tests/ is on PYTHONPATH (test_engines.py sets it)
from torch.utils._pytree import tree_flatten  # tree_leaves is newer than torch 2.0

import qwen_ckpt_compat
from qwen_ckpt_compat import CompatWarning, checkpoint_settings, describe, is_patched, patch, prepare_for_lora
from qwen_ckpt_compat.testing import TARGET_MODULES, load_tiny_qwen

STEPS = 3
ROWS_PER_RANK = 2


def _block_class(model: torch.nn.Module) -> type:
    return type(next(m for m in model.modules() if type(m).__name__ == "QWenBlock"))


def _fsdp2_api() -> tuple:
    """``fully_shard`` and ``MixedPrecisionPolicy``: public in torch.distributed.fsdp from torch 2.6, under
    torch.distributed._composable.fsdp in 2.4-2.5."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


@functools.lru_cache(maxsize=None)
def _unavailable(family: str) -> str | None:
    """Why this torch cannot run ``family`` (fsdp1, fsdp2) on the CPU at all, tried on a plain Linear; else None.

    torch 2.0's FSDP asks for a CUDA device when it wraps, 2.1's for CUDA streams on the first forward: there
    is nothing of the model or the library in that, so those engines are skipped, saying why.
    """
    if family not in ("fsdp1", "fsdp2"):
        return None
    probe = torch.nn.Linear(2, 2)
    try:
        if family == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            probe = FullyShardedDataParallel(probe, device_id=torch.device("cpu"))
        else:
            _fsdp2_api()[0](probe)
        probe(torch.ones(1, 2)).sum().backward()
    except Exception as error:  # noqa: BLE001 - the reason is what the test reports
        return f"torch {torch.__version__}'s {family.upper()} does not run on the CPU: {type(error).__name__}: {error}"
    return None


def _shard_fsdp2(model: torch.nn.Module, mixed_precision: bool, engine_ac: bool) -> torch.nn.Module:
    fully_shard, MixedPrecisionPolicy = _fsdp2_api()

    block = _block_class(model)
    if engine_ac:  # what FSDP's `activation_checkpointing` does: torch's checkpoint_wrapper, before sharding
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: isinstance(module, block),
        )
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    options = {"mp_policy": policy} if policy is not None else {}
    for module in [m for m in model.modules() if isinstance(m, block)]:
        fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def _wrap(engine: str, model: torch.nn.Module) -> torch.nn.Module:
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if engine == "accelerate":
        from accelerate import Accelerator

        return Accelerator(cpu=True).prepare(model)
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if "bf16" in engine else None
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({_block_class(model)}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
            mixed_precision=precision,
        )
    if engine.startswith("fsdp2"):
        return _shard_fsdp2(model, "bf16" in engine, engine.endswith("engine-ac"))
    raise SystemExit(f"unknown engine {engine!r}")


def _record_checkpoint_calls(seen: list) -> None:
    """Wraps torch's checkpoint (looked up at call time by the library) to see what reaches it."""
    original = torch.utils.checkpoint.checkpoint

    def recording(function, *args, **kwargs):
        leaves, _ = tree_flatten((args, getattr(function, "keywords", {})))
        dtypes = {str(x.dtype) for x in leaves if torch.is_tensor(x) and x.is_floating_point()}
        seen.append({"use_reentrant": kwargs.get("use_reentrant"), "input_dtypes": sorted(dtypes)})
        return original(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = recording


def _count_block_runs(model: torch.nn.Module, counts: list) -> None:
    # A recompute inside FSDP2's hooks calls the block's `forward` directly, not `__call__`: count the first
    # child, which every run of the block calls.
    blocks = [m for m in model.modules() if type(m).__name__ == "QWenBlock" or type(m).__name__ == "FSDPQWenBlock"]
    counts.extend([0] * len(blocks))
    for index, block in enumerate(blocks):
        first = next(block.children())
        first.register_forward_pre_hook(lambda module, args, index=index: counts.__setitem__(index, counts[index] + 1))


def run(engine: str, model_dir: str, out_dir: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = load_tiny_qwen(model_dir)
    model.float().train()
    from peft import LoraConfig, get_peft_model

    options = {"selective": True} if engine.endswith("-selective") else {}
    model = prepare_for_lora(model, **options)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGET_MODULES)))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompatWarning)
        wrapped = _wrap(engine, model)
        # Every public function must accept what the engine handed back.
        info = describe(wrapped)
        prepare_for_lora(wrapped, **options)
        patch(wrapped)
        settings = checkpoint_settings(wrapped)
        patched = is_patched(wrapped)

        counts: list = []
        _count_block_runs(wrapped, counts)
        seen: list = []
        _record_checkpoint_calls(seen)
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, 256, (ROWS_PER_RANK * world, 16), generator=generator)
        mine = ids[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        with OpCounts() as ops:
            for _ in range(STEPS):
                loss = wrapped(input_ids=mine, labels=mine).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mean = loss.detach().float().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / world)

    full = _full_lora_state(wrapped, engine)
    changed = sorted(n for n, p in full.items() if n in lora and not torch.equal(p, lora[n]))
    checksum = torch.tensor([sum(p.double().sum().item() for p in full.values())], dtype=torch.float64)
    checksums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    result = {
        "engine": engine,
        "rank": rank,
        "world_size": world,
        "wrapper": type(wrapped).__name__,
        "model_class": info.model_class,
        "is_peft_model": info.is_peft_model,
        "is_remote_code": info.is_remote_code,
        "num_decoder_blocks": info.num_decoder_blocks,
        "is_patched": patched,
        "settings_use_reentrant": None if settings is None else settings.use_reentrant,
        "settings_selective": None if settings is None else settings.selective,
        "attention_calls": ops.attention(),
        "losses": losses,
        "block_runs": counts,
        "checkpoint_calls": seen,
        "lora_tensors": len(lora),
        "lora_changed": len(changed),
        "lora_checksums": [c.item() for c in checksums],
        "compat_warnings": [str(w.message) for w in caught if issubclass(w.category, CompatWarning)],
    }
    (out_dir / f"{engine}.rank{rank}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    torch.utils.checkpoint.checkpoint = _ORIGINAL_CHECKPOINT


def _full_lora_state(wrapped: torch.nn.Module, engine: str) -> dict:
    """The LoRA tensors, whole on every rank (FSDP shards them)."""
    if engine.startswith("fsdp2"):
        return {_clean(n): p.full_tensor().detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            return {_clean(n): p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    return {_clean(n): p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}


def _clean(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")  # DDP's


_ORIGINAL_CHECKPOINT = torch.utils.checkpoint.checkpoint


def main() -> None:
    model_dir, out_dir, *engines = sys.argv[1:]
    dist.init_process_group("gloo")
    try:
        for engine in engines:
            unavailable = _unavailable(engine.split("-")[0])
            if unavailable is not None:
                skipped = {"engine": engine, "rank": dist.get_rank(), "unavailable": unavailable}
                (Path(out_dir) / f"{engine}.rank{dist.get_rank()}.json").write_text(json.dumps(skipped, indent=1))
                dist.barrier()
                continue
            try:
                run(engine, model_dir, Path(out_dir))
            except Exception as error:  # recorded, so that one engine's failure does not hide the others'
                torch.utils.checkpoint.checkpoint = _ORIGINAL_CHECKPOINT
                failure = {"engine": engine, "rank": dist.get_rank(), "error": f"{type(error).__name__}: {error}",
                           "traceback": traceback.format_exc()}
                (Path(out_dir) / f"{engine}.rank{dist.get_rank()}.json").write_text(json.dumps(failure, indent=1))
            dist.barrier()
        print(f"rank {dist.get_rank()}: {', '.join(engines)} done (qwen-ckpt-compat {qwen_ckpt_compat.__version__})")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is on disk. Leave without the interpreter's teardown: with torch 2.15 on Python 3.13 a C++ thread
    # that gloo leaves behind sometimes aborts the process at exit ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
