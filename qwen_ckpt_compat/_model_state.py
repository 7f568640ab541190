"""What this library keeps on a model and its modules: one state object, under one attribute.

Every module this library has to remember something about carries one :class:`State` in its ``__dict__`` (under
:data:`ATTRIBUTE`), so that what the library put on a model can be read, printed and removed as one thing
(:func:`clear`). The model-level fields are used on the module checkpointing was enabled on (the model itself, or
the sub-model whose construction enabled it); the others on owners, blocks and attention modules. The two
attributes native checkpointing layers carry too (``gradient_checkpointing`` and ``_gradient_checkpointing_func``)
are set on the blocks under their own names, as transformers sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["ATTRIBUTE", "State", "clear", "existing_state", "state_of"]

ATTRIBUTE = "_qcc_state"


@dataclass
class State:
    """What the library keeps about one module.

    Attributes:
        defaults (`CheckpointRequest`, *optional*): on a model: what an enable call that expresses no preference
            checkpoints with (``prepare_for_lora``'s options).
        settings (`CheckpointSettings`, *optional*): on a model: the settings checkpointing was last enabled with.
        input_grads_hook (`RemovableHandle`, *optional*): on a model: the library's input-embedding hook.
        planner (`Any`): on a model: the speed wing's planner (memory budget, selective recompute per shape), kept
            while checkpointing is off.
        routes (`bool`): on a block owner: its blocks are checkpointed by the library.
        saved (`dict`, *optional*): on a block: its checkpointing attributes before it was first routed.
        before_blocks (`Callable`, *optional*): on the first block: called before each training forward.
        engine_checkpoints (`bool`): on a block: an engine's own activation checkpointing wraps it.
        checkpoint_forward (`bool`): on a block, during one call: checkpoint ``forward`` inside the engine's hooks.
        reentrant (`bool`): on a routed block: its settings ask for torch's reentrant checkpoint.
        fused_attention (`str`, *optional*): on an attention module: when the fused causal kernel may run
            (``"training"``: training calls only, no KV cache; ``"always"``: every call whose mask is purely causal).
        chunked_loss (`Any`): on an LM-head model: the chunked loss's settings (the speed wing's), or ``None``.
        warned (`set[str]`): warnings given once about this module.
    """

    defaults: Optional[Any] = None
    settings: Optional[Any] = None
    input_grads_hook: Any = None
    planner: Any = None
    routes: bool = False
    saved: Optional[dict] = None
    before_blocks: Optional[Callable[..., None]] = None
    engine_checkpoints: bool = False
    checkpoint_forward: bool = False
    reentrant: bool = False
    fused_attention: Optional[str] = None
    chunked_loss: Any = None
    warned: set = field(default_factory=set)

    def warn_once(self, key: str) -> bool:
        """``True`` the first time ``key`` is asked about (then the caller warns)."""
        if key in self.warned:
            return False
        self.warned.add(key)
        return True


def state_of(module: Any) -> State:
    """The :class:`State` of ``module``; a new one if it has none."""
    state = module.__dict__.get(ATTRIBUTE)
    if state is None:
        state = module.__dict__[ATTRIBUTE] = State()
    return state


def existing_state(module: Any) -> Optional[State]:
    """The :class:`State` of ``module``, or ``None`` when the library keeps nothing about it.

    Read with ``getattr`` (the instance's ``__dict__`` first, as :func:`state_of` writes it): ``torch.compile``
    guards an attribute read, not a lookup in ``__dict__``, and without that guard a model compiled before
    another of its class was prepared would reuse the graph of the unprepared one.
    """
    return getattr(module, ATTRIBUTE, None)


def clear(module: Any) -> Optional[State]:
    """Removes the :class:`State` of ``module``; returns it (``None`` if there was none)."""
    return module.__dict__.pop(ATTRIBUTE, None)
