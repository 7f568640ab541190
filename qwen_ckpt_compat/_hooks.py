"""Where the wings plug into the core: the questions the core asks of training engines and of the speed options.

The core (loading, detection, the class patch, the checkpoint layer, ``prepare_for_lora``) never imports a wing.
It asks the two objects below, whose defaults describe a process with no wing plugged in (no engine wrappers, no
speed options). A wing replaces one of them with an object of its own when it is imported:

* :func:`engine_hooks` (an :class:`EngineHooks`), filled by :mod:`qwen_ckpt_compat.engines`: wrappers around a model,
  classes swapped by an engine, input-casting hooks, an engine's own activation checkpointing, layers whose
  activations non-reentrant checkpointing cannot free;
* :func:`speed_hooks` (a :class:`SpeedHooks`), filled by :mod:`qwen_ckpt_compat.speed`: the memory budget, selective
  recompute, the fused attention kernel and the chunked loss.

The families wing registers into :mod:`qwen_ckpt_compat._family_registry` instead.

Which wings exist is said once, by the package ``__init__`` (:func:`plug`, with module names, so that importing
the package stays cheap); :func:`load_wing` imports one the first time the core needs its answer (the doctor,
which must work where torch is broken, reads the family registry without importing the torch-based wings).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Iterator, Optional

__all__ = ["EngineHooks", "SpeedHooks", "engine_hooks", "load_wing", "plug", "set_engine_hooks", "set_speed_hooks", "speed_hooks"]

_pending: dict = {}  # wing ("engines", "speed", "families") -> its module, until imported
_lock = threading.RLock()


def plug(**wings: str) -> None:
    """Names the module of each wing (``engines=``, ``speed=``, ``families=``), imported on first need."""
    with _lock:
        _pending.update(wings)


def load_wing(wing: str) -> None:
    """Imports the module :func:`plug` named for ``wing``, once (it registers itself when imported)."""
    if wing not in _pending:
        return
    with _lock:
        module = _pending.pop(wing, None)
        if module is None:
            return
        try:
            importlib.import_module(module)
        except BaseException:
            _pending[wing] = module
            raise


class EngineHooks:
    """What training engines do to a model; the defaults are those of a bare model (no engine)."""

    def unwrap(self, obj: Any) -> Any:
        """The module inside every engine wrapper around ``obj`` (DDP, FSDP1, DeepSpeed, ``torch.compile``)."""
        return obj

    def own_class(self, cls: type) -> type:
        """The class the model's code defined, under a class an engine swapped in (FSDP2)."""
        return cls

    def checkpoints_inside_hooks(self, module: Any) -> bool:
        """Whether ``module`` must checkpoint its ``forward`` inside its hooks (FSDP2 casts inputs there)."""
        return False

    def outer_checkpointed_blocks(self, root: Any) -> Iterator[Any]:
        """The modules under ``root`` that an engine's own activation checkpointing already wraps."""
        return iter(())

    def non_reentrant_keeps_activations(self, model: Any) -> bool:
        """Whether layers of ``model`` keep their inputs outside torch's saved-tensor hooks (bitsandbytes 8-bit)."""
        return False


class SpeedHooks:
    """The speed options' part in the core's work; the defaults refuse every option (no speed wing)."""

    def validate(self, model: Any, memory_budget: Any, selective: bool) -> Optional[int]:
        """Checks ``memory_budget`` and ``selective`` for ``model``; returns the budget in bytes (or ``None``)."""
        if memory_budget is not None or selective:
            raise RuntimeError("memory_budget and selective need qwen_ckpt_compat.speed, which is not plugged in")
        return None

    def selective_available(self) -> bool:
        """Whether the installed torch can do selective recompute (torch >= 2.5)."""
        return False

    def attention_class_names(self) -> tuple:
        """The remote attention classes whose mask the fused attention kernel knows."""
        return ()

    def selective_context(self) -> Optional[Callable[..., Any]]:
        """A fresh ``context_fn`` for selective recompute, or ``None`` where the installed torch cannot do it."""
        return None

    def selective_unavailable(self) -> str:
        """Why :meth:`selective_context` gives nothing, for a warning."""
        return "qwen_ckpt_compat.speed is not plugged in"

    def plan_blocks(self, model: Any, blocks: list, settings: Any) -> None:
        """Plans, per batch shape, how each decoder block of ``model`` is checkpointed under ``settings`` (a memory
        budget, selective recompute); the plan sets the blocks' flags and functions before each training forward,
        through the first block's ``State.before_blocks``. Nothing to plan: an earlier plan is dropped."""

    def stop_planning(self, model: Any, blocks: list, forget: bool) -> None:
        """Stops planning ``blocks``; ``forget`` drops the plans too (else a re-enable keeps them)."""

    def set_fused_attention(
        self, model: Any, mode: Optional[str], wrap: Callable[[type, str, Callable], None]
    ) -> int:
        """Turns the fused attention kernel on (``mode`` ``"training"`` or ``"always"``) or off (``None``).

        Returns how many attention modules of a known kind ``model`` has.
        """
        return 0

    def set_chunked_loss(
        self, model: Any, tokens: Optional[int], keep_logits: bool, wrap: Callable[[type, str, Callable], None]
    ) -> bool:
        """Turns the chunked loss on (``tokens`` per chunk) or off (``None``); returns whether the LM head of
        ``model`` computes its loss in a way the speed wing knows."""
        return False


_installed: dict = {"engines": EngineHooks(), "speed": SpeedHooks()}


def engine_hooks() -> EngineHooks:
    """The engine answers in effect (the engines wing's, once plugged in)."""
    load_wing("engines")
    return _installed["engines"]


def speed_hooks() -> SpeedHooks:
    """The speed options in effect (the speed wing's, once plugged in)."""
    load_wing("speed")
    return _installed["speed"]


def set_engine_hooks(hooks: EngineHooks) -> None:
    """Called by the engines wing when it is imported."""
    _installed["engines"] = hooks


def set_speed_hooks(hooks: SpeedHooks) -> None:
    """Called by the speed wing when it is imported."""
    _installed["speed"] = hooks
