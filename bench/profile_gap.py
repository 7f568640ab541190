#!/usr/bin/env python
"""Where a step of the library's default differs from native Qwen2's: GPU time per operator, one profiled step each.

    python bench/profile_gap.py --seq 8192 --out $OUT      # one H200: about a minute; writes $OUT/profile-8192.json

Same models, LoRA and batch as bench/run.py (``default`` and ``native_qwen2``); after 2 warm-up steps one step runs
under ``torch.profiler`` and the self CUDA time of each operator is summed. The JSON lists, per setup, the step's
total and the operators by time; the printed table shows the largest differences between the two setups.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
import torch  # noqa: E402


def profile(setup: str, shapes: bench.Shapes, seq: int, code: Path, device: torch.device) -> dict:
    from qwen_ckpt_compat import prepare_for_lora, unpatch

    bench._clean(device)
    if setup == "native_qwen2":
        model = bench.build_native(shapes, device)
        bench.enable_transformers_checkpointing(model, {"use_reentrant": False})
        model = bench.add_lora(model, bench.NATIVE_TARGETS, shapes.lora_r)
    else:
        model = bench.build_qwen(shapes, code, device)
        prepare_for_lora(model)
        model = bench.add_lora(model, bench.QWEN_TARGETS, shapes.lora_r)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = bench.make_batch(shapes, seq, device)
    for _ in range(2):
        bench._one_step(model, batch, optimizer, device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step_s = bench._one_step(model, batch, optimizer, device)
    totals: dict = {}
    for event in prof.key_averages():
        cuda_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if cuda_us:
            totals[event.key] = totals.get(event.key, 0.0) + cuda_us / 1e6
    if setup != "native_qwen2":
        unpatch(model)
    model = None
    bench._clean(device)
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return {
        "setup": setup,
        "seq": seq,
        "step_s": round(step_s, 4),
        "gpu_s": round(sum(totals.values()), 4),
        "operators": [{"name": name, "s": round(s, 5)} for name, s in ranked],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shapes = bench.Shapes(**{**asdict(bench.FULL), "seqs": (args.seq,)})
    device = torch.device("cuda")
    import tempfile

    code = bench.write_remote_code(shapes, Path(tempfile.mkdtemp(prefix="qcc-profile-")) / "code")
    found = [profile(setup, shapes, args.seq, code, device) for setup in ("default", "native_qwen2")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile-{args.seq}.json").write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")
    ours, theirs = ({op["name"]: op["s"] for op in f["operators"]} for f in found)
    print(
        f"step: default {found[0]['step_s']} s (GPU {found[0]['gpu_s']} s), native {found[1]['step_s']} s "
        f"(GPU {found[1]['gpu_s']} s)"
    )
    names = sorted(set(ours) | set(theirs), key=lambda n: -abs(ours.get(n, 0) - theirs.get(n, 0)))
    for name in names[:25]:
        print(
            f"{ours.get(name, 0):8.4f} {theirs.get(name, 0):8.4f} {ours.get(name, 0) - theirs.get(name, 0):+8.4f}  {name[:90]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
