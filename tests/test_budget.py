"""memory_budget=: the planner's decisions, its measurements, and the plan applied through prepare_for_lora and Trainer."""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    TARGET_MODULES,
    batch,
    count_block_calls,
    enable,
    lora,
    max_relative_difference,
    needs_selective,
    step_grads,
)

from qwen_ckpt_compat import CompatWarning, checkpoint_settings, memory_plan, prepare_for_lora
from qwen_ckpt_compat.speed import budget as budget_module
from qwen_ckpt_compat.speed.budget import (
    CHECKPOINT,
    KEEP,
    SELECTIVE,
    choose_plan,
    format_bytes,
    parse_memory_budget,
    probe_block,
)
from qwen_ckpt_compat.speed.selective import storage_key

GB, GiB = 10**9, 2**30

# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value, expected",
    [("70GiB", 70 * GiB), ("70 gib", 70 * GiB), ("80GB", 80 * GB), ("512MiB", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40)),
     ("1000", 1000), (4096, 4096)],
)
def test_parse_memory_budget(value, expected):
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize("value, error", [("seventy", ValueError), ("70 GiBs", ValueError), (0, ValueError),
                                          (-5, ValueError), ("0GB", ValueError), (True, TypeError), (7.5, TypeError)])
def test_bad_memory_budgets(value, error):
    with pytest.raises(error, match="memory_budget"):
        parse_memory_budget(value)


# ------------------------------------------------------------------------------- decisions (pure, H200 facts)

# Qwen-7B shapes, one H200, bf16, LoRA r=8 (docs/facts/qwen-v1.md, "Memory and time on one H200"): peaks of
# full checkpointing and of no checkpointing, weights about 15.4 GB allocated before the step.
WEIGHTS = int(15.4 * GB)
FACTS = {
    8192: {"full": int(26.06 * GB), "none": int(90.89 * GB), "input": 8192 * 4096 * 2},
    2048: {"full": int(17.51 * GB), "none": int(32.96 * GB), "input": 2048 * 4096 * 2},
}


def _plan_from_facts(seq: int, budget: int, **overrides):
    facts = FACTS[seq]
    arguments = dict(
        num_blocks=32,
        budget_bytes=budget,
        margin_bytes=int(budget * budget_module.MARGIN_FRACTION),
        allocated_bytes=WEIGHTS,
        floor_transient_bytes=facts["full"] - WEIGHTS,
        block_bytes=(facts["none"] - facts["full"]) // 32,
        input_bytes=facts["input"],
    )
    arguments.update(overrides)
    return choose_plan(**arguments)


def test_70gib_at_8192_keeps_as_many_blocks_as_fit():
    choice = _plan_from_facts(8192, 70 * GiB)
    assert choice.fits and not choice.offload
    assert choice.decisions == (CHECKPOINT,) * 9 + (KEEP,) * 23, "the last blocks are kept"
    assert 70 * GiB * 0.98 - 2.03 * GB < choice.predicted_peak_bytes <= 70 * GiB * 0.98
    # The step this plan predicts from the baseline (docs/facts/qwen-v1.md, "Memory and time on one H200":
    # full checkpointing 1.679 s, one forward 0.485 s): each kept block saves its recompute. The GPU benchmark
    # measures the real ratio (docs/performance.md).
    kept = choice.decisions.count(KEEP)
    assert (1.679 - kept * 0.485 / 32) / 1.679 <= 0.85


def test_70gib_at_2048_needs_no_checkpointing():
    choice = _plan_from_facts(2048, 70 * GiB)
    assert choice.decisions == (KEEP,) * 32 and choice.fits
    assert choice.predicted_peak_bytes == pytest.approx(FACTS[2048]["none"], rel=1e-6)


def test_a_budget_below_full_checkpointing_offloads():
    choice = _plan_from_facts(8192, 25 * GB)
    assert choice.fits and choice.offload and choice.decisions == (CHECKPOINT,) * 32
    assert choice.predicted_peak_bytes == FACTS[8192]["full"] - 32 * FACTS[8192]["input"]


def test_a_budget_nothing_fits_says_the_minimum():
    choice = _plan_from_facts(8192, 20 * GB)
    assert not choice.fits and choice.offload and choice.decisions == (CHECKPOINT,) * 32
    assert choice.minimum_peak_bytes == choice.predicted_peak_bytes == FACTS[8192]["full"] - 32 * FACTS[8192]["input"]
    assert _plan_from_facts(8192, 20 * GB, can_offload=False).minimum_peak_bytes == FACTS[8192]["full"]


def test_selective_blocks_come_first_then_kept_ones():
    attention = 8192 * 4096 * 2 + 32 * 8192 * 4  # output + log-sum-exp per head and position
    choice = _plan_from_facts(8192, 70 * GiB, selective_bytes=attention)
    kept = choice.decisions.count(KEEP)
    assert choice.decisions == (SELECTIVE,) * (32 - kept) + (KEEP,) * kept
    assert kept in (21, 22, 23) and choice.fits
    tight = _plan_from_facts(8192, int(27.5 * GB), selective_bytes=attention)
    assert tight.decisions.count(KEEP) == 0 and 0 < tight.decisions.count(SELECTIVE) < 32
    assert tight.decisions[: 32 - tight.decisions.count(SELECTIVE)] == (CHECKPOINT,) * (32 - tight.decisions.count(SELECTIVE))


def test_a_larger_budget_never_recomputes_more():
    previous = -1
    for gib in range(20, 100, 3):
        kept = _plan_from_facts(8192, gib * GiB).decisions.count(KEEP)
        assert kept >= previous
        previous = kept


# ---------------------------------------------------------------------------------------------- the probe


def _checkpoint_saves_through_outer_hooks() -> bool:
    """torch >= 2.1's non-reentrant checkpoint saves its inputs through the saved-tensor hooks around it; torch
    2.0's keeps them where those hooks never see them (measured), so they cannot count what it saves."""
    import torch.utils.checkpoint

    seen: list = []
    x = torch.ones(2, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        torch.utils.checkpoint.checkpoint(lambda a: a.sin(), x, use_reentrant=False)
    return bool(seen)


@pytest.mark.xfail(
    not _checkpoint_saves_through_outer_hooks(),
    reason=f"torch {torch.__version__}'s non-reentrant checkpoint hides the inputs it keeps from saved-tensor hooks, "
    "so _saved_bytes undercounts the checkpointed model",
    strict=True,
)
def test_probe_matches_what_the_whole_model_saves(tmp_path):
    """Saved-tensor bytes of a whole forward without checkpointing minus those with every block checkpointed is
    the sum over blocks of what each saves: the probe of one block (its input requiring grad, as every block's
    but the first does) times the number of blocks, less a little for the first block."""
    from helpers import load_qwen

    from qwen_ckpt_compat.testing import write_tiny_qwen

    model = lora(load_qwen(write_tiny_qwen(tmp_path, num_hidden_layers=4)))
    blocks = list(model.base_model.model.transformer.h)
    inputs = batch()
    captured: dict = {}
    handle = blocks[2].register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    plain = _saved_bytes(model, inputs)
    handle.remove()
    measurement = probe_block(blocks[2], blocks[2].__call__, captured["args"], captured["kwargs"])
    prepare_for_lora(model)
    checkpointed = _saved_bytes(model, inputs)
    assert measurement.shape == (2, 16) and measurement.input_bytes == 2 * 16 * 32 * 4
    assert 3 * measurement.block_bytes < plain - checkpointed <= 4 * measurement.block_bytes


def _saved_bytes(model, inputs) -> int:
    excluded = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict = {}

    def pack(tensor):
        key = storage_key(tensor)
        if key not in excluded:
            saved[key] = budget_module._storage_bytes(tensor)
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, use_cache=False)
    return sum(saved.values())


# --------------------------------------------------------------------- the planner, with a scripted device


@dataclass
class ScriptedDevice:
    """Stands in for an accelerator's counters on the CPU: `peak` is what the test says the last step reached."""

    allocated_bytes: int
    peak: int = 0

    def allocated(self) -> int:
        return self.allocated_bytes

    def max_allocated(self) -> int:
        return max(self.peak, self.allocated_bytes)


@pytest.fixture
def device(monkeypatch):
    scripted = ScriptedDevice(allocated_bytes=1_000_000)
    monkeypatch.setattr(budget_module, "device_memory", lambda _: scripted)
    return scripted


@pytest.fixture
def four_blocks(tmp_path):
    from helpers import load_qwen

    from qwen_ckpt_compat import unpatch
    from qwen_ckpt_compat.testing import write_tiny_qwen

    model = load_qwen(write_tiny_qwen(tmp_path / "four", num_hidden_layers=4))
    yield model
    unpatch(model)


def _runs(model, inputs) -> list:
    with count_block_calls(model) as counts:
        step_grads(model, inputs)
    return [counts[i] for i in range(4)]


def _block_bytes(model, inputs, selective: bool = False) -> int:
    """One block's bytes, measured the way the planner does it: a training call, the fused attention kernel on (as
    prepare_for_lora leaves it by default)."""
    blocks = [m for m in model.modules() if type(m).__name__ == "QWenBlock"]
    captured: dict = {}
    handle = blocks[1].register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    prepare_for_lora(model, use_gradient_checkpointing=False)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    model.train()
    measured = probe_block(blocks[1], blocks[1].__call__, captured["args"], {**captured["kwargs"], "use_cache": False},
                           selective=selective)
    return measured.selective_bytes if selective else measured.block_bytes


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_the_probe_leaves_no_tensor_alive(four_blocks):
    """The probe's graph is dropped whole: a pack hook that returned the tensor itself made a reference cycle
    through autograd (an operator that saves its own output), which Python's collector cannot see. On the GPU
    that kept 1.3 GiB per probe at 8192 tokens (Qwen-7B shapes), after the model was gone."""
    inputs = batch()
    model = lora(four_blocks)
    _block_bytes(model, inputs)  # the first probe: imports and caches settle
    before = _live_tensors()
    assert _block_bytes(model, inputs) > 0
    assert _live_tensors() == before


def _budget_for(kept: float, block_bytes: int, allocated: int, transient: int) -> int:
    return int((allocated + transient + kept * block_bytes) / (1 - budget_module.MARGIN_FRACTION)) + 1


def test_plan_is_made_from_the_first_step_and_applied(four_blocks, device):
    inputs = batch()
    model = lora(four_blocks)
    a = _block_bytes(model, inputs)
    transient = 5 * a
    budget = _budget_for(2.5, a, device.allocated_bytes, transient)
    prepare_for_lora(model, memory_budget=budget)
    assert checkpoint_settings(model).memory_budget == budget

    assert _runs(model, inputs) == [3, 2, 2, 2], "the measuring step checkpoints every block; block 0 is probed once"
    assert memory_plan(model) is None, "no plan before the measuring step's peak is known"
    device.peak = device.allocated_bytes + transient
    assert _runs(model, inputs) == [2, 2, 1, 1], "two blocks fit: the last two are kept"
    plan = memory_plan(model)
    assert plan.status == "planned" and plan.fits and not plan.offload
    assert plan.decisions == (CHECKPOINT, CHECKPOINT, KEEP, KEEP) and plan.shape == (2, 16)
    assert plan.measurement.block_bytes == a and plan.floor_peak_exact
    assert plan.predicted_peak_bytes == device.allocated_bytes + transient + 2 * a <= budget
    assert "blocks 0-1: checkpoint; blocks 2-3: keep" in str(plan)
    assert _runs(model, inputs) == [2, 2, 1, 1]


def test_plan_gives_the_same_gradients(four_blocks, device):
    inputs = batch()
    model = lora(four_blocks)
    reference = step_grads(model, inputs)
    a = _block_bytes(model, inputs)
    prepare_for_lora(model, memory_budget=_budget_for(1.5, a, device.allocated_bytes, 5 * a))
    step_grads(model, inputs)
    device.peak = device.allocated_bytes + 5 * a
    assert max_relative_difference(step_grads(model, inputs), reference) <= 1e-5
    assert memory_plan(model).decisions == (CHECKPOINT,) * 3 + (KEEP,)


def test_the_plan_and_its_gradients_with_the_chunked_loss(four_blocks, device):
    """The loss runs outside the probed blocks: the same block bytes and plan; the measured step's peak (the floor)
    is taken with the chunked loss in place; the gradients are those of the plain loss."""
    inputs = batch()
    model = lora(four_blocks)
    reference = step_grads(model, inputs)
    a = _block_bytes(model, inputs)
    prepare_for_lora(model, memory_budget=_budget_for(2.5, a, device.allocated_bytes, 5 * a), chunked_loss=5)
    assert checkpoint_settings(model).chunked_loss == 5
    assert _runs(model, inputs) == [3, 2, 2, 2], "the measuring step, with the chunked loss"
    device.peak = device.allocated_bytes + 5 * a
    assert _runs(model, inputs) == [2, 2, 1, 1]
    plan = memory_plan(model)
    assert plan.decisions == (CHECKPOINT, CHECKPOINT, KEEP, KEEP) and plan.measurement.block_bytes == a
    assert model(**inputs).logits is None, "the chunked loss ran"
    assert max_relative_difference(step_grads(model, inputs), reference) <= 1e-5


def test_a_longer_sequence_is_measured_again_and_a_shorter_one_reuses_the_plan(four_blocks, device):
    model = lora(four_blocks)
    short, long = batch(length=16), batch(length=32)
    a = _block_bytes(model, short)
    prepare_for_lora(model, memory_budget=_budget_for(3.5, a, device.allocated_bytes, 5 * a))
    _runs(model, short)
    device.peak = device.allocated_bytes + 5 * a
    assert _runs(model, short) == [2, 1, 1, 1]
    assert _runs(model, long) == [3, 2, 2, 2], "a longer batch: probed and measured with every block checkpointed"
    device.peak = device.allocated_bytes + 12 * a  # it peaked higher
    runs = _runs(model, long)
    plan = memory_plan(model)
    assert plan.shape == (2, 32) and plan.measurement.block_bytes > a
    assert runs == [1 if d == KEEP else 2 for d in plan.decisions]
    assert _runs(model, short) == runs, "the longer batch's plan serves the shorter one; no new measurement"
    assert memory_plan(model) is plan


def test_trainer_keeps_the_budget_and_its_plan(four_blocks, device, tmp_path):
    import transformers
    from test_trainer import _Rows, _training_arguments

    model = lora(four_blocks)
    a = _block_bytes(model, batch())
    prepare_for_lora(model, memory_budget=_budget_for(2.5, a, device.allocated_bytes, 5 * a))
    device.peak = device.allocated_bytes + 5 * a  # what the measuring step will have reached
    args = _training_arguments(tmp_path, max_steps=3)
    with count_block_calls(model) as counts:
        transformers.Trainer(model=model, args=args, train_dataset=_Rows(n=6)).train()
    plan = memory_plan(model)
    assert plan is not None and plan.decisions == (CHECKPOINT, CHECKPOINT, KEEP, KEEP)
    assert checkpoint_settings(model).memory_budget is not None
    assert [counts[i] for i in range(4)] == [7, 6, 4, 4], "probed and measured once, then two planned steps"
    enable(model)  # another re-enable keeps the plan
    assert _runs(model, batch()) == [2, 2, 1, 1]


def test_a_step_over_the_budget_makes_it_replan(four_blocks, device):
    model = lora(four_blocks)
    inputs = batch()
    a = _block_bytes(model, inputs)
    budget = _budget_for(2.5, a, device.allocated_bytes, 5 * a)
    prepare_for_lora(model, memory_budget=budget)
    _runs(model, inputs)
    device.peak = device.allocated_bytes + 5 * a
    assert _runs(model, inputs) == [2, 2, 1, 1]
    predicted = memory_plan(model).predicted_peak_bytes
    device.peak = budget + a // 2  # the planned step went over
    with pytest.warns(CompatWarning, match="above the plan's prediction; re-planned"):
        runs = _runs(model, inputs)
    plan = memory_plan(model)
    assert runs == [2, 2, 2, 1], "one block fewer kept, from this step on"
    assert plan.correction_bytes == device.peak - predicted
    assert plan.predicted_peak_bytes == predicted - a + plan.correction_bytes <= budget


def test_no_plan_fits_warns_with_the_minimum(four_blocks, device):
    model = lora(four_blocks)
    inputs = batch()
    a = _block_bytes(model, inputs)
    budget = _budget_for(0, a, device.allocated_bytes, 5 * a) - 1 - 3 * 4096 // 2  # below even full checkpointing
    prepare_for_lora(model, memory_budget=budget)
    _runs(model, inputs)
    device.peak = device.allocated_bytes + 5 * a + 4 * 4096
    with pytest.warns(CompatWarning, match=r"cannot be met for batch 2 x 16 tokens: the least this model needs is"):
        runs = _runs(model, inputs)
    plan = memory_plan(model)
    assert not plan.fits and plan.offload and runs == [2, 2, 2, 2]
    assert plan.minimum_peak_bytes == device.allocated_bytes + 5 * a + 4 * 4096 - 4 * plan.measurement.input_bytes
    assert format_bytes(plan.minimum_peak_bytes) in str(plan)


@needs_selective
def test_selective_with_a_budget(four_blocks, device):
    model = lora(four_blocks)
    inputs = batch()
    reference = step_grads(model, inputs)
    transient = 10 * device.allocated_bytes
    # The planner's own measurement first, with a budget everything fits in.
    prepare_for_lora(model, memory_budget=100 * transient, selective=True)
    step_grads(model, inputs)
    device.peak = device.allocated_bytes + transient
    step_grads(model, inputs)
    measured = memory_plan(model).measurement
    a, s = measured.block_bytes, measured.selective_bytes
    assert 0 < s < a, "selective recompute keeps part of what a block saves"
    # Room for every block selective and one and a half blocks kept whole: three selective, the last one kept.
    room = 4 * s + 1.5 * (a - s)
    prepare_for_lora(model, memory_budget=_budget_for(1, room, device.allocated_bytes, transient), selective=True)
    step_grads(model, inputs)
    grads = step_grads(model, inputs)
    plan = memory_plan(model)
    assert (plan.measurement.block_bytes, plan.measurement.selective_bytes) == (a, s)
    assert plan.decisions == (SELECTIVE, SELECTIVE, SELECTIVE, KEEP)
    assert max_relative_difference(grads, reference) <= 1e-5


def test_the_probe_leaves_the_random_stream_alone(tmp_path, device):
    """With dropout on, a budget's measuring step gives the same gradients as plain full checkpointing."""
    from helpers import load_qwen
    from peft import LoraConfig, get_peft_model

    from qwen_ckpt_compat import unpatch
    from qwen_ckpt_compat.testing import write_tiny_qwen

    path = write_tiny_qwen(tmp_path, attn_dropout_prob=0.3)
    grads = []
    for options in ({}, {"memory_budget": 10**12}):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=TARGET_MODULES,
                            init_lora_weights=False)
        model = get_peft_model(load_qwen(path), config)
        prepare_for_lora(model, **options)
        torch.manual_seed(1)
        grads.append(step_grads(model))
        unpatch(model)
    assert max_relative_difference(grads[1], grads[0]) <= 1e-6


def test_cpu_cannot_be_measured(qwen):
    prepare_for_lora(qwen, memory_budget="1GiB")
    with pytest.warns(CompatWarning, match="gives no memory statistics"):
        with count_block_calls(qwen) as counts:
            step_grads(qwen)
    assert set(counts.values()) == {2}
    assert memory_plan(qwen).status == "unmeasurable"


def test_budget_options_are_checked(qwen, device):
    with pytest.raises(ValueError, match="leave every_n_layers and offload"):
        prepare_for_lora(qwen, memory_budget="70GiB", every_n_layers=2)
    with pytest.raises(ValueError, match="leave every_n_layers and offload"):
        prepare_for_lora(qwen, memory_budget="70GiB", offload=True)
    with pytest.raises(ValueError, match="is below the .* already allocated"):
        prepare_for_lora(qwen, memory_budget=device.allocated_bytes // 2)
    with pytest.raises(TypeError, match="memory_budget"):
        prepare_for_lora(qwen, memory_budget=[1])


def test_an_explicit_every_n_layers_replaces_the_budget(four_blocks):
    from qwen_ckpt_compat import capabilities

    if not capabilities().every_n_layers:
        pytest.skip(f"transformers {capabilities().transformers} has no every_n_layers")
    prepare_for_lora(four_blocks, memory_budget="70GiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)  # no "cannot be measured" warning: no budget any more
        enable(four_blocks, every_n_layers=2)
        assert _runs(four_blocks, batch()) == [2, 1, 2, 1]
    assert checkpoint_settings(four_blocks).memory_budget is None and memory_plan(four_blocks) is None


def test_native_models_ignore_the_budget_with_a_warning(native_llama):
    with pytest.warns(CompatWarning, match="memory_budget: only for old remote-code models"):
        prepare_for_lora(native_llama, memory_budget="70GiB")
