"""Runs the engine matrix on the GPU machine and writes a results table (docs/distributed.md takes it).

    python scripts/gpu_engines/run.py --part one-gpu --out OUT    # DDP, FSDP, ZeRO-2/3 (8 layers), QLoRA (32 layers)
    python scripts/gpu_engines/run.py --part two-gpu --out OUT    # the same engines with 2 processes, and references
    python scripts/gpu_engines/run.py --part fsdp1 --out OUT      # FSDP1 on a 4.x transformers (on PYTHONPATH)
    python scripts/gpu_engines/run.py --part smoke --out OUT      # CPU, tiny model: checks the pipeline itself

OUT receives two files per part (engines-<part>.md, the table; engines-<part>.json, every result); models,
run folders and logs go under --work (default /tmp/qcc-engines).

The model is Qwen-7B-shaped (hidden 4096, 32 heads, intermediate 22016, vocab 151936) with random bf16 weights,
written once by this script from the library's own tiny-model code (nothing is downloaded): 8 layers for the
engine runs, 32 (full depth) for the QLoRA memory comparison. Runs of one GPU are spread over the GPUs there
are. Each run is ``train.py`` under ``torch.distributed.run``; the table says for each what was checked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QWEN_7B = dict(hidden_size=4096, num_attention_heads=32, intermediate_size=22016, vocab_size=151936, seq_length=8192)
BF16_LOSS_RTOL = 2e-2  # bf16 runs that differ in sharding/reduction order: per-step losses agree to this


@dataclass
class Job:
    name: str
    engine: str
    layers: int
    world: int = 1
    order: str = "prepare-first"
    extra: list = field(default_factory=list)
    reference: str | None = None  # the run whose losses this one must match
    use_reentrant: str = "False"  # what must reach torch

    def model_dir(self, work: Path) -> Path:
        return work / "models" / f"qwen7b-{self.layers}l"


def jobs(part: str) -> list[Job]:
    if part in ("one-gpu", "smoke"):
        layers = 2 if part == "smoke" else 8
        engine_jobs = [
            Job("ddp", "ddp", layers),
            Job("fsdp", "fsdp", layers, reference="ddp"),
            Job("fsdp-engine-ac", "fsdp-engine-ac", layers, order="prepare-first", reference="ddp"),
            Job("fsdp-both", "fsdp-both", layers, reference="ddp"),
        ]
        if part == "smoke":
            return engine_jobs
        return engine_jobs + [
            Job("fsdp1-on-5x", "fsdp", layers, extra=["--fsdp-version", "1"], reference="ddp"),
            Job("zero2", "zero2", layers, reference="ddp"),
            Job("zero3", "zero3", layers, reference="ddp"),
            Job("lora-bf16-32l", "lora", 32, extra=["--global-batch", "1"]),
            Job("qlora4-prepare-first", "qlora4", 32, extra=["--global-batch", "1"]),
            Job("qlora4-prepare-after", "qlora4", 32, order="prepare-after", extra=["--global-batch", "1"]),
            Job("qlora4-import-only", "qlora4", 32, order="import-only", extra=["--global-batch", "1"]),
            Job("qlora8-prepare-first", "qlora8", 32, extra=["--global-batch", "1"]),
            # the same without the library's calls: tells bitsandbytes' own int8 cost from the library's
            Job("qlora8-import-only", "qlora8", 32, order="import-only", extra=["--global-batch", "1"]),
            # no use_reentrant asked anywhere: the library checkpoints 8-bit models reentrantly
            Job("qlora8-no-kwargs", "qlora8", 32, extra=["--global-batch", "1", "--no-kwargs"], use_reentrant="True"),
        ]
    if part == "two-gpu":
        return [
            Job("1proc-ddp", "ddp", 8),
            Job("2proc-ddp", "ddp", 8, world=2, reference="1proc-ddp"),
            Job("2proc-fsdp2", "fsdp", 8, world=2, reference="1proc-ddp"),
            Job("2proc-zero3", "zero3", 8, world=2, reference="1proc-ddp"),
        ]
    if part == "fsdp1":
        return [
            Job("4x-1proc-ddp", "ddp", 8),
            Job("4x-1proc-fsdp1", "fsdp", 8, reference="4x-1proc-ddp"),
            Job("4x-2proc-fsdp1", "fsdp", 8, world=2, reference="4x-1proc-ddp"),
        ]
    raise SystemExit(f"unknown part {part!r}")


def make_model(directory: Path, layers: int, cpu: bool) -> None:
    """Writes the model: the tiny model's files, reshaped to Qwen-7B and given random weights made on the GPU."""
    if any(directory.glob("*.safetensors")):
        return
    sys.path.insert(0, str(ROOT))
    from qwen_ckpt_compat.testing import write_tiny_qwen

    path = write_tiny_qwen(directory, num_hidden_layers=layers)
    if cpu:
        return  # the smoke test trains the tiny model itself
    config = json.loads((path / "config.json").read_text())
    config.update(QWEN_7B, kv_channels=QWEN_7B["hidden_size"] // QWEN_7B["num_attention_heads"])
    config.update(max_position_embeddings=QWEN_7B["seq_length"], bf16=True, fp32=False, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "model.safetensors").unlink()
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import qwen_ckpt_compat
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained({str(path)!r}, trust_remote_code=True)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)  # bf16: the config's `bf16` flag
model.save_pretrained({str(path)!r}, safe_serialization=True)
print("wrote", {str(path)!r}, round(sum(p.numel() for p in model.parameters()) / 1e9, 2), "B parameters")
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def launch(job: Job, gpus: list[int], args: argparse.Namespace) -> dict:
    run_dir = args.work / "runs" / job.name
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="4", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(args.gpu_ids[i] for i in gpus)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(job.world),
        str(HERE / "train.py"), "--model", str(job.model_dir(args.work)), "--engine", job.engine, "--order", job.order,
        "--out", str(run_dir), *job.extra, *(["--cpu"] if args.cpu else []),
    ]
    started = time.monotonic()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() and code == 0 else {}
    if not result:
        lines = (run_dir / "log.txt").read_text(errors="replace").splitlines()
        # The child's own error comes before torchrun's summary: keep the lines that name errors, and the end.
        errors = [line for line in lines if "Error" in line or "error:" in line][:30]
        result = {"error": f"exit status {code}", "log_errors": errors, "log_tail": lines[-60:]}
        print("\n".join([f"--- {job.name} failed; error lines:", *errors[-20:]]), flush=True)
    result.update(name=job.name, wall_s=round(time.monotonic() - started, 1), gpus=gpus)
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {'FAILED ' + result['error'] if 'error' in result else 'ok'} "
          f"({result['wall_s']} s)", flush=True)
    return result


_WRITING = threading.Lock()


def schedule(todo: list[Job], out: Path, args: argparse.Namespace) -> dict:
    """One-GPU jobs on every GPU at once (a worker per GPU); two-GPU jobs afterwards, one at a time."""
    results: dict = {}
    gpus = list(range(args.gpus))
    singles: queue.Queue = queue.Queue()
    for job in [j for j in todo if j.world == 1]:
        singles.put(job)

    def worker(gpu: int) -> None:
        while True:
            try:
                job = singles.get_nowait()
            except queue.Empty:
                return
            results[job.name] = launch(job, [gpu], args)
            write(out, args, todo, results)  # so that a run cut short still brings back what it did

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus if not args.cpu else [0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in [j for j in todo if j.world > 1]:
        results[job.name] = launch(job, gpus[: job.world], args)
        write(out, args, todo, results)
    return results


def write(out: Path, args: argparse.Namespace, todo: list[Job], results: dict) -> str:
    """Writes engines-<part>.json (every result) and engines-<part>.md (the table); returns the table."""
    with _WRITING:
        return _write(out, args, todo, dict(results))


def _write(out: Path, args: argparse.Namespace, todo: list[Job], results: dict) -> str:
    text = table(todo, results)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = {"part": args.part, "date": stamp, "gpus": args.gpus, "results": results}
    (out / f"engines-{args.part}.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / f"engines-{args.part}.md").write_text(f"{text}\n\n{args.part}, {stamp}\n", encoding="utf-8")
    return text


def verdict(job: Job, result: dict, results: dict) -> list[str]:
    """The checks this run fails (empty: it passed all)."""
    if "error" in result:
        return [result["error"]]
    failed = []
    steps, ranks = result["steps"], result["ranks"]
    losses = result["losses"]
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        failed.append(f"losses {losses}")
    for rank in ranks:
        if rank["block_runs"] != [2 * steps] * len(rank["block_runs"]):
            failed.append(f"rank {rank['rank']} block runs {rank['block_runs']} (want {2 * steps} each)")
        if rank["lora_changed"] != rank["lora_tensors"]:
            failed.append(f"rank {rank['rank']}: {rank['lora_changed']}/{rank['lora_tensors']} LoRA tensors changed")
        if job.engine in ("fsdp-engine-ac", "fsdp-both"):
            # torch's checkpoint_wrapper binds torch's checkpoint when it is built: the recorder only sees the
            # library's calls, and there must be none (the engine checkpoints every block).
            if rank["checkpoint_calls"]:
                failed.append(f"rank {rank['rank']}: the library checkpointed {rank['checkpoint_calls']} times too")
        elif rank["use_reentrant_seen"] != [job.use_reentrant]:
            failed.append(f"rank {rank['rank']}: use_reentrant reaching torch {rank['use_reentrant_seen']}")
        if "error" in rank["api"] or rank["api"].get("model_class") != "QWenLMHeadModel":
            failed.append(f"rank {rank['rank']}: public API on {rank['api'].get('wrapper')}: {rank['api']}")
    if len({rank["lora_checksum"] for rank in ranks}) != 1:
        failed.append("ranks' LoRA weights differ")
    reference = results.get(job.reference or "")
    if job.reference and (not reference or "error" in reference):
        failed.append(f"reference run {job.reference} missing")
    elif reference:
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"]))
        result["loss_rel_diff_vs_reference"] = worst
        if worst > BF16_LOSS_RTOL:
            failed.append(f"losses differ from {job.reference} by {worst:.2e} (> {BF16_LOSS_RTOL})")
    if job.engine == "fsdp-both" and not any("already checkpointed by the training engine" in w for w in result["compat_warnings"]):
        failed.append("no warning that FSDP's activation checkpointing wins")
    if "reload_error" in result:
        failed.append(f"saving/reloading the adapter: {result['reload_error']}")
    elif job.engine == "zero3":
        if not result.get("adapter_tensors_equal"):
            failed.append("the saved adapter's tensors differ from the trained ones")
        if result.get("logits_rel_diff", 1.0) > 1e-2:
            failed.append(f"reloaded adapter's logits differ: {result.get('logits_rel_diff')}")
    if job.engine in ("qlora4", "qlora8"):
        lora = results.get("lora-bf16-32l", {})
        if "ranks" in lora and ranks[0]["peak_bytes"] >= lora["ranks"][0]["peak_bytes"]:
            failed.append("QLoRA peak not below the bf16 LoRA run")
    return failed


def table(todo: list[Job], results: dict) -> str:
    header = ("| run | engine | procs | order | transformers | losses | vs reference | block runs / step | use_reentrant "
              "reaching torch | LoRA changed, ranks agree | peak GB / rank | step s | wrapper handed back | result |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for job in todo:
        r = results.get(job.name, {"error": "not run"})
        failed = verdict(job, r, results)
        if "error" in r:
            lines.append(f"| {job.name} | {job.engine} | {job.world} | {job.order} | | | | | | | | | | **failed**: {r['error']} |")
            continue
        ranks = r["ranks"]
        runs = sorted({run // max(r["steps"], 1) for rank in ranks for run in rank["block_runs"]})
        vs = f"{r['loss_rel_diff_vs_reference']:.1e} vs {job.reference}" if "loss_rel_diff_vs_reference" in r else "—"
        peaks = "/".join(f"{rank['peak_bytes'] / 1e9:.2f}" for rank in ranks)
        agree = "yes" if len({rank["lora_checksum"] for rank in ranks}) == 1 else "**no**"
        changed = f"{ranks[0]['lora_changed']}/{ranks[0]['lora_tensors']}, {agree}"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        outcome = "pass" if not failed else "**fail**: " + "; ".join(failed)
        lines.append(
            f"| {job.name} | {job.engine} | {job.world} | {job.order} | {r['transformers']} | {losses} | {vs} | "
            f"{runs} | {', '.join(ranks[0]['use_reentrant_seen']) or 'none'} | {changed} | {peaks} | "
            f"{r['median_step_s']:.3f} | {ranks[0]['api'].get('wrapper')} | {outcome} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True, choices=["one-gpu", "two-gpu", "fsdp1", "smoke"])
    parser.add_argument("--out", required=True, help="where the table and the JSON go (two files)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qcc-engines"), help="models, run folders, logs")
    parser.add_argument("--only", nargs="*", help="run only these job names")
    args = parser.parse_args()
    args.cpu = args.part == "smoke"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    args.gpus = 0 if args.cpu else torch.cuda.device_count()
    # The physical ids behind this process's device indices (CUDA_VISIBLE_DEVICES may already narrow them).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    args.gpu_ids = [i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(args.gpus)]
    todo = [j for j in jobs(args.part) if not args.only or j.name in args.only]
    started = time.monotonic()
    for layers in sorted({j.layers for j in todo}):
        make_model(args.work / "models" / f"qwen7b-{layers}l", layers, args.cpu)
    print(f"models ready in {time.monotonic() - started:.0f} s", flush=True)
    results = schedule(todo, out, args)
    print(write(out, args, todo, results))
    print(f"\n{args.part}: {len(todo)} runs in {time.monotonic() - started:.0f} s on {args.gpus} GPU(s)")


if __name__ == "__main__":
    main()
