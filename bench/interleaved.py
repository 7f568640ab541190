#!/usr/bin/env python
"""Step times of a few setups measured in turns (A, B, C, A, B, C...) in one process: ratios without drift.

    python bench/interleaved.py --seq 2048 8192 --out $OUT      # one H200: about 2 minutes

bench/run.py measures one mode after another, each on a fresh model; at 2,048 tokens a step is short enough that
the order of the modes moved their times by more than the differences sought (up to 15 % between runs). Here
every setup keeps its model, and the timed steps alternate between setups, so that whatever drifts affects all
alike. Setups: ``default`` (``prepare_for_lora(model)``), ``selective`` (``selective=True``, decided per shape),
``native_qwen2`` (transformers' own checkpointing). Same models, LoRA and batches as bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
import torch  # noqa: E402

SETUPS = {"default": {}, "selective": {"selective": True}, "native_qwen2": None}


def build(name: str, shapes: bench.Shapes, code: Path, device: torch.device) -> tuple:
    from qwen_ckpt_compat import prepare_for_lora

    options = SETUPS[name]
    if options is None:
        model = bench.build_native(shapes, device)
        bench.enable_transformers_checkpointing(model, {"use_reentrant": False})
        model = bench.add_lora(model, bench.NATIVE_TARGETS, shapes.lora_r)
    else:
        model = bench.build_qwen(shapes, code, device)
        prepare_for_lora(model, **options)
        model = bench.add_lora(model, bench.QWEN_TARGETS, shapes.lora_r)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shapes = bench.Shapes(**{**asdict(bench.FULL), "seqs": tuple(args.seq)})
    device = torch.device("cuda")
    code = bench.write_remote_code(shapes, Path(tempfile.mkdtemp(prefix="qcc-interleaved-")) / "code")
    models = {name: build(name, shapes, code, device) for name in args.setups}
    report: dict = {
        "meta": {
            "versions": bench.versions(),
            "device": torch.cuda.get_device_name(device),
            "setups": {name: SETUPS[name] for name in args.setups},
            "rounds": args.rounds,
        },
        "results": [],
    }
    for seq in args.seq:
        batch = bench.make_batch(shapes, seq, device)
        times: dict = {name: [] for name in args.setups}
        for index in range(args.warmup + args.rounds):
            for name, (model, optimizer) in models.items():
                elapsed = bench._one_step(model, batch, optimizer, device)
                if index >= args.warmup:
                    times[name].append(round(elapsed, 5))
        medians = {name: statistics.median(values) for name, values in times.items()}
        row = {"seq": seq, "step_times_s": times, "median_s": medians}
        if "default" in medians:
            row["ratio_to_default"] = {
                name: round(value / medians["default"], 4) for name, value in medians.items()
            }
        report["results"].append(row)
        print(
            seq,
            {name: round(value, 4) for name, value in medians.items()},
            row.get("ratio_to_default"),
            flush=True,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "interleaved.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
