"""Selective recompute: a checkpointed block keeps the outputs of its expensive operators and recomputes the rest.

Full checkpointing saves a block's input and reruns the whole block in the backward pass. Most of that rerun is
a handful of operators: the attention kernel and the projections (measured on one H200, Qwen-7B shapes at 8,192
tokens: 3.0 ms and 4.1 ms of a block's 15.5 ms forward). Selective recompute keeps the outputs of exactly those:

* the fused attention kernels that ``torch.nn.functional.scaled_dot_product_attention`` dispatches to
  (:data:`ATTENTION_OP_NAMES`);
* matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``) whose inner dimension is at least an eighth of their
  output's width: the frozen projections and LoRA's ``A`` products. LoRA's ``B`` products (inner dimension: the
  rank) are cheaper to recompute than to keep, and so is everything elementwise.

Kept outputs are large (about 0.65 GiB per Qwen-7B block at 8,192 tokens), so where they live matters:

* on CUDA, every kept output of at least :data:`HOST_COPY_MIN_BYTES` goes to pinned host memory, copied on a side
  stream while the forward goes on; in the backward pass a block's outputs come back one block ahead of its
  recompute. The GPU holds them only in flight: the peak stays that of full checkpointing;
* on the CPU they stay where they are (host memory is the device's memory);
* on any other accelerator only the attention outputs are kept (on the device); projections are recomputed.

The mechanism is the one of torch's selective activation checkpointing: a pair of dispatch modes passed to the
non-reentrant checkpoint as its ``context_fn``, one that keeps outputs during the forward and one that serves
them during the recompute (torch's own, ``create_selective_checkpoint_contexts``, keeps outputs on the device
only; ``torch.compile`` gets that one, see :class:`SelectiveRecompute`). It needs torch >= 2.5, the first
release whose checkpoint supports this contract. An output changed in place after it was kept is recomputed
instead of served.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.utils.checkpoint  # torch 2.0's `import torch` does not import it
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._checkpoint_layer import FUNC
from .._model_state import state_of
from .._settings import CheckpointSettings, build_checkpoint_function, without_context_fn
from ..errors import CompatWarning, UnsupportedTorchError

__all__ = [
    "ATTENTION_OP_NAMES",
    "HOST_COPY_MIN_BYTES",
    "KeptOnDeviceRecorder",
    "MIN_TOKENS",
    "SelectivePlanner",
    "SelectiveRecompute",
    "attach",
    "attention_ops",
    "keeps_output",
    "require_selective_checkpointing",
    "selective_checkpointing_available",
    "stays_on_device",
    "storage_key",
    "tensors_in",
]

#: The aten operators of the fused attention kernels that ``torch.nn.functional.scaled_dot_product_attention``
#: dispatches to (the names that exist in the installed torch are used). The unfused "math" fallback decomposes
#: into matrix products and a softmax; the matmul rule keeps its second product (the attention output) and, at
#: sequences no longer than 8 x the head size, its first (the scores).
ATTENTION_OP_NAMES: tuple[str, ...] = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)

#: Kept CUDA outputs of at least this many bytes live in pinned host memory; smaller ones (LoRA's ``A`` products,
#: log-sum-exps) stay on the GPU, where a copy would cost more than it frees.
HOST_COPY_MIN_BYTES = 1 << 20

#: A matrix product's output is kept when its inner dimension is at least this fraction of the output's width.
_INNER_TO_WIDTH = 1 / 8

_API = "torch.utils.checkpoint.create_selective_checkpoint_contexts"

#: Selective recompute is used for a batch whose hidden states hold at least this many tokens (batch x sequence);
#: below, a checkpointed block is recomputed whole. The per-operator dispatch costs more than the recompute it
#: saves on short sequences (measured on one H200, Qwen-7B shapes: see docs/performance.md). The environment
#: variable ``QWEN_CKPT_COMPAT_SELECTIVE_MIN_TOKENS`` replaces it (0: selective at every length).
MIN_TOKENS = 6144
MIN_TOKENS_ENV = "QWEN_CKPT_COMPAT_SELECTIVE_MIN_TOKENS"

logger = logging.getLogger(__name__)


def selective_checkpointing_available() -> bool:
    """Whether the installed torch supports selective recompute in its checkpoint (torch >= 2.5)."""
    return callable(getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None))


def require_selective_checkpointing() -> None:
    """Raises `UnsupportedTorchError` when the installed torch has no selective activation checkpointing."""
    if not selective_checkpointing_available():
        raise UnsupportedTorchError(
            f"selective recompute needs torch >= 2.5 ({_API}); torch {torch.__version__} is installed. "
            "Upgrade torch, or use memory_budget= / every_n_layers= to recompute fewer blocks instead."
        )


def attention_ops() -> tuple[Any, ...]:
    """The ``torch.ops.aten`` overloads of :data:`ATTENTION_OP_NAMES` that the installed torch has."""
    found = []
    for name in ATTENTION_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        overload = getattr(packet, "default", None) if packet is not None else None
        if overload is not None:
            found.append(overload)
    return tuple(found)


# A matrix product's overload -> the index of its left operand (the right one follows it).
_MATMULS = {
    torch.ops.aten.mm.default: 0,
    torch.ops.aten.bmm.default: 0,
    torch.ops.aten.addmm.default: 1,
    torch.ops.aten.baddbmm.default: 1,
}


def keeps_output(func: Any, args: tuple) -> bool:
    """Whether selective recompute keeps the output of the aten operator ``func`` called with ``args``.

    The answer depends on the operator, the operands' shapes and their device only, so the recompute, which
    calls the same operators on the same shapes, asks again and gets the same answer.
    """
    if func in _ATTENTION:
        return True
    first = _MATMULS.get(func)
    if first is None:
        return False
    left, right = args[first], args[first + 1]
    if left.device.type not in ("cpu", "cuda"):  # no host memory to put it in: recomputed
        return False
    return left.shape[-1] >= right.shape[-1] * _INNER_TO_WIDTH


def stays_on_device(tensor: torch.Tensor) -> bool:
    """Whether a kept output stays in device memory (``False``: it is copied to pinned host memory)."""
    return not (tensor.is_cuda and _nbytes(tensor) >= HOST_COPY_MIN_BYTES and _dense(tensor))


def storage_key(tensor: torch.Tensor) -> Optional[tuple]:
    """(device, address) of the storage ``tensor`` lives in; ``None`` for an empty one."""
    try:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without storage (some subclasses)
        return ("id", id(tensor))
    return (str(tensor.device), pointer) if pointer else None


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a nest of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


class KeptOnDeviceRecorder(TorchDispatchMode):
    """Records the outputs selective recompute keeps in device memory (:func:`keeps_output` and
    :func:`stays_on_device`), one per storage, holding them while it is entered so that no two share an address.
    The memory budget's probe counts their bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if keeps_output(func, args):
            for tensor in tensors_in(out):
                key = storage_key(tensor)
                if key is not None and stays_on_device(tensor):
                    self.kept.setdefault(key, tensor)
        return out


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dense(tensor: torch.Tensor) -> bool:
    """A tensor that fills its whole storage: a pinned buffer with the same strides is a byte-for-byte copy."""
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == _nbytes(tensor)


def _written_tensors(func: Any, args: tuple, kwargs: dict) -> list:
    """The tensors an aten operator writes to (``add_``'s self, ``out=`` arguments...)."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        info = argument.alias_info
        if info is None or not info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


def _signature(args: tuple) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor))


@dataclass
class _Kept:
    """One kept output: its tree of values, where tensors may be pinned host copies still to come back."""

    spec: Any
    values: list
    signature: tuple
    on_host: list  # indices into values
    device: Optional[torch.device] = None  # where the host copies came from
    stale: bool = False


@dataclass(eq=False)
class _BlockOutputs:
    """The outputs one checkpointed block call kept, per operator in call order."""

    owner: SelectiveRecompute
    kept: dict = field(default_factory=lambda: collections.defaultdict(collections.deque))
    by_storage: dict = field(default_factory=dict)
    ready: Optional[Any] = None  # the CUDA event after which every host copy is back on the device
    fetched: bool = False

    def keep(self, func: Any, args: tuple, out: Any) -> None:
        leaves, spec = tree_flatten(out)
        values: list = []
        entry = _Kept(spec, values, _signature(args), on_host=[])
        self.kept[func].append(entry)  # in call order, kept or not: the recompute takes them in the same order
        if not all(type(leaf) in (torch.Tensor, torch.nn.Parameter) for leaf in leaves if isinstance(leaf, torch.Tensor)):
            entry.stale = True  # a tensor subclass (DTensor...): recomputed
            return
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                values.append(leaf)
                continue
            storage = leaf.untyped_storage()
            self.by_storage[storage.data_ptr()] = (entry, weakref.ref(storage))
            if stays_on_device(leaf):
                values.append(leaf.detach())
                continue
            try:
                values.append(self.owner.copy_to_host(leaf))
            except RuntimeError as error:  # no pinned host memory left
                self.owner.warn_no_host_memory(error)
                entry.stale = True
                return
            entry.on_host.append(len(values) - 1)
            entry.device = leaf.device

    def mark_written(self, tensors: list) -> None:
        """An operator wrote to ``tensors``: outputs kept in their storage are recomputed, not served."""
        for tensor in tensors:
            if type(tensor) is not torch.Tensor:
                continue
            found = self.by_storage.get(tensor.untyped_storage().data_ptr())
            # Another tensor on the storage keeps it (and torch its Python object) alive after the output itself
            # is gone, as ``F.linear`` without bias on a 3-d input does; a dead storage's memory may belong to
            # another tensor by now.
            if found is not None and found[1]() is not None:
                found[0].stale = True

    def fetch(self) -> None:
        """Starts copying this block's host copies back to the device (once)."""
        if self.fetched:
            return
        self.fetched = True
        self.by_storage.clear()  # the forward is over: nothing is written any more
        copies = [(entry, i) for queue in self.kept.values() for entry in queue if not entry.stale for i in entry.on_host]
        if copies:
            self.ready = self.owner.copy_to_device(copies[0][0].device, copies)

    def take(self, func: Any, args: tuple) -> Optional[Any]:
        """The output kept for this call of ``func``, or ``None`` when it must be recomputed."""
        queue = self.kept.get(func)
        if not queue:
            return None
        entry = queue.popleft()
        if entry.stale or entry.signature != _signature(args):
            return None
        if entry.on_host:
            assert self.ready is not None  # _ServeKept.__enter__ fetched this block's host copies
            torch.cuda.current_stream(entry.device).wait_event(self.ready)
        return tree_unflatten(entry.values, entry.spec)


class _BlockMode(TorchDispatchMode):
    """A dispatch mode of one checkpointed block call, sharing that call's kept outputs with its twin."""

    def __init__(self, outputs: _BlockOutputs) -> None:
        super().__init__()
        self.outputs = outputs


class _KeepOutputs(_BlockMode):
    """The forward context: runs every operator and keeps the outputs :func:`keeps_output` names.

    torch's checkpoint enters it only for a forward that records a graph (never under ``torch.no_grad()``).
    """

    def __enter__(self) -> Any:
        self.outputs.owner.register(self.outputs)
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.outputs.by_storage and getattr(getattr(func, "_schema", None), "is_mutable", False):
            self.outputs.mark_written(_written_tensors(func, args, kwargs))
        if keeps_output(func, args):
            self.outputs.keep(func, args, out)
        return out


class _ServeKept(_BlockMode):
    """The recompute context: serves kept outputs instead of running their operators; runs everything else."""

    def __enter__(self) -> Any:
        self.outputs.owner.prefetch(self.outputs)
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if keeps_output(func, args):
            served = self.outputs.take(func, args)
            if served is not None:
                return served
        return func(*args, **(kwargs or {}))


class SelectiveRecompute(functools.partial):
    """The ``context_fn`` of selective recompute for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    One instance serves every block of a model: it owns the side streams of the host copies and knows the order
    in which blocks kept their outputs, so that the backward pass brings a block's outputs back while the block
    after it (in forward order) is still being recomputed.

    It is also ``functools.partial(create_selective_checkpoint_contexts, attention_ops())``, and that is what
    ``torch.compile`` sees: code that dynamo compiles cannot run these dispatch modes (it takes a ``context_fn``
    only as a plain function or a ``functools.partial`` of torch's own), so a compiled checkpoint keeps the
    attention outputs on the device with torch's selective checkpointing; eager code calls this class's
    ``__call__``.

    Raises:
        `UnsupportedTorchError` (a `RuntimeError`): torch < 2.5.
    """

    def __new__(cls) -> SelectiveRecompute:
        require_selective_checkpointing()
        create = torch.utils.checkpoint.create_selective_checkpoint_contexts
        return super().__new__(cls, create, list(attention_ops()))

    def __init__(self) -> None:
        self._streams: dict = {}
        self._order: list = []  # weak references to _BlockOutputs, in forward order
        self._warned = False

    def __call__(self) -> tuple[TorchDispatchMode, TorchDispatchMode]:
        outputs = _BlockOutputs(self)
        return _KeepOutputs(outputs), _ServeKept(outputs)

    def __repr__(self) -> str:
        return "SelectiveRecompute()"

    def __deepcopy__(self, memo: dict) -> SelectiveRecompute:  # streams and kept outputs belong to one model
        return type(self)()

    def __reduce__(self) -> tuple:
        return (type(self), ())

    # -- order of blocks

    def register(self, outputs: _BlockOutputs) -> None:
        self._order = [ref for ref in self._order if ref() is not None]
        self._order.append(weakref.ref(outputs))

    def prefetch(self, outputs: _BlockOutputs) -> None:
        """Before ``outputs``' recompute: its own copies, then those of the block before it."""
        outputs.fetch()
        alive = [ref() for ref in self._order]
        for index, candidate in enumerate(alive):
            if candidate is outputs:
                earlier = alive[index - 1] if index > 0 else None
                if earlier is not None:
                    earlier.fetch()
                break

    # -- host copies

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def copy_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of ``tensor``, started on the side stream after what the device has queued."""
        stream = self._stream(tensor.device)
        host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        return host

    def warn_no_host_memory(self, error: RuntimeError) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"selective recompute could not get pinned host memory for a kept output ({error}); outputs that "
                "do not fit are recomputed instead, as with full checkpointing.",
                CompatWarning,
                stacklevel=2,
            )

    def copy_to_device(self, device: torch.device, copies: list) -> Any:
        """Starts copying ``copies`` (kept entries, value indices) back to ``device``; returns the event that ends them."""
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        for entry, index in copies:
            host = entry.values[index]
            back = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
            with torch.cuda.stream(stream):
                back.copy_(host, non_blocking=True)
            back.record_stream(stream)
            entry.values[index] = back
        event = torch.cuda.Event()
        event.record(stream)
        return event


_ATTENTION = frozenset(attention_ops())



# ------------------------------------------------------------------------------------------ per shape


def _tokens(args: tuple, kwargs: dict) -> Optional[int]:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return None
    return int(hidden.shape[:-1].numel())  # batch-first or sequence-first alike


@dataclass(eq=False)
class SelectivePlanner:
    """Decides, per batch shape, whether the checkpointed blocks of one model use selective recompute.

    Before the first decoder block of each training forward (``State.before_blocks``), the tokens of the batch are
    counted: with at least :data:`MIN_TOKENS`, every checkpointed block gets the selective checkpoint function,
    else the plain one (whole-block recompute, the cheaper one there). Each new decision is logged once, and
    :attr:`decisions` keeps them, by token count.
    """

    blocks: list
    settings: CheckpointSettings
    min_tokens: Optional[int] = None  # None: MIN_TOKENS_ENV if set, else MIN_TOKENS
    decisions: dict = field(default_factory=dict)  # tokens -> bool (selective used)
    current: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.min_tokens is None:
            self.min_tokens = int(os.environ.get(MIN_TOKENS_ENV, "") or MIN_TOKENS)
        assert self.settings.kwargs is not None and "context_fn" in self.settings.kwargs
        plain = without_context_fn(self.settings.kwargs)
        self._functions = {True: self.settings.function, False: build_checkpoint_function(plain, self.settings.offload)}

    def before_first_block(self, block: torch.nn.Module, run: Any, args: tuple, kwargs: dict) -> None:
        tokens = _tokens(args, kwargs)
        if tokens is None:
            return
        use = tokens >= int(self.min_tokens or 0)
        if tokens not in self.decisions:
            self.decisions[tokens] = use
            logger.info(
                "selective recompute %s for %d tokens (threshold %d)", "used" if use else "not used", tokens, self.min_tokens
            )
        if use is not self.current:
            self.current = use
            function = self._functions[use]
            for routed in self.blocks:
                if FUNC in routed.__dict__:
                    routed.__dict__[FUNC] = function


def attach(model: torch.nn.Module, blocks: list, settings: CheckpointSettings) -> SelectivePlanner:
    """Gives ``model`` a :class:`SelectivePlanner` for its decoder blocks (``settings.selective`` is on)."""
    planner = SelectivePlanner(list(blocks), settings)
    state_of(model).planner = planner
    for index, block in enumerate(blocks):
        state_of(block).before_blocks = planner.before_first_block if index == 0 else None
    return planner
