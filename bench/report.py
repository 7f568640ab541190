#!/usr/bin/env python
"""docs/performance.md and docs/performance.png from the JSON that bench/run.py wrote.

    python bench/report.py bench/results/h200.json            # writes docs/performance.md and docs/performance.png
    python bench/report.py RESULTS.json --docs /tmp/docs      # somewhere else

Needs only the standard library, and matplotlib for the plot (without it the page is written, the plot is not).
What the numbers mean is written by hand beside the JSON, in RESULTS.notes.md (e.g. bench/results/h200.notes.md);
where that file exists, the page includes it under "What the numbers say".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "non_reentrant"  # "full checkpointing": every block, the library's default mode
PLOT = "performance.png"
GB = 1e9
GIB = 2**30


def _gb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / GB:.2f} GB ({n / GIB:.2f} GiB)"


def _s(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f} s"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _x(r: Optional[float]) -> str:
    return "" if r is None else f"{r:.2f}x"


def _by(results: list) -> dict:
    return {(r["mode"], r["seq"]): r for r in results}


def _parse_budget(text: str) -> Optional[int]:
    sys.path.insert(0, str(ROOT))
    try:
        from qwen_ckpt_compat.speed.budget import parse_memory_budget
    except ImportError:  # torch missing where the report is made: the budget check is left out
        return None
    return parse_memory_budget(text)


def targets(report: dict) -> list:
    """(what, measured, met) rows for the speed options' targets, at the longest sequence measured.

    The targets: ``memory_budget`` peaks within the budget at <= 0.85x the step of full checkpointing;
    ``selective`` <= 0.90x the step at <= 1.15x the peak; the fused kernel <= 0.82x the step without it,
    for full checkpointing, ``memory_budget`` and ``selective`` alike (docs/performance.md, "Targets").
    """
    results, meta = report["results"], report["meta"]
    seq = max(meta["shapes"]["seqs"])
    by = _by(results)

    def get(mode: str, key: str) -> Optional[float]:
        row = by.get((mode, seq))
        return row.get(key) if row and row["status"] == "ok" else None

    full_step, full_peak = get(REFERENCE, "step_s"), get(REFERENCE, "peak_bytes")
    budget = _parse_budget(meta["shapes"]["budget"])
    rows = []

    def add(what: str, value: Optional[float], limit: float, shown: str) -> None:
        rows.append((what, shown if value is not None else "n/a", None if value is None else value <= limit))

    for mode in ("budget", "budget+fused"):
        peak = get(mode, "peak_bytes")
        if budget is not None:
            add(f"`{mode}`: peak <= {meta['shapes']['budget']}", None if peak is None else peak / budget, 1.0, _gb(peak))
    for what, mode, key, reference, limit in (
        ("`budget`: step <= 0.85x full checkpointing", "budget", "step_s", full_step, 0.85),
        ("`selective`: step <= 0.90x full checkpointing", "selective", "step_s", full_step, 0.90),
        ("`selective`: peak <= 1.15x full checkpointing", "selective", "peak_bytes", full_peak, 1.15),
    ):
        ratio = _ratio(get(mode, key), reference)
        add(what, ratio, limit, _x(ratio))
    fused = _ratio(get(f"{REFERENCE}+fused", "step_s"), full_step)
    add("fused kernel: full checkpointing step <= 0.82x without it", fused, 0.82, _x(fused))
    for mode in ("budget", "selective"):
        with_it, without = get(f"{mode}+fused", "step_s"), get(mode, "step_s")
        gain = _ratio(with_it, without)
        saved = "" if gain is None else f" ({without - with_it:.3f} s saved per step)"
        add(f"fused kernel: `{mode}` gains the same (<= 0.82x without it)", gain, 0.82, _x(gain) + saved)
    return rows


def table(report: dict, seq: int) -> list:
    by = _by(report["results"])
    reference = by.get((REFERENCE, seq), {})
    lines = [
        f"### Sequence length {seq}",
        "",
        "| mode | peak memory | step time (median) | step / full ckpt | peak / full ckpt | attention kernel |",
        "|---|---|---|---|---|---|",
    ]
    for row in [r for r in report["results"] if r["seq"] == seq]:
        if row["status"] != "ok":
            lines.append(f"| `{row['mode']}` | {row['status']}: {row.get('reason') or ''} | | | | |")
            continue
        lines.append(
            f"| `{row['mode']}` | {_gb(row['peak_bytes'])} | {_s(row['step_s'])} "
            f"| {_x(_ratio(row['step_s'], reference.get('step_s')))} "
            f"| {_x(_ratio(row['peak_bytes'], reference.get('peak_bytes')))} "
            f"| {', '.join(row.get('attention_kernels') or []) or 'n/a'} |"
        )
    return lines + [""]


def plans(report: dict) -> list:
    lines = []
    for row in report["results"]:
        plan = row.get("plan")
        if not plan:
            continue
        lines += [f"`{row['mode']}` at {row['seq']} tokens: measured peak {_gb(row['peak_bytes'])}", "", "```text", plan["text"], "```", ""]
    return lines or ["No plan was recorded.", ""]


def _label_shifts(points: list, width_pt: float = 430.0, height_pt: float = 330.0) -> list:
    """Vertical label offsets (typographic points) so that no two labels overlap: each label, highest point first,
    takes the nearest free line (the plot's size in points and 4 points per character of 7-point text are
    estimates made before layout)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_scale = width_pt / ((max(xs) - min(xs)) or 1.0)
    y_scale = height_pt / ((max(ys) - min(ys)) or 1.0)
    placed: list = []  # (left, bottom, right, top) in points
    shifts = [0] * len(points)
    for index in sorted(range(len(points)), key=lambda i: -points[i][1]):
        x, y, mode = points[index]
        left, base = (x - min(xs)) * x_scale + 4, (y - min(ys)) * y_scale + 3
        for shift in (0, -9, 9, -18, 18, -27, 27, -36, 36):
            box = (left, base + shift, left + 4 * len(mode), base + shift + 8)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        shifts[index] = shift
    return shifts


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seqs = report["meta"]["shapes"]["seqs"]
    rows = [r for r in report["results"] if r["status"] == "ok" and r.get("peak_bytes") is not None]
    if not rows:
        return False
    figure, axes = plt.subplots(1, len(seqs), figsize=(7 * len(seqs), 6), squeeze=False)
    for axis, seq in zip(axes[0], seqs):
        points = [(r["step_s"], r["peak_bytes"] / GIB, r["mode"]) for r in rows if r["seq"] == seq]
        for (x, y, mode), shift in zip(points, _label_shifts(points)):
            fused = mode.endswith("+fused")
            marker = "s" if mode == "native_qwen2" else ("o" if not fused else "^")
            axis.scatter(x, y, marker=marker, s=45,
                         color="tab:red" if mode == "native_qwen2" else ("tab:blue" if not fused else "tab:green"))
            axis.annotate(mode, (x, y), fontsize=7, xytext=(4, 3 + shift), textcoords="offset points",
                          arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if shift else None)
        for label, marker, color in (("library mode", "o", "tab:blue"), ("with the fused kernel", "^", "tab:green"),
                                     ("native Qwen2 (peer)", "s", "tab:red")):
            axis.scatter([], [], marker=marker, color=color, label=label)
        axis.legend(loc="best", fontsize=8)
        axis.set_title(f"sequence length {seq}")
        axis.set_xlabel("step time (s, median)")
        axis.set_ylabel("peak memory (GiB, max allocated)")
        axis.grid(alpha=0.3)
    meta = report["meta"]
    figure.suptitle(f"Peak memory against step time: Qwen-7B shapes, LoRA r=8, batch 1\n{meta['device']}, "
                    f"torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def render(report: dict, source: str, plotted: bool, notes: str = "") -> str:
    meta = report["meta"]
    versions = meta["versions"]
    shapes = meta["shapes"]
    done = [r for r in report["results"] if r["status"] == "ok"]
    lines = [
        "# Performance",
        "",
        f"<!-- generated by bench/report.py from {source}; edit the script, not this page -->",
        "",
        f"Measured on **{meta['device']}** on {meta['date']} with `{meta['command']}` "
        f"({meta.get('wall_s', '?')} s for {len(done)} runs), torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, peft {versions.get('peft')}, accelerate {versions.get('accelerate')}, Python "
        f"{versions.get('python')}, CUDA {versions.get('cuda')}, this repository at {meta.get('git_commit') or 'an uncommitted tree'}"
        + (" (**tiny CPU shapes: a pipeline check, not a measurement**)" if meta.get("tiny") else "") + ".",
        "",
        "## Results",
        "",
        "Full checkpointing (`step / full ckpt`, `peak / full ckpt`) is the library's default: every block, "
        f"non-reentrant (`{REFERENCE}`). GB = 10^9 bytes, GiB = 2^30 bytes.",
        "",
    ]
    for seq in shapes["seqs"]:
        lines += table(report, seq)
    if plotted:
        lines += [f"![peak memory against step time, one point per mode]({PLOT})", ""]
    lines += ["## Targets", ""]
    if meta.get("tiny"):
        lines += ["Not evaluated: a tiny CPU run says nothing about them.", ""]
    else:
        lines += [f"At sequence length {max(shapes['seqs'])}.", "", "| target | measured | met |", "|---|---|---|"]
        for what, shown, met in targets(report):
            lines.append(f"| {what} | {shown} | {'n/a' if met is None else 'yes' if met else '**no**'} |")
    if notes.strip():
        lines += ["", "## What the numbers say", "", notes.strip()]
    lines += ["", "## The memory plans", "", "What `memory_plan(model)` said after the run (`print(memory_plan(model))`).", ""]
    lines += plans(report)
    own = meta.get("transformers_own") or {}
    lines += [
        "## Method",
        "",
        f"- Model: the shipped Qwen v1 fixture's remote code (`qwen_ckpt_compat/testing/qwen_v1`) at Qwen-7B shapes: "
        f"{shapes['layers']} layers, hidden {shapes['hidden']}, {shapes['heads']} heads, intermediate {shapes['intermediate']} "
        f"(MLP width {shapes['intermediate'] // 2}), vocabulary {shapes['vocab']}; random {shapes['dtype']} weights built "
        "directly on the device with `AutoModelForCausalLM.from_config(..., trust_remote_code=True)` (nothing downloaded "
        "or written but the config).",
        f"- LoRA r={shapes['lora_r']} (alpha {2 * shapes['lora_r']}, no dropout) on `c_attn`, `c_proj`, `w1`, `w2`; batch 1 of "
        "random tokens with an all-ones attention mask (as a collator gives) and labels = inputs; AdamW (lr 1e-4).",
        f"- Each mode gets a fresh model; {shapes['warmup']} warm-up steps, then the median of {shapes['steps']} timed steps "
        "(forward, backward, optimizer step, the device synchronised before and after each). Peak = "
        "`torch.cuda.max_memory_allocated()` over the whole mode (weights included), reset after the previous mode "
        "was freed (`gc.collect()`, `torch.cuda.empty_cache()`).",
        "- The attention kernel column names the SDPA kernels seen in one more step after the timed ones.",
        "- Native Qwen2 (the peer): `Qwen2ForCausalLM` with the same shapes (32 key/value heads), SDPA attention, "
        "transformers' own non-reentrant checkpointing, LoRA on all its linear layers.",
        "- transformers' own path (no library, a separate process): "
        + ("runs." if own.get("runnable") else f"not runnable on this install: {own.get('reason')}."),
        "",
        "## Modes",
        "",
    ]
    seen = set()
    for row in report["results"]:
        if row["mode"] not in seen:
            seen.add(row["mode"])
            lines.append(f"- `{row['mode']}`: {row['description']}")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "python bench/run.py --out OUT                                # one GPU: the JSON (OUT/bench.json)",
        "python bench/report.py OUT/bench.json                        # this page and the plot",
        "python bench/run.py --tiny --out /tmp/bench                  # the same pipeline on the CPU, tiny shapes",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="bench.json written by bench/run.py")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where performance.md and the plot go")
    args = parser.parse_args(argv)
    report: Any = json.loads(args.results.read_text(encoding="utf-8"))
    args.docs.mkdir(parents=True, exist_ok=True)
    plotted = plot(report, args.docs / PLOT)
    if not plotted and (args.docs / PLOT).is_file():
        print(f"kept the existing {args.docs / PLOT} (no matplotlib here or no peaks in the JSON): make sure it is this run's")
        plotted = True
    try:
        source = str(args.results.resolve().relative_to(ROOT))
    except ValueError:
        source = args.results.name
    notes_file = args.results.with_suffix(".notes.md")
    notes = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else ""
    (args.docs / "performance.md").write_text(render(report, source, plotted, notes), encoding="utf-8")
    print(f"wrote {args.docs / 'performance.md'}" + ("" if plotted else " (no plot: no peaks or no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
