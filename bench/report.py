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
REFERENCE = "non_reentrant"  # full checkpointing without the fused kernel: the reference before the kernel was default
DEFAULT = "default"  # prepare_for_lora(model): the reference where the run measured it
NATIVE = "native_qwen2"
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

    if not any(mode in {row["mode"] for row in results} for mode in ("budget", "selective", f"{REFERENCE}+fused")):
        return []  # a run of other modes (the suite): these targets were not measured

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


#: The speed targets (docs/speed.md): (what, sequence length, mode, key, against, limit). ``against`` is a mode
#: (the ratio of the two rows at that length) or None (the value itself, bytes); ``limit`` is an upper bound.
SPEED_TARGETS = (
    ("the default: step <= native Qwen2's", 8192, DEFAULT, "step_s", NATIVE, 1.0),
    ("the default: peak <= 0.8x native Qwen2's", 8192, DEFAULT, "peak_bytes", NATIVE, 0.8),
    *((f"`selective=True`: step <= the default's at {seq}", seq, "selective+fused", "step_s", DEFAULT, 1.0)
      for seq in (2048, 8192, 32768)),
    ("`selective=True`: step <= 0.85x the default's", 8192, "selective+fused", "step_s", DEFAULT, 0.85),
    ("`chunked_loss=True`: peak <= 36 GiB", 32768, "default+chunked", "peak_bytes", None, 36 * GIB),
    ("`chunked_loss=True`: step <= 1.02x the default's", 32768, "default+chunked", "step_s", DEFAULT, 1.02),
    ("`chunked_loss=True, offload=True`: peak <= 30 GiB", 32768, "default+chunked+offload", "peak_bytes", None, 30 * GIB),
)
#: The longest-context targets: the leanest setup trains >= 2x native Qwen2's longest sequence, and at native's
#: longest its step is <= 1.05x native's.
LONGEST_FACTOR, LONGEST_STEP_LIMIT = 2.0, 1.05


def reference_mode(report: dict) -> str:
    """The mode the tables divide by: the library's default where the run measured it, else full checkpointing."""
    return DEFAULT if any(r["mode"] == DEFAULT for r in report["results"]) else REFERENCE


def speed_targets(report: dict) -> list:
    """(what, measured, met) rows for the speed targets whose rows the run measured (the others are left out)."""
    by = _by(report["results"])

    def get(mode: str, seq: int, key: str) -> Optional[float]:
        row = by.get((mode, seq))
        return row.get(key) if row and row["status"] == "ok" else None

    rows = []
    for what, seq, mode, key, against, limit in SPEED_TARGETS:
        if (mode, seq) not in by or (against is not None and (against, seq) not in by):
            continue
        value = get(mode, seq, key)
        if against is not None:
            value = _ratio(value, get(against, seq, key))
            shown = _x(value) if value is None else f"{value:.3f}x"
        else:
            shown = _gb(value)
        rows.append((f"{what} ({seq} tokens)" if "at " not in what else what, shown if value is not None else "n/a",
                     None if value is None else value <= limit))
    return rows + longest_targets(report)


def _timed_step(found: dict, seq: Optional[int]) -> Optional[float]:
    """The setup's step at ``seq`` tokens: its timed probe there (the fastest of its steps), else any probe there."""
    probes = [p for p in found.get("probes", []) if p["seq"] == seq and p["ok"]]
    timed = [p for p in probes if p.get("timed")] or probes[-1:]
    return timed[-1]["step_s"] if timed else None


def longest_targets(report: dict) -> list:
    found = {f["setup"]: f for f in report.get("longest", [])}
    native, leanest = found.get(NATIVE), found.get("leanest")
    if native is None or leanest is None:
        return []
    rows = []
    factor = _ratio(leanest.get("longest"), native.get("longest"))
    top = leanest.get("range") and leanest.get("longest") == leanest["range"][2]
    shown = "n/a" if factor is None else f"{leanest['longest']} / {native['longest']} tokens = {factor:.2f}x" + (
        " (the top of the search: at least that)" if top else "")
    rows.append((f"the leanest setup trains >= {LONGEST_FACTOR:g}x native Qwen2's longest sequence", shown,
                 None if factor is None else factor >= LONGEST_FACTOR))
    both = native.get("longest")
    step = _ratio(_timed_step(leanest, both), _timed_step(native, both))
    rows.append((f"the leanest setup's step <= {LONGEST_STEP_LIMIT:g}x native's at {both} tokens",
                 "n/a" if step is None else f"{step:.3f}x", None if step is None else step <= LONGEST_STEP_LIMIT))
    return rows


def longest_table(report: dict) -> list:
    """The longest-context search, one row per setup."""
    searches = report.get("longest") or []
    if not searches:
        return []
    native = next((f for f in searches if f["setup"] == NATIVE), None)
    both = native.get("longest") if native else None
    lines = [
        "## The longest context",
        "",
        "The longest sequence (batch 1) each setup trains on this device: from the first length of the search the "
        "length doubles until a step runs out of memory or passes the top, then the interval is halved down to the "
        "search's step. One model per setup; each probe is one training step.",
        "",
        f"| setup | longest trained | its peak | its step | step at {both} tokens | / native |",
        "|---|---|---|---|---|---|",
    ]
    native_step = _timed_step(native, both) if native else None
    for found in searches:
        if found["status"] != "ok":
            lines.append(f"| `{found['setup']}` | {found['status']}: {found.get('reason') or ''} | | | | |")
            continue
        longest = found.get("longest")
        at_longest = [p for p in found["probes"] if p["seq"] == longest and p["ok"]]
        peak = at_longest[-1]["peak_bytes"] if at_longest else None
        top = found.get("range") and longest == found["range"][2]
        step = _timed_step(found, both)
        lines.append(
            f"| `{found['setup']}` | {longest} tokens{' (the top of the search)' if top else ''}"
            f"{'' if found.get('complete', True) else ' (search cut short)'} | {_gb(peak)} "
            f"| {_s(_timed_step(found, longest))} | {_s(step)} | {_x(_ratio(step, native_step))} |"
        )
    start, step_size, limit = (searches[0].get("range") or [None] * 3)
    if start is not None:
        lines += ["", f"Search: from {start} tokens, in steps of {step_size}, up to {limit}."]
    return lines + [""]


def table(report: dict, seq: int) -> list:
    by = _by(report["results"])
    reference = by.get((reference_mode(report), seq), {})
    native = by.get((NATIVE, seq), {}) if by.get((NATIVE, seq), {}).get("status") == "ok" else {}
    lines = [
        f"### Sequence length {seq}",
        "",
        "| mode | peak memory | step time (median) | step / reference | peak / reference | step / native "
        "| attention kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [r for r in report["results"] if r["seq"] == seq]:
        if row["status"] != "ok":
            lines.append(f"| `{row['mode']}` | {row['status']}: {row.get('reason') or ''} | | | | | |")
            continue
        lines.append(
            f"| `{row['mode']}` | {_gb(row['peak_bytes'])} | {_s(row['step_s'])} "
            f"| {_x(_ratio(row['step_s'], reference.get('step_s')))} "
            f"| {_x(_ratio(row['peak_bytes'], reference.get('peak_bytes')))} "
            f"| {_x(_ratio(row['step_s'], native.get('step_s')))} "
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
            fused = mode.endswith("+fused") or mode.startswith(DEFAULT)  # the default has the fused kernel on
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


def _target_table(rows: list) -> list:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for what, shown, met in rows:
        lines.append(f"| {what} | {shown} | {'n/a' if met is None else 'yes' if met else '**no**'} |")
    return lines + [""]


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
    ]
    calls = meta.get("calls") or []
    if len(calls) > 1:
        commits = sorted({c.get("git_commit") or "an uncommitted tree" for c in calls})
        lines += [
            f"Measured in {len(calls)} calls of the same command, each resuming the last ({', '.join(c['date'] for c in calls)}; "
            f"the `call` of each row in the JSON), at {', '.join(commits)}"
            + ("" if len(commits) == 1 else " (**the code changed between calls**)") + ".",
            "",
        ]
    if meta.get("complete") is False:
        lines += ["**The run is incomplete**: rows not measured say so below.", ""]
    reference = reference_mode(report)
    lines += [
        "## Results",
        "",
        f"The reference (`step / reference`, `peak / reference`) is `{reference}`: "
        + ("`prepare_for_lora(model)`, every block checkpointed, non-reentrant, the fused attention kernel in training. "
           if reference == DEFAULT else "full checkpointing, every block, non-reentrant, without the fused kernel. ")
        + f"`step / native` divides by native Qwen2's step (`{NATIVE}`). GB = 10^9 bytes, GiB = 2^30 bytes.",
        "",
    ]
    for seq in shapes["seqs"]:
        lines += table(report, seq)
    if plotted:
        lines += [f"![peak memory against step time, one point per mode]({PLOT})", ""]
    lines += longest_table(report)
    lines += ["## Targets", ""]
    if meta.get("tiny"):
        lines += ["Not evaluated: a tiny CPU run says nothing about them.", ""]
    else:
        option_rows, speed_rows = targets(report), speed_targets(report)
        if option_rows:
            lines += [f"The options against full checkpointing, at sequence length {max(shapes['seqs'])}.", ""]
            lines += _target_table(option_rows)
        if speed_rows:
            lines += ["The default, selective recompute, the chunked loss and the longest context "
                      "([speed.md](speed.md)); ratios within this run.", ""]
            lines += _target_table(speed_rows)
        if not option_rows and not speed_rows:
            lines += ["This run measured none of the targets' rows.", ""]
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
        + (f"({shapes['long_steps'][1]} warm-up and {shapes['long_steps'][2]} timed from {shapes['long_steps'][0]} tokens on) "
           if shapes.get("long_steps") else "")
        + "(forward, backward, optimizer step, the device synchronised before and after each). Peak = "
        "`torch.cuda.max_memory_allocated()` over the whole mode (weights included), reset after the previous mode "
        "was freed (`gc.collect()`, `torch.cuda.empty_cache()`).",
        "- The attention kernel column names the SDPA kernels seen in one more step after the timed ones"
        + (f" (not from {shapes['long_steps'][0]} tokens on: no extra step there)." if shapes.get("long_steps") else "."),
        "- Native Qwen2 (the peer): `Qwen2ForCausalLM` with the same shapes (32 key/value heads), SDPA attention, "
        "transformers' own non-reentrant checkpointing, LoRA on all its linear layers.",
        "- transformers' own path (no library, a separate process): "
        + ("not measured in this run." if "transformers_own" not in meta
           else "runs." if own.get("runnable") else f"not runnable on this install: {own.get('reason')}."),
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
        "python bench/run.py --suite --out OUT                        # the speed targets; again until it says complete",
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
