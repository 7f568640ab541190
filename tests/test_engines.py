"""Training engines on the CPU: 2-process DDP, accelerate, FSDP1 and FSDP2 (gloo), and the models engines hand back.

The multi-process runs are made once per session by tests/engines_worker.py under torch.distributed.run; the
tests read what each rank wrote. GPU-only parts (bf16 on CUDA, DeepSpeed ZeRO-2/3, bitsandbytes QLoRA) run
from scripts/engines/run_gpu.py; docs/distributed.md has their results.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import batch, blocks, load_qwen, lora, lora_grads, max_relative_difference, step_grads

from qwen_ckpt_compat import (
    CompatWarning,
    UnsupportedModelError,
    checkpoint_settings,
    describe,
    is_patched,
    patch,
    prepare_for_lora,
)

TESTS = Path(__file__).resolve().parent
STEPS = 3  # as in engines_worker.py
BLOCKS = 2  # the tiny model's decoder blocks
WORLD = 2


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401,F811  (torch 2.4-2.5)
        except ImportError:
            return False
    return True


FSDP2 = _fsdp2_available()
SELECTIVE = hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")
SELECTIVE_ENGINES = (["fsdp1-selective"] + (["fsdp2-selective"] if FSDP2 else [])) if SELECTIVE else []
FP32_ENGINES = ["ddp", "accelerate", "fsdp1"] + (["fsdp2"] if FSDP2 else []) + SELECTIVE_ENGINES
BF16_ENGINES = ["fsdp1-bf16"] + (["fsdp2-bf16"] if FSDP2 else [])
ENGINES = FP32_ENGINES + BF16_ENGINES + (["fsdp2-bf16-engine-ac"] if FSDP2 else [])
needs_fsdp2 = pytest.mark.skipif(not FSDP2, reason=f"torch {torch.__version__} has no FSDP2 (fully_shard)")
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

# bf16 keeps 8 bits of mantissa: per-step losses of a bf16 mixed-precision run agree with the float32 DDP run
# to about 3e-3 (measured); 1e-2 leaves room for the rounding of other releases' kernels.
BF16_LOSS_RTOL = 1e-2


_NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|7|11)\b")  # torchrun's summary: SIGABRT, SIGBUS, SIGSEGV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_qwen_dir, tmp_path_factory) -> dict:
    """Runs every engine in one 2-process launch; returns {engine: [rank 0 result, rank 1 result]}."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("engines")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            str(TESTS / "engines_worker.py"), str(tiny_qwen_dir), str(out), *ENGINES,
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        if not result.returncode:
            break
        report = f"the {WORLD}-process run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        # The worker records every Python error of an engine in its result file and carries on, so a rank that died
        # is a native crash (gloo under a loaded 2-core CI machine: seen about once in 20 launches). Such a crash
        # gets one more launch, said in the warnings summary; anything else, or a second crash, fails.
        if attempt == 2 or not _NATIVE_CRASH.search(result.stderr):
            pytest.fail(report)
        warnings.warn(f"relaunched after a native crash of a rank: {report[-1500:]}", RuntimeWarning, stacklevel=1)
    return {
        engine: [json.loads((out / f"{engine}.rank{rank}.json").read_text()) for rank in range(WORLD)]
        for engine in ENGINES
    }


def _ok(runs: dict, engine: str) -> list:
    ranks = runs[engine]
    unavailable = next((r["unavailable"] for r in ranks if "unavailable" in r), None)
    if unavailable is not None:
        pytest.skip(unavailable)  # the engine itself cannot run here (tried on a plain Linear by the worker)
    errors = [r["error"] + "\n" + r["traceback"] for r in ranks if "error" in r]
    assert not errors, f"{engine} failed:\n" + "\n".join(errors)
    return ranks


@needs_gloo
@pytest.mark.spawns
@pytest.mark.behaviour("engines")
@pytest.mark.parametrize("engine", [e for e in ENGINES if not e.endswith("engine-ac")])
def test_engine_trains_with_routed_non_reentrant_checkpointing(runs, engine):
    for rank in _ok(runs, engine):
        assert rank["model_class"] == "QWenLMHeadModel" and rank["is_remote_code"] and rank["is_peft_model"]
        assert rank["is_patched"] and rank["settings_use_reentrant"] is False
        assert rank["num_decoder_blocks"] == BLOCKS
        assert rank["block_runs"] == [2 * STEPS] * BLOCKS, "each block: one forward and one recompute per step"
        calls = rank["checkpoint_calls"]
        assert len(calls) == BLOCKS * STEPS and {c["use_reentrant"] for c in calls} == {False}
        assert rank["lora_changed"] == rank["lora_tensors"] == 20
        assert rank["losses"][-1] < rank["losses"][0]
    checksums = {tuple(rank["lora_checksums"]) for rank in runs[engine]}
    assert len(checksums) == 1 and len(set(next(iter(checksums)))) == 1, "the ranks' LoRA weights differ"


@needs_gloo
@pytest.mark.spawns
@pytest.mark.behaviour("engines")
@pytest.mark.parametrize("engine", [e for e in FP32_ENGINES if e != "ddp"])
def test_float32_losses_equal_ddp(runs, engine):
    ddp = _ok(runs, "ddp")[0]["losses"]
    losses = _ok(runs, engine)[0]["losses"]
    assert losses == pytest.approx(ddp, rel=1e-5)


@needs_gloo
@pytest.mark.spawns
@pytest.mark.behaviour("engines")
@pytest.mark.parametrize("engine", BF16_ENGINES)
def test_bf16_mixed_precision_losses_match_ddp_within_bf16_tolerance(runs, engine):
    ddp = _ok(runs, "ddp")[0]["losses"]
    assert _ok(runs, engine)[0]["losses"] == pytest.approx(ddp, rel=BF16_LOSS_RTOL)


@needs_gloo
@pytest.mark.spawns
@pytest.mark.behaviour("engines")
@pytest.mark.parametrize("engine", SELECTIVE_ENGINES)
def test_selective_recompute_serves_attention_under_fsdp(runs, engine):
    """Inside FSDP's hooks too: the attention kernel runs once per block and step (twice without selective), and
    the losses equal DDP's (test_float32_losses_equal_ddp)."""
    plain = _ok(runs, engine.replace("-selective", ""))[0]
    for rank in _ok(runs, engine):
        assert rank["settings_selective"] is True
        assert rank["attention_calls"] == BLOCKS * STEPS
    assert plain["settings_selective"] is False and plain["attention_calls"] == 2 * BLOCKS * STEPS


@needs_gloo
@pytest.mark.spawns
@needs_fsdp2
@pytest.mark.behaviour("engines")
def test_fsdp2_checkpoints_the_inputs_its_hooks_cast(runs):
    """FSDP2 casts block inputs to bf16 in its pre-hook; the checkpoint must save those, not the float32 ones.

    Checkpointing around ``__call__`` hands the checkpoint the float32 rotary tables (and some torch releases
    recompute without the cast: CheckpointError); inside the hooks, every floating input is bf16.
    """
    for rank in _ok(runs, "fsdp2-bf16"):
        assert {tuple(c["input_dtypes"]) for c in rank["checkpoint_calls"]} == {("torch.bfloat16",)}


@needs_gloo
@pytest.mark.spawns
@needs_fsdp2
@pytest.mark.behaviour("engines")
def test_engine_activation_checkpointing_wins_and_no_block_is_checkpointed_twice(runs):
    for rank in _ok(runs, "fsdp2-bf16-engine-ac"):
        assert rank["checkpoint_calls"] == [], "the library must leave the engine's wrapped blocks alone"
        assert rank["block_runs"] == [2 * STEPS] * BLOCKS, "one recompute per block per step, not two"
        warned = [w for w in rank["compat_warnings"] if "already checkpointed by the training engine" in w]
        assert len(warned) == 1 and "engine's checkpointing wins" in warned[0]
        assert rank["lora_changed"] == rank["lora_tensors"]


# ------------------------------------------------------------------------- wrapped models, one process


@pytest.fixture
def process_group(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _check_public_api_accepts(wrapped, model) -> None:
    info = describe(wrapped)
    assert (info.model_class, info.is_remote_code, info.old_checkpointing_api) == ("QWenLMHeadModel", True, True)
    assert info.num_decoder_blocks == BLOCKS
    assert prepare_for_lora(wrapped) is wrapped and patch(wrapped) is wrapped and is_patched(wrapped)
    settings = checkpoint_settings(wrapped)
    assert settings is not None and settings.use_reentrant is False
    assert all(block.__dict__.get("gradient_checkpointing") for block in blocks(model))


@pytest.mark.behaviour("engines")
def test_data_parallel_and_compiled_wrappers_are_accepted(qwen):
    model = lora(qwen)
    for wrapped in (torch.nn.DataParallel(model), torch.compile(model)):
        _check_public_api_accepts(wrapped, qwen)
        assert describe(wrapped).is_peft_model


@pytest.mark.behaviour("engines")
def test_ddp_wrapper_is_accepted_and_gives_the_same_gradients(qwen, process_group):
    model = lora(qwen)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    _check_public_api_accepts(wrapped, qwen)
    direct = step_grads(model)
    wrapped(**batch()).loss.backward()
    through_ddp = lora_grads(model)
    assert max_relative_difference(through_ddp, direct) <= 1e-6


@needs_fsdp2
@pytest.mark.behaviour("engines")
def test_fsdp2_swapped_classes_are_recognised(tiny_qwen_dir, process_group):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard

    model = load_qwen(tiny_qwen_dir)
    peft_model = lora(model)
    for block in blocks(model):
        fully_shard(block)
    fully_shard(peft_model)
    assert type(peft_model).__name__ == "FSDPPeftModel"
    assert {type(m).__name__ for m in model.modules() if "QWenBlock" in type(m).__name__} == {"FSDPQWenBlock"}
    _check_public_api_accepts(peft_model, model)
    assert describe(peft_model).is_peft_model


@pytest.mark.behaviour("engines")
def test_wrappers_around_other_objects_still_get_the_clear_error():
    linear = torch.nn.Linear(2, 2)
    for wrapped in (torch.nn.DataParallel(linear), torch.compile(linear)):
        with pytest.raises(UnsupportedModelError, match=f"{type(wrapped).__name__} around torch.nn.modules.linear.Linear"):
            describe(wrapped)
    with pytest.raises(UnsupportedModelError, match="NoneType|None"):
        prepare_for_lora(None)


@pytest.mark.behaviour("engines")
def test_engine_checkpointing_warning_is_silent_without_an_engine(qwen):
    model = prepare_for_lora(lora(qwen))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        step_grads(model)


# ------------------------------------------------------------------- bitsandbytes 8-bit layers (CPU stand-in)


@pytest.fixture
def int8_layer_class(monkeypatch):
    """``bitsandbytes.nn.Linear8bitLt`` as the library looks it up: a class of an imported ``bitsandbytes.nn``.

    The real layer needs a GPU; what is tested here is the library's decision, which only asks ``isinstance``.
    """
    import types

    module = types.ModuleType("bitsandbytes.nn")

    class Linear8bitLt(torch.nn.Linear):
        pass

    module.Linear8bitLt = Linear8bitLt
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn", module)
    return Linear8bitLt


def _swap_in(model, cls) -> None:
    mlp = blocks(model)[0].mlp
    old = mlp.w1
    new = cls(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    mlp.w1 = new


@pytest.mark.behaviour("engines")
def test_8bit_models_checkpoint_reentrantly_when_nobody_asked(qwen, int8_layer_class):
    from helpers import enable, reentrant_in_effect

    _swap_in(qwen, int8_layer_class)
    patch(qwen)
    enable(qwen)
    assert checkpoint_settings(qwen).use_reentrant is True
    model = lora(qwen)
    assert reentrant_in_effect(model)
    assert len(step_grads(model)) == 20, "the input-embedding hook lets every LoRA tensor get its gradient"


@pytest.mark.behaviour("engines")
def test_8bit_models_warn_once_when_non_reentrant_is_asked(qwen, int8_layer_class):
    _swap_in(qwen, int8_layer_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
    messages = [str(w.message) for w in caught if issubclass(w.category, CompatWarning)]
    assert len(messages) == 1 and "8-bit" in messages[0] and "use_reentrant': True" in messages[0]
    assert checkpoint_settings(qwen).use_reentrant is False, "the explicit request is still honoured"


@pytest.mark.behaviour("engines")
def test_8bit_models_prepare_for_lora_without_kwargs_is_reentrant_and_quiet(qwen, int8_layer_class):
    """No kwargs is no preference (what is in effect is kept, else the library's default): the mode the
    library picks for 8-bit models, without a warning."""
    _swap_in(qwen, int8_layer_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(qwen)
    assert checkpoint_settings(qwen).use_reentrant is True
    assert len(step_grads(lora(qwen))) == 20


@pytest.mark.behaviour("engines")
def test_8bit_models_given_kwargs_without_use_reentrant_are_reentrant(qwen, int8_layer_class):
    """A dict without ``use_reentrant`` expresses no preference on the mode: the mode picked for the model."""
    _swap_in(qwen, int8_layer_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"preserve_rng_state": False})
    settings = checkpoint_settings(qwen)
    assert settings.use_reentrant is True
    assert settings.kwargs["preserve_rng_state"] is False
    assert len(step_grads(lora(qwen))) == 20


@pytest.mark.behaviour("engines")
def test_models_without_8bit_layers_keep_the_non_reentrant_default(qwen):
    from helpers import enable

    patch(qwen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)
        enable(qwen)
    assert checkpoint_settings(qwen).use_reentrant is False
