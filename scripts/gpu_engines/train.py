"""One LoRA training run of a Qwen v1 remote-code model under one engine, as users run it: ``Trainer``.

Launched by ``run.py`` (``python -m torch.distributed.run --nproc_per_node N train.py ...``); every rank writes
what it saw to ``--out`` (rank 0 adds what all ranks reported). Engines:

  ddp                 plain Trainer (DDP when there are 2 processes)
  fsdp                Trainer(fsdp="full_shard auto_wrap", transformer_layer_cls_to_wrap QWenBlock, use_orig_params)
                      FSDP2 on transformers 5.x, FSDP1 on 4.x (or with --fsdp-version 1)
  fsdp-engine-ac      the same with fsdp_config["activation_checkpointing"]=True instead of the library's
  fsdp-both           the library's checkpointing (prepare_for_lora) AND FSDP's activation_checkpointing
  zero2, zero3        Trainer(deepspeed={... "stage": 2|3, 16-bit gather on save})
  qlora4, qlora8      bitsandbytes 4-bit (nf4, bf16 compute) / 8-bit + peft.prepare_model_for_kbit_training
  lora                bf16 LoRA, the reference for the QLoRA memory

--order: prepare-first (prepare_for_lora before peft / kbit preparation), prepare-after (after kbit
preparation, before get_peft_model) or import-only (the library imported, never called).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

import qwen_ckpt_compat  # noqa: E402  (before from_pretrained: 4.57+ and 5.x need it to load the remote code)
from qwen_ckpt_compat import (  # noqa: E402
    CompatWarning,
    checkpoint_settings,
    describe,
    is_patched,
    patch,
    prepare_for_lora,
)
from qwen_ckpt_compat._detection import is_decoder_block  # noqa: E402

TARGETS = ["c_attn", "c_proj", "w1", "w2"]
NON_REENTRANT = {"use_reentrant": False}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--order", default="prepare-first", choices=["prepare-first", "prepare-after", "import-only"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--fsdp-version", type=int, default=None)
    parser.add_argument("--no-kwargs", action="store_true",
                        help="ask for no use_reentrant anywhere (kbit preparation, Trainer): the library's default")
    parser.add_argument("--cpu", action="store_true", help="smoke test on the CPU (gloo, float32, ddp/fsdp only)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


class Rows(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(3, vocab, (n, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Meter(transformers.TrainerCallback):
    """Per-step loss (as Trainer logs it: the mean over ranks), step time and peak memory."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.losses, self.times, self._start = cuda, [], [], 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@contextlib.contextmanager
def checkpoint_calls():
    """What reaches torch.utils.checkpoint.checkpoint (looked up at call time by the library and the remote code)."""
    seen: list = []
    original = torch.utils.checkpoint.checkpoint

    def recording(function, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant", "absent"))
        return original(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = recording
    try:
        yield seen
    finally:
        torch.utils.checkpoint.checkpoint = original


def count_block_runs(model: torch.nn.Module) -> list:
    # The first child of a block runs once per forward of the block, a recompute included (also when the
    # recompute calls `forward` directly, inside FSDP2's hooks).
    counts: list = []
    for index, block in enumerate(m for m in model.modules() if is_decoder_block(m, ("QWenBlock",))):
        counts.append(0)
        next(block.children()).register_forward_pre_hook(
            lambda module, args, index=index: counts.__setitem__(index, counts[index] + 1)
        )
    return counts


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if args.cpu else torch.bfloat16
    options: dict = {"trust_remote_code": True}
    # 4.56 renamed `torch_dtype` to `dtype` (the old name warns on 5.x).
    options["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    if args.engine in ("qlora4", "qlora8"):
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            if args.engine == "qlora4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        options["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(args.model, **options)


def training_arguments(args: argparse.Namespace, out: Path, world: int):
    parameters = inspect.signature(transformers.TrainingArguments).parameters
    prefix = "activation" if "activation_checkpointing" in parameters else "gradient"
    options = dict(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.global_batch // world,
        learning_rate=1e-4, lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, seed=0,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    options["bf16"] = not args.cpu
    if args.cpu:
        options["use_cpu" if "use_cpu" in parameters else "no_cuda"] = True
    # Trainer enables checkpointing itself (through the library's routing) unless the engine's own does it.
    if args.engine not in ("fsdp-engine-ac", "fsdp-both"):
        options[f"{prefix}_checkpointing"] = True
        if not args.no_kwargs:
            options[f"{prefix}_checkpointing_kwargs"] = dict(NON_REENTRANT)
    if args.engine.startswith("fsdp"):
        config = {"transformer_layer_cls_to_wrap": ["QWenBlock"], "use_orig_params": True}
        if args.fsdp_version is not None:
            config["version"] = args.fsdp_version
        if args.engine in ("fsdp-engine-ac", "fsdp-both"):
            config["activation_checkpointing"] = True
        options["fsdp"] = "full_shard auto_wrap"
        options["fsdp_config"] = config
    if args.engine in ("zero2", "zero3"):
        options["deepspeed"] = {
            "zero_optimization": {"stage": int(args.engine[-1]), "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
        }
    return transformers.TrainingArguments(**options)


def plain_name(name: str) -> str:
    """A parameter's name without what engines insert (torch's checkpoint_wrapper, FSDP1, DDP)."""
    for inserted in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(inserted, "")
    return name[len("module."):] if name.startswith("module.") else name


def full_lora(trainer, model) -> dict:
    """The LoRA tensors, whole, on every rank, whatever the engine sharded."""
    wrapped = trainer.model_wrapped
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    if type(wrapped).__name__ == "DeepSpeedEngine" and hasattr(wrapped, "zero_optimization_stage") and wrapped.zero_optimization_stage() == 3:
        import deepspeed

        params = [p for n, p in model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {plain_name(n): p.detach().float().cpu().clone() for n, p in zip(names, params)}
    if type(wrapped).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            return {plain_name(n): p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            p = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[plain_name(n)] = p.detach().float().cpu().clone()
    return out


def check_public_api(wrapped) -> dict:
    found: dict = {"wrapper": type(wrapped).__name__}
    try:
        info = describe(wrapped)
        settings = checkpoint_settings(wrapped)
        found.update(model_class=info.model_class, is_peft_model=info.is_peft_model, blocks=info.num_decoder_blocks,
                     settings_use_reentrant=None if settings is None else settings.use_reentrant,
                     patched=is_patched(patch(wrapped)))
    except Exception as error:  # recorded: the run's table says which engine's wrapper was refused
        found["error"] = f"{type(error).__name__}: {error}"
    return found


def zero3_reload_check(trainer, model, args, out: Path, trained_lora: dict) -> dict:
    """Saves the adapter (ZeRO-3 gathers 16-bit weights), reloads it on a fresh base: same tensors, same logits?"""
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    ids = Rows(model.config.vocab_size, 64).ids[:1].to(trainer.args.device)
    trainer.model_wrapped.eval()
    with torch.no_grad():
        trained = trainer.model_wrapped(input_ids=ids).logits.float().cpu()
    result: dict = {}
    if dist.get_rank() == 0:
        result["adapter_files"] = sorted(p.name for p in adapter.iterdir())
        from peft import PeftModel

        # A plain model, as a user reloads it: outside ZeRO-3's zero.Init (which from_pretrained would use while
        # the Trainer's DeepSpeed config is alive, leaving the parameters partitioned and empty).
        from transformers.integrations import deepspeed as hf_deepspeed

        getattr(hf_deepspeed, "unset_hf_deepspeed_config", lambda: None)()
        base = load(args).to(trainer.args.device)
        # The adapter as it was trained (bf16), not upcast to float32 as peft does by default.
        reloaded = PeftModel.from_pretrained(base, str(adapter), autocast_adapter_dtype=False).eval()
        again_lora = {plain_name(n): p.detach().float().cpu() for n, p in reloaded.named_parameters() if "lora_" in n}
        result["adapter_tensors_equal"] = sorted(again_lora) == sorted(trained_lora) and all(
            torch.equal(again_lora[n], trained_lora[n]) for n in trained_lora
        )
        with torch.no_grad():
            again = reloaded(input_ids=ids).logits.float().cpu()
        result["logits_max_abs_diff"] = (again - trained).abs().max().item()
        result["logits_rel_diff"] = ((again - trained).norm() / trained.norm()).item()
        del base, reloaded
    return result


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not args.cpu:
        torch.cuda.set_device(local_rank)
    caught = warnings.catch_warnings(record=True)
    caught_list = caught.__enter__()
    warnings.simplefilter("always", CompatWarning)

    model = load(args)
    if not args.cpu and args.engine not in ("qlora4", "qlora8"):
        model.to(f"cuda:{local_rank}")
    library_checkpoints = args.engine == "fsdp-both"
    if args.order == "prepare-first":
        prepare_for_lora(model, use_gradient_checkpointing=library_checkpoints)
    if args.engine in ("qlora4", "qlora8"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs=None if args.no_kwargs else dict(NON_REENTRANT),
        )
    if args.order == "prepare-after":
        prepare_for_lora(model, use_gradient_checkpointing=library_checkpoints)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    runs = count_block_runs(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer_args = training_arguments(args, out, world)
    meter = Meter(cuda=not args.cpu)
    trainer = transformers.Trainer(
        model=model, args=trainer_args, train_dataset=Rows(model.config.vocab_size, args.seq), callbacks=[meter]
    )
    with checkpoint_calls() as calls:
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if not args.cpu else 0
    api = check_public_api(trainer.model_wrapped)
    block_runs = list(runs)  # before the ZeRO-3 check's own forward
    after = full_lora(trainer, model)
    changed = sum(not torch.equal(after[n], before[n]) for n in before if n in after)
    checksum = math.fsum(float(t.double().sum()) for t in after.values())
    extra: dict = {}
    if args.engine == "zero3":
        try:
            extra = zero3_reload_check(trainer, model, args, out, after)
        except Exception as error:  # recorded: training's own results still count
            extra = {"reload_error": f"{type(error).__name__}: {error}"[:500]}
    caught.__exit__(None, None, None)

    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {
        "rank": rank, "peak_bytes": peak, "lora_checksum": checksum, "lora_changed": changed,
        "lora_tensors": len(before), "block_runs": block_runs, "checkpoint_calls": len(calls),
        "use_reentrant_seen": sorted({str(c) for c in calls}), "api": api,
    }
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        step_times = meter.times[1:] or meter.times
        result = {
            "engine": args.engine, "order": args.order, "world_size": world, "steps": args.steps, "seq": args.seq,
            "global_batch": args.global_batch, "layers": model.config.num_hidden_layers,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__,
            "deepspeed": getattr(sys.modules.get("deepspeed"), "__version__", None),
            "bitsandbytes": getattr(sys.modules.get("bitsandbytes"), "__version__", None),
            "qwen_ckpt_compat": qwen_ckpt_compat.__version__,
            "losses": meter.losses, "median_step_s": statistics.median(step_times) if step_times else None,
            "ranks": everyone,
            "compat_warnings": sorted({str(w.message)[:200] for w in caught_list if issubclass(w.category, CompatWarning)}),
            **extra,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(json.dumps({k: v for k, v in result.items() if k != "ranks"})[:2000])


if __name__ == "__main__":
    main()
