"""The benchmark runs end to end on the CPU with tiny shapes and its report renders: it cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

ROOT = Path(__file__).resolve().parents[1]
QWEN_MODES = [
    f"{name}{suffix}"
    for name in ("no_checkpointing", "reentrant", "non_reentrant", "every_2nd", "offload", "budget", "selective")
    for suffix in ("", "+fused")
] + ["default", "default+chunked", "default+chunked+offload"]
# The same setups with an earlier implementation in place, for A/B in one run (bench/run.py's VARIANTS).
QWEN_MODES += ["default+padding_mask", "default+chunked+own_loss", "default+chunked+offload+save_on_cpu"]

pytestmark = pytest.mark.release_independent


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    return process


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    _run("bench/run.py", "--tiny", "--seq", "32", "--out", str(out))
    return out / "bench.json"


def test_every_mode_runs(tiny_report):
    report = json.loads(tiny_report.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == {*QWEN_MODES, "native_qwen2", "transformers_own"}
    shapes = report["meta"]["shapes"]
    for name in [*QWEN_MODES, "native_qwen2"]:
        row = rows[name]
        assert row["status"] in ("ok", "not runnable"), (name, row["reason"])
        if row["status"] != "ok":
            if name.startswith("selective") and not hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts"):
                assert "torch >= 2.5" in row["reason"]  # this torch cannot run selective recompute: the row says so
            else:
                assert name == "native_qwen2" and "Qwen2ForCausalLM" in row["reason"]
            continue
        assert len(row["step_times_s"]) == shapes["steps"] and row["step_s"] > 0
        assert len(row["losses"]) == shapes["warmup"] + shapes["steps"]
        assert all(math.isfinite(loss) and loss > 0 for loss in row["losses"])
    from qwen_ckpt_compat.speed.selective import attention_ops

    if any("for_cpu" in str(op) for op in attention_ops()):  # torch 2.0's CPU SDPA has no fused kernel to see
        for name in QWEN_MODES:
            assert rows[name]["status"] != "ok" or rows[name]["attention_kernels"], f"{name}: attention runs through SDPA"
    for name in QWEN_MODES:
        chunked = "chunked" in name
        assert (rows[name]["loss_kernel"] is not None) is chunked, name
        assert not chunked or rows[name]["loss_kernel"] == "qwen-ckpt-compat", "the CPU runs the library's own"
    for name in ("budget", "budget+fused"):
        assert rows[name]["plan"]["status"] == "unmeasurable", "no memory statistics on the CPU"
        assert rows[name]["plan"]["decisions"] == ["checkpoint"] * shapes["layers"]
    verdict = report["meta"]["transformers_own"]
    own = rows["transformers_own"]
    if verdict["runnable"]:
        assert own["status"] == "ok" and own["step_s"] > 0
    else:
        assert own["status"] == "not runnable" and own["reason"] == verdict["reason"] and verdict["reason"]


def test_report_renders(tiny_report, tmp_path):
    _run("bench/report.py", str(tiny_report), "--docs", str(tmp_path))
    page = (tmp_path / "performance.md").read_text()
    assert "a pipeline check, not a measurement" in page
    for name in [*QWEN_MODES, "native_qwen2", "transformers_own"]:
        assert f"`{name}`" in page
    assert "memory plan for batch 1 x 32 tokens" in page


def test_report_includes_the_notes_beside_the_json(tiny_report, tmp_path):
    source = tmp_path / "run.json"
    source.write_text(tiny_report.read_text())
    source.with_suffix(".notes.md").write_text("The budget held; selective did not.\n")
    _run("bench/report.py", str(source), "--docs", str(tmp_path / "docs"))
    page = (tmp_path / "docs" / "performance.md").read_text()
    assert "## What the numbers say\n\nThe budget held; selective did not." in page


def test_plot_is_drawn_where_there_are_peaks(tiny_report, tmp_path):
    """A rendering check: the CPU has no peaks, so peaks are filled in (by step time) to exercise the plot."""
    pytest.importorskip("matplotlib")
    report = json.loads(tiny_report.read_text())
    for row in report["results"]:
        if row["status"] == "ok":
            row["peak_bytes"] = int(row["step_s"] * 2**30)
    source = tmp_path / "with-peaks.json"
    source.write_text(json.dumps(report))
    _run("bench/report.py", str(source), "--docs", str(tmp_path))
    assert (tmp_path / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![peak memory against step time" in (tmp_path / "performance.md").read_text()


# ----------------------------------------------------------------------------------------------- the suite

SUITE_MODES = ["non_reentrant", "default", "default+chunked", "default+chunked+offload", "selective+fused", "native_qwen2"]
SUITE_SEQS = [32, 64, 128]


def _bench_json(out: Path) -> dict:
    return json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory) -> Path:
    """The suite cut short before its first row, then resumed to the end."""
    out = tmp_path_factory.mktemp("suite")
    first = _run("bench/run.py", "--tiny", "--suite", "--deadline", "0", "--out", str(out))
    assert "incomplete" in first.stdout and "run the same command again" in first.stdout
    cut = _bench_json(out)
    assert {row["status"] for row in cut["results"]} == {"skipped"} and cut["meta"]["complete"] is False
    second = _run("bench/run.py", "--tiny", "--suite", "--out", str(out))
    assert second.stdout.rstrip().endswith("complete"), second.stdout[-1000:]
    return out


def test_suite_measures_every_row_once_and_the_longest_context(tiny_suite):
    report = _bench_json(tiny_suite)
    assert report["meta"]["complete"] is True and len(report["meta"]["calls"]) == 2
    rows = [(row["mode"], row["seq"]) for row in report["results"]]
    assert sorted(rows) == sorted((mode, seq) for mode in SUITE_MODES for seq in SUITE_SEQS)  # each once, no leftovers
    for row in report["results"]:
        assert row["call"] == 2 and row["status"] in ("ok", "not runnable"), row
        if row["status"] == "ok":  # 128 tokens is the suite's long length: 1 warm-up, 1 timed step, no kernel names
            assert len(row["step_times_s"]) == (1 if row["seq"] == 128 else 2), row
            assert not row["attention_kernels"] or row["seq"] != 128
    searches = {found["setup"]: found for found in report["longest"]}
    assert list(searches) == ["native_qwen2", "leanest", "default"]  # the peer first: the others are timed at its longest
    for found in searches.values():
        if found["setup"] == "native_qwen2" and found["status"] != "ok":
            assert found["status"] == "not runnable" and "Qwen2ForCausalLM" in found["reason"], found
            continue  # a transformers without Qwen2: the others are timed at their own longest length
        assert found["status"] == "ok" and found["complete"] and found["longest"] == 128, found  # the CPU never runs out
        timed = [probe for probe in found["probes"] if probe.get("timed")]
        assert [probe["seq"] for probe in timed] == [128] and len(timed[0]["step_times_s"]) == 2


def test_a_resumed_suite_keeps_what_it_measured(tiny_suite, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_suite, out)  # the module's suite stays as two calls made it
    before = _bench_json(out)
    third = _run("bench/run.py", "--tiny", "--suite", "--out", str(out))
    assert third.stdout.rstrip().endswith("complete")
    after = _bench_json(out)
    assert len(after["meta"]["calls"]) == 3
    assert after["results"] == before["results"] and after["longest"] == before["longest"]  # nothing measured again


def test_resume_refuses_a_file_measured_otherwise(tiny_suite):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run([sys.executable, "bench/run.py", "--tiny", "--resume", "--seq", "16", "--out", str(tiny_suite)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode != 0 and "was measured with other shapes" in process.stderr


def test_suite_report_shows_the_longest_context(tiny_suite, tmp_path):
    _run("bench/report.py", str(tiny_suite / "bench.json"), "--docs", str(tmp_path))
    page = (tmp_path / "performance.md").read_text()
    assert "The reference (`step / reference`, `peak / reference`) is `default`" in page
    assert "Measured in 2 calls of the same command" in page
    assert "## The longest context" in page and "| `leanest` | 128 tokens (the top of the search) |" in page
    assert "Not evaluated: a tiny CPU run says nothing about them." in page


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(mode: str, seq: int, step: float, peak_gib: float) -> dict:
    return {"mode": mode, "seq": seq, "status": "ok", "step_s": step, "peak_bytes": int(peak_gib * 2**30)}


def test_speed_targets_are_judged_from_the_rows():
    """Each target is met or not from the measured ratio, and targets whose rows were not measured are left out."""
    report = _report_module()
    results = [
        _row("default", 8192, 1.40, 23.9), _row("native_qwen2", 8192, 1.34, 30.7), _row("selective+fused", 8192, 1.176, 23.9),
        _row("default", 32768, 7.0, 51.5), _row("default+chunked", 32768, 7.1, 34.3),
        _row("default+chunked+offload", 32768, 7.2, 30.5),
    ]
    longest = [
        {"setup": "native_qwen2", "status": "ok", "longest": 57344, "range": [32768, 8192, 131072],
         "probes": [{"seq": 57344, "ok": True, "step_s": 15.0, "timed": True}]},
        {"setup": "leanest", "status": "ok", "longest": 131072, "range": [32768, 8192, 131072],
         "probes": [{"seq": 57344, "ok": True, "step_s": 16.0, "timed": True}]},
    ]
    rows = {what: (shown, met) for what, shown, met in report.speed_targets({"results": results, "longest": longest})}
    assert rows["the default: step <= native Qwen2's (8192 tokens)"] == ("1.045x", False)
    assert rows["the default: peak <= 0.8x native Qwen2's (8192 tokens)"][1] is True  # 23.9 / 30.7 = 0.78
    assert rows["`selective=True`: step <= 0.85x the default's (8192 tokens)"] == ("0.840x", True)
    assert rows["`selective=True`: step <= the default's at 8192"][1] is True
    assert not any("at 2048" in what or "at 32768" in what for what in rows)  # selective was not measured there
    assert rows["`chunked_loss=True`: peak <= 36 GiB (32768 tokens)"][1] is True
    assert rows["`chunked_loss=True`: step <= 1.02x the default's (32768 tokens)"] == ("1.014x", True)
    assert rows["`chunked_loss=True, offload=True`: peak <= 30 GiB (32768 tokens)"][1] is False
    shown, met = rows["the leanest setup trains >= 2x native Qwen2's longest sequence"]
    assert met is True and "(the top of the search: at least that)" in shown
    assert rows["the leanest setup's step <= 1.05x native's at 57344 tokens"] == ("1.067x", False)
