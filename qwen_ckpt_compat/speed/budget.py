"""Memory budget: recompute only as many decoder blocks as the budget requires, planned from measurements.

``prepare_for_lora(model, memory_budget="70GiB")`` stores the budget as the model's default (so ``Trainer``'s
re-enable keeps it). The plan is made during training, for the batch and sequence length actually used:

1. **Measuring step.** The first training forward of a shape runs with every block checkpointed (the least
   memory short of offloading). Before it, one block's forward is *probed* with the real inputs, outside
   checkpointing: ``torch.autograd.graph.saved_tensors_hooks`` count the bytes that block saves for the backward
   pass beyond its inputs, outputs and weights (what leaving it un-checkpointed costs), its input's bytes (what
   offloading saves per checkpointed block) and, with ``selective=True``, the bytes of the outputs that
   selective recompute keeps in device memory (on CUDA only the small ones: the rest lives in pinned host
   memory). The probe is device-independent and runs on the CPU in the tests.
2. **The device's peak.** At the start of the next forward, the peak of the measuring step is read from the
   device's ``max_memory_allocated`` (never reset by this library). That peak, minus what was allocated when the
   step began, is the *floor transient*: what a fully checkpointed step adds on top of the weights, gradients and
   optimizer state.
3. **The plan.** With ``allocated`` now (optimizer state included), the predicted peak of a plan is
   ``allocated + floor transient + kept blocks x block bytes + selective blocks x selective bytes``
   (offloading subtracts the checkpointed blocks' inputs). The planner keeps a margin of 2 % of the budget and
   picks the plan with the least recompute: with ``selective=True`` every checkpointed block keeps its expensive
   outputs first (the cheapest recompute saved per device byte), then as many blocks as fit are not checkpointed at all;
   offloading is used only when nothing fits without it. Blocks left un-checkpointed are the last ones: they are
   the first whose activations the backward pass frees, so they do not sit under another block's recompute.
4. **Holding it.** A planned step whose measured peak rises above the budget makes the planner re-plan with the
   difference added, and warn.

A plan covers every later batch that is no larger in batch size and sequence length; a larger one is measured
anew. When nothing fits (even with every block checkpointed and offloaded), a `CompatWarning` gives the least
memory this shape needs and training continues with that plan.

On a device without memory statistics (the CPU), the budget cannot be measured: every block stays checkpointed
and a `CompatWarning` says so.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import torch

from .._checkpoint_layer import FLAG, FUNC
from .._detection import unwrap_model
from .._model_state import existing_state, state_of
from .._settings import CheckpointSettings, build_checkpoint_function, without_context_fn
from ..errors import CompatWarning
from .selective import KeptOnDeviceRecorder, storage_key, tensors_in

__all__ = [
    "BlockMeasurement",
    "Choice",
    "DeviceMemory",
    "MemoryPlan",
    "choose_plan",
    "device_memory",
    "format_bytes",
    "memory_plan",
    "parse_memory_budget",
    "probe_block",
]

KEEP, SELECTIVE, CHECKPOINT = "keep", "selective", "checkpoint"
MARGIN_FRACTION = 0.02  # of the budget, kept free for what the measurements cannot see

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ bytes


def parse_memory_budget(value: Union[int, str]) -> int:
    """Bytes from an int of bytes or a string such as ``"70GiB"``, ``"80 GB"``, ``"512MiB"`` or ``"1.5TiB"``.

    ``KiB/MiB/GiB/TiB`` are powers of 1024, ``KB/MB/GB/TB`` powers of 1000 (case does not matter). Our own parser,
    because transformers' ``convert_file_size_to_int`` is not in every release (5.24 no longer has it).

    Raises:
        `TypeError`: neither an int nor a string. `ValueError`: not positive, or not a size.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"memory_budget must be an int of bytes or a string like '70GiB', got {type(value).__name__}: {value!r:.60}")
    if isinstance(value, int):
        number = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget {value!r} is not a size: use bytes or a number with KiB/MiB/GiB/TiB or KB/MB/GB/TB")
        number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return number


def format_bytes(n: Optional[float]) -> str:
    """``"24.27 GiB"`` (or ``"512.0 MiB"``, ``"3.2 KiB"`` for small sizes)."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------- device memory


class DeviceMemory(Protocol):
    """What the planner reads from a device: bytes allocated now, and the highest allocation so far."""

    def allocated(self) -> int: ...

    def max_allocated(self) -> int: ...


@dataclass(frozen=True)
class _Counters:
    allocated_fn: Callable[[], int]
    max_allocated_fn: Callable[[], int]

    def allocated(self) -> int:
        return int(self.allocated_fn())

    def max_allocated(self) -> int:
        return int(self.max_allocated_fn())


def device_memory(device: torch.device) -> Optional[DeviceMemory]:
    """The allocator counters of ``device``, or ``None`` where it has none (the CPU).

    Uses ``torch.accelerator`` where it has memory counters (recent torch), else the device's own module
    (``torch.cuda``, ``torch.xpu``, ...).
    """
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return None
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None
    sources = []
    if current is not None and current.type == device.type:
        sources.append(accelerator)
    sources.append(getattr(torch, device.type, None))
    for source in sources:
        allocated = getattr(source, "memory_allocated", None)
        maximum = getattr(source, "max_memory_allocated", None)
        if callable(allocated) and callable(maximum):
            return _Counters(functools.partial(allocated, device.index), functools.partial(maximum, device.index))
    return None


# ------------------------------------------------------------------------------------------------ probe


@dataclass(frozen=True)
class BlockMeasurement:
    """One decoder block, measured at one input shape by :func:`probe_block`.

    Attributes:
        shape (`tuple[int, int]`): (batch, sequence length) of the hidden states entering the block.
        block_bytes (`int`): bytes the block saves for its backward pass when it is not checkpointed, beyond its
            inputs, its output hidden states, weights and buffers: what leaving it un-checkpointed costs until its
            backward.
        input_bytes (`int`): bytes of its hidden-state input: what a checkpointed block keeps (and offloading moves
            to the host).
        selective_bytes (`int`): bytes of the outputs selective recompute keeps in device memory (0 unless asked for).
    """

    shape: tuple[int, int]
    block_bytes: int
    input_bytes: int
    selective_bytes: int = 0


def _storage_bytes(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return tensor.numel() * tensor.element_size()


def _preserved_rng(device: torch.device) -> contextlib.AbstractContextManager:
    # The probe must not move the random stream the training step draws its dropout masks from.
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()])
    return torch.random.fork_rng(devices=[])


def _never_unpacked(packed: None) -> torch.Tensor:
    raise RuntimeError("the memory probe's graph has no backward pass")


def probe_block(block: torch.nn.Module, run: Callable[..., Any], args: tuple, kwargs: dict, *, selective: bool = False) -> BlockMeasurement:
    """Runs ``run(*args, **kwargs)`` (the block's plain call) once with grad on and measures what it saves.

    The hidden states go in as a detached copy that requires grad: every block after the first one gets an input
    that requires grad (the adapters before it make it so), and a block saves more for the gradient of its
    input than without one. The outputs are dropped at once, the random state is restored, nothing is kept.
    """
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"cannot probe {type(block).__qualname__}: its first argument is not a tensor")
    if hidden.is_floating_point() and not hidden.requires_grad:
        hidden = hidden.detach().requires_grad_(True)  # shares the storage, so it stays an excluded input
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": hidden}
    excluded = {storage_key(t) for t in (*block.parameters(), *block.buffers(), *tensors_in((args, kwargs)))}
    saved: dict = {}  # storage key -> a tensor saved in it, held until the probe ends so no address is reused

    def pack(tensor: torch.Tensor) -> None:
        # Held here, not in the graph: returning the tensor itself would make a cycle through autograd wherever
        # an operator saves its own output, which Python's collector cannot see (the probe never runs backward).
        # The graph keeps this hook, so ``saved`` is emptied before the probe returns, for the same reason.
        key = storage_key(tensor)
        if key is not None:
            saved.setdefault(key, tensor)

    recorder = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_preserved_rng(hidden.device))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked))
        if selective:
            recorder = stack.enter_context(KeptOnDeviceRecorder())
        output = run(*args, **kwargs)
        # The hidden states it returns are the next block's input, kept either way; a KV cache it returns is not.
        excluded.add(storage_key(next(tensors_in(output), hidden)))
    measurement = BlockMeasurement(
        shape=(int(hidden.shape[0]), int(hidden.shape[1]) if hidden.dim() > 1 else 1),
        block_bytes=sum(_storage_bytes(t) for key, t in saved.items() if key not in excluded),
        input_bytes=_storage_bytes(hidden),
        selective_bytes=sum(map(_storage_bytes, recorder.kept.values())) if recorder is not None else 0,
    )
    saved.clear()
    return measurement


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class MemoryPlan:
    """Which decoder blocks are checkpointed, and why; see :func:`memory_plan`.

    Attributes:
        status (`str`): ``"planned"``, or ``"unmeasurable"`` (no memory statistics on the device: every block
            stays checkpointed).
        budget_bytes (`int`): the budget.
        shape (`tuple[int, int]`): (batch, sequence length) measured; the plan serves every batch no larger in
            either.
        decisions (`tuple[str, ...]`): per decoder block, in model order: ``"keep"`` (not checkpointed),
            ``"selective"`` (checkpointed, expensive outputs kept) or ``"checkpoint"`` (recomputed whole).
        offload (`bool`): the checkpointed blocks' inputs are kept in host memory.
        fits (`bool`): the predicted peak is within the budget.
        predicted_peak_bytes (`int`, *optional*): the peak the plan should reach.
        minimum_peak_bytes (`int`, *optional*): the least this shape needs (every block checkpointed, offloaded
            where possible): the budget to give when it does not fit.
        observed_peak_bytes (`int`, *optional*): the highest ``max_memory_allocated`` seen since the plan was
            applied, when it rose above what was seen before.
        measurement (`BlockMeasurement`, *optional*): the probe of one block.
        floor_peak_bytes (`int`, *optional*): the device's peak during the measuring step (every block
            checkpointed); ``floor_peak_exact`` is false when an earlier, higher peak hid it (then it is an upper
            bound and the plan is conservative).
        allocated_bytes (`int`, *optional*): allocated on the device when the plan was made.
        margin_bytes (`int`): kept free (2 % of the budget).
    """

    status: str
    budget_bytes: int
    shape: tuple[int, int]
    decisions: tuple[str, ...]
    offload: bool = False
    fits: bool = True
    predicted_peak_bytes: Optional[int] = None
    minimum_peak_bytes: Optional[int] = None
    observed_peak_bytes: Optional[int] = None
    measurement: Optional[BlockMeasurement] = None
    floor_peak_bytes: Optional[int] = None
    floor_peak_exact: bool = True
    floor_allocated_bytes: Optional[int] = None
    allocated_bytes: Optional[int] = None
    margin_bytes: int = 0
    correction_bytes: int = 0

    def count(self, decision: str) -> int:
        """How many blocks got ``decision``."""
        return sum(d == decision for d in self.decisions)

    def covers(self, shape: tuple[int, int]) -> bool:
        """Whether this plan serves a batch of ``shape`` (batch, sequence length)."""
        return all(a <= b for a, b in zip(shape, self.shape))

    def __str__(self) -> str:
        lines = [
            f"memory plan for batch {self.shape[0]} x {self.shape[1]} tokens, budget {format_bytes(self.budget_bytes)}: "
            + (self.status if self.status != "planned" else "fits" if self.fits else "does NOT fit")
        ]
        runs: list = []
        for index, decision in enumerate(self.decisions):
            if runs and runs[-1][2] == decision:
                runs[-1][1] = index
            else:
                runs.append([index, index, decision])
        lines.append("  " + "; ".join(f"blocks {a}-{b}: {d}" if a != b else f"block {a}: {d}" for a, b, d in runs))
        lines.append(f"  offload: {'yes' if self.offload else 'no'}")
        if self.predicted_peak_bytes is not None:
            lines.append(
                f"  predicted peak {format_bytes(self.predicted_peak_bytes)} (minimum for this shape "
                f"{format_bytes(self.minimum_peak_bytes)}); observed {format_bytes(self.observed_peak_bytes)}"
            )
        if self.measurement is not None:
            m = self.measurement
            lines.append(
                f"  per block: {format_bytes(m.block_bytes)} kept activations, {format_bytes(m.input_bytes)} input"
                + (f", {format_bytes(m.selective_bytes)} kept by selective recompute" if m.selective_bytes else "")
                + f"; fully checkpointed step peaked at {format_bytes(self.floor_peak_bytes)}"
                + ("" if self.floor_peak_exact else " (upper bound)")
            )
        return "\n".join(lines)


class Choice(NamedTuple):
    """What :func:`choose_plan` decided."""

    decisions: tuple[str, ...]
    offload: bool
    predicted_peak_bytes: int
    minimum_peak_bytes: int
    fits: bool


def choose_plan(
    *,
    num_blocks: int,
    budget_bytes: int,
    margin_bytes: int,
    allocated_bytes: int,
    floor_transient_bytes: int,
    block_bytes: int,
    input_bytes: int,
    selective_bytes: Optional[int] = None,
    can_offload: bool = True,
) -> Choice:
    """The plan with the least recompute within ``budget_bytes - margin_bytes``; the pure decision of the planner.

    All sizes are bytes. For ``k`` blocks kept (not checkpointed) and ``s`` selective ones:

    * ``predicted = allocated + floor_transient + k x block_bytes + s x selective_bytes``, and with offloading
      ``- (num_blocks - k) x input_bytes``;
    * with ``selective_bytes`` (selective recompute asked for), checkpointed blocks are selective first, as many
      as fit; only when all do are blocks left un-checkpointed, as many as fit;
    * offloading only when nothing fits without it; kept blocks are the last ones, selective ones before them.

    When nothing fits, the decisions are the most memory-saving ones, ``predicted`` equals ``minimum`` and
    ``fits`` is false.
    """
    n = num_blocks
    room = budget_bytes - margin_bytes - allocated_bytes - floor_transient_bytes
    offload = False
    if room < 0 and can_offload and room + n * input_bytes >= 0:
        offload, room = True, room + n * input_bytes
    minimum = allocated_bytes + floor_transient_bytes - (n * input_bytes if can_offload else 0)
    if room < 0:
        return Choice((CHECKPOINT,) * n, can_offload, minimum, minimum, False)
    keep_cost = block_bytes + (input_bytes if offload else 0)
    if selective_bytes is None:
        kept, selective = _how_many(room, keep_cost, n), 0
    else:
        selective = _how_many(room, selective_bytes, n)
        kept = _how_many(room - n * selective_bytes, keep_cost - selective_bytes, n) if selective == n else 0
        selective -= kept
    decisions = (CHECKPOINT,) * (n - selective - kept) + (SELECTIVE,) * selective + (KEEP,) * kept
    predicted = allocated_bytes + floor_transient_bytes + kept * block_bytes + selective * (selective_bytes or 0)
    if offload:
        predicted -= (n - kept) * input_bytes
    return Choice(decisions, offload, predicted, minimum, True)


def _how_many(room: int, cost: int, limit: int) -> int:
    if room < 0:
        return 0
    return limit if cost <= 0 else min(limit, room // cost)


# ---------------------------------------------------------------------------------------------- planner


def _shape_of(args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return None
    return int(hidden.shape[0]), int(hidden.shape[1])


@dataclass
class _Measuring:
    shape: tuple[int, int]
    measurement: BlockMeasurement
    allocated: int
    peak: int


@dataclass
class BudgetPlanner:
    """Plans and applies per-block checkpointing for one model (attached by :func:`attach`)."""

    blocks: list
    settings: CheckpointSettings
    plans: list = field(default_factory=list)  # MemoryPlan, newest last
    current: Optional[MemoryPlan] = None
    measuring: Optional[_Measuring] = None
    highest_seen: int = 0
    warned_unmeasurable: bool = False

    @property
    def budget(self) -> int:
        return int(self.settings.memory_budget or 0)

    def same_request(self, settings: CheckpointSettings, blocks: list) -> bool:
        def plain(s: CheckpointSettings) -> tuple:
            kwargs = without_context_fn(s.kwargs)
            return s.memory_budget, s.selective, sorted(kwargs.items()), s.kwargs is None
        return plain(settings) == plain(self.settings) and [id(b) for b in blocks] == [id(b) for b in self.blocks]

    # -- functions and flags

    def _function(self, selective: bool, offload: bool) -> Callable[..., Any]:
        if self.settings.kwargs is None:  # a caller's own function: used as given
            return self.settings.function
        kwargs = without_context_fn(self.settings.kwargs)
        if selective:
            kwargs["context_fn"] = self.settings.kwargs["context_fn"]
        return build_checkpoint_function(kwargs, offload)

    def apply(self, decisions: tuple, offload: bool) -> None:
        functions = {d: self._function(d == SELECTIVE, offload) for d in set(decisions) if d != KEEP}
        for block, decision in zip(self.blocks, decisions):
            block.__dict__[FLAG] = decision != KEEP
            if decision != KEEP:
                block.__dict__[FUNC] = functions[decision]

    def _floor(self) -> tuple[str, ...]:
        return (CHECKPOINT,) * len(self.blocks)

    def restore(self) -> None:
        """Re-applies the plan in effect (after checkpointing was re-enabled), else the measuring layout."""
        if self.current is not None:
            self.apply(self.current.decisions, self.current.offload)
        else:
            self.apply(self._floor(), False)

    # -- the hook

    def before_first_block(self, block: torch.nn.Module, run: Callable, args: tuple, kwargs: dict) -> None:
        """Called by routing before the first decoder block of each training forward."""
        shape = _shape_of(args, kwargs)
        if shape is None:
            return
        device = (args[0] if args else kwargs["hidden_states"]).device
        memory = device_memory(device)
        if memory is None:
            self._unmeasurable(shape, device)
            return
        allocated, peak = memory.allocated(), memory.max_allocated()
        measuring = self.measuring
        if measuring is not None and all(a <= b for a, b in zip(shape, measuring.shape)):
            self._plan(measuring, allocated, peak)
            return
        plan = next((p for p in reversed(self.plans) if p.covers(shape) and p.status == "planned"), None)
        if plan is not None:
            self._hold(plan, allocated, peak)
            return
        measurement = probe_block(block, run, args, kwargs, selective=bool(self.settings.selective))
        # The probe's own activations are gone; read `allocated` again for the step that starts now.
        self.measuring = _Measuring(shape, measurement, memory.allocated(), memory.max_allocated())
        self.current = None
        self.apply(self._floor(), False)

    def _unmeasurable(self, shape: tuple[int, int], device: torch.device) -> None:
        if self.current is None or self.current.status != "unmeasurable":
            decisions = (SELECTIVE if self.settings.selective else CHECKPOINT,) * len(self.blocks)
            self.current = MemoryPlan("unmeasurable", self.budget, shape, decisions, margin_bytes=self._margin())
            self.plans.append(self.current)
            self.apply(decisions, False)
        if not self.warned_unmeasurable:
            self.warned_unmeasurable = True
            warnings.warn(
                f"memory_budget={format_bytes(self.budget)}: {device} gives no memory statistics, so the budget "
                "cannot be measured; every decoder block stays checkpointed.",
                CompatWarning,
                stacklevel=2,
            )

    def _margin(self) -> int:
        return int(self.budget * MARGIN_FRACTION)

    def _plan(self, measuring: _Measuring, allocated: int, peak: int, correction: int = 0, floor: Optional[tuple] = None) -> None:
        if floor is None:
            exact = peak > measuring.peak
            floor_peak = peak if exact else measuring.peak
            floor = (floor_peak, exact, measuring.allocated)
        floor_peak, exact, floor_allocated = floor
        m = measuring.measurement
        choice = choose_plan(
            num_blocks=len(self.blocks),
            budget_bytes=self.budget,
            margin_bytes=self._margin(),
            allocated_bytes=allocated,
            floor_transient_bytes=max(0, floor_peak - floor_allocated) + correction,
            block_bytes=m.block_bytes,
            input_bytes=m.input_bytes,
            selective_bytes=m.selective_bytes if self.settings.selective else None,
            can_offload=self.settings.kwargs is not None,
        )
        plan = MemoryPlan(
            status="planned",
            budget_bytes=self.budget,
            shape=measuring.shape,
            decisions=choice.decisions,
            offload=choice.offload,
            fits=choice.fits,
            predicted_peak_bytes=choice.predicted_peak_bytes,
            minimum_peak_bytes=choice.minimum_peak_bytes,
            measurement=m,
            floor_peak_bytes=floor_peak,
            floor_peak_exact=exact,
            floor_allocated_bytes=floor_allocated,
            allocated_bytes=allocated,
            margin_bytes=self._margin(),
            correction_bytes=correction,
        )
        self.measuring = None
        self.plans = [p for p in self.plans if not plan.covers(p.shape)] + [plan]
        self.current = plan
        self.highest_seen = peak
        self.apply(plan.decisions, plan.offload)
        if not plan.fits:
            warnings.warn(
                f"memory_budget={format_bytes(self.budget)} cannot be met for batch {plan.shape[0]} x "
                f"{plan.shape[1]} tokens: the least this model needs is about {format_bytes(choice.minimum_peak_bytes)} (every decoder "
                f"block checkpointed{', inputs offloaded to the host' if plan.offload else ''}); training goes on "
                "with that plan.",
                CompatWarning,
                stacklevel=3,
            )

    def _hold(self, plan: MemoryPlan, allocated: int, peak: int) -> None:
        if plan is not self.current:
            self.current = plan
            self.apply(plan.decisions, plan.offload)
        if peak <= self.highest_seen:
            return
        self.highest_seen = peak
        plan = self._replace(plan, observed_peak_bytes=peak)
        if peak <= self.budget or not plan.fits or plan.measurement is None:
            return
        # The planned step went over: re-plan with the difference added to the floor transient.
        excess = peak - (plan.predicted_peak_bytes or peak)
        measuring = _Measuring(plan.shape, plan.measurement, plan.floor_allocated_bytes or 0, plan.floor_peak_bytes or 0)
        floor = (plan.floor_peak_bytes or 0, plan.floor_peak_exact, plan.floor_allocated_bytes or 0)
        self._plan(measuring, allocated, peak, correction=plan.correction_bytes + max(excess, 0), floor=floor)
        warnings.warn(
            f"memory_budget={format_bytes(self.budget)}: a step peaked at {format_bytes(peak)}, "
            f"{format_bytes(excess)} above the plan's prediction; re-planned:\n{self.current}",
            CompatWarning,
            stacklevel=3,
        )

    def _replace(self, plan: MemoryPlan, **changes: Any) -> MemoryPlan:
        updated = replace(plan, **changes)
        self.plans = [updated if p is plan else p for p in self.plans]
        if self.current is plan:
            self.current = updated
        return updated


# ------------------------------------------------------------------------------------------- per model


def attach(model: torch.nn.Module, blocks: list, settings: CheckpointSettings) -> BudgetPlanner:
    """Gives ``model`` a planner for ``settings.memory_budget`` (keeping its plans when the request is unchanged)."""
    state = state_of(model)
    planner = state.planner
    if not isinstance(planner, BudgetPlanner) or not planner.same_request(settings, blocks):
        planner = state.planner = BudgetPlanner(list(blocks), settings)
    planner.settings = settings
    for index, block in enumerate(blocks):
        state_of(block).before_blocks = planner.before_first_block if index == 0 else None
    planner.restore()
    return planner


def detach(model: torch.nn.Module, blocks: list, forget: bool) -> None:
    """Stops planning ``blocks``; ``forget`` drops the model's plans too (else a re-enable keeps them)."""
    for block in blocks:
        state = existing_state(block)
        if state is not None:
            state.before_blocks = None
    state = existing_state(model)
    if forget and state is not None:
        state.planner = None


def memory_plan(model: Any) -> Optional[MemoryPlan]:
    """The memory plan in effect on ``model`` (see :class:`MemoryPlan`), or ``None``.

    ``None`` before the first plan: without a ``memory_budget``, or while the first training step of a shape is
    being measured. ``print(memory_plan(model))`` shows the per-block decisions and the predicted peak.
    """
    state = existing_state(unwrap_model(model))
    planner = state.planner if state is not None else None
    return planner.current if isinstance(planner, BudgetPlanner) else None


def check_budget(model: torch.nn.Module, budget_bytes: int) -> None:
    """Raises `ValueError` when the device holding ``model`` already has more allocated than the budget."""
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        return
    memory = device_memory(parameter.device)
    if memory is not None and memory.allocated() >= budget_bytes:
        raise ValueError(
            f"memory_budget={format_bytes(budget_bytes)} is below the {format_bytes(memory.allocated())} already "
            f"allocated on {parameter.device} (the model's weights included); give a larger budget."
        )
