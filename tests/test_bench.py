"""The benchmark runs end to end on the CPU with tiny shapes and its report renders: it cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import os
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
