"""See what checkpointing really did while some code ran: for tests, CI and the examples.

```python
from qwen_ckpt_compat.testing import watch_checkpointing

with watch_checkpointing(model) as seen:
    trainer.train()
assert seen.use_reentrant == {False}           # what torch.utils.checkpoint.checkpoint received
assert seen.every_block_recomputed()           # each decoder block ran again in the backward pass
```

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

__all__ = ["CheckpointWatch", "watch_checkpointing"]


@dataclass
class CheckpointWatch:
    """What :func:`watch_checkpointing` saw.

    Attributes:
        block_runs (`Counter`): decoder block index -> how often its forward ran (a recompute runs it again).
        num_blocks (`int`): how many decoder blocks the model has.
        checkpoint_calls (`list[dict]`): the keyword arguments of every ``torch.utils.checkpoint.checkpoint`` call.
        first_block_lengths (`list[int]`): the sequence length of every input to the first decoder block; while
            generating with a KV cache, the prompt's length and then 1 for each new token.
    """

    block_runs: Counter = field(default_factory=Counter)
    num_blocks: int = 0
    checkpoint_calls: List[dict] = field(default_factory=list)
    first_block_lengths: List[int] = field(default_factory=list)

    @property
    def use_reentrant(self) -> set:
        """The ``use_reentrant`` values torch received (``None`` where a call did not pass it: torch's default)."""
        return {call.get("use_reentrant") for call in self.checkpoint_calls}

    def every_block_recomputed(self) -> bool:
        """Whether every decoder block ran at least twice: forward, then again in the backward pass."""
        return self.num_blocks > 0 and all(self.block_runs[i] >= 2 for i in range(self.num_blocks))

    def used_kv_cache(self) -> bool:
        """Whether, after the first input, each input to the first block was a single new token."""
        return len(self.first_block_lengths) > 1 and set(self.first_block_lengths[1:]) == {1}


def _sequence_length(args: tuple, kwargs: dict) -> Optional[int]:
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    shape = getattr(hidden_states, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


@contextlib.contextmanager
def watch_checkpointing(model: Any) -> Iterator[CheckpointWatch]:
    """Records, while the ``with`` block runs, how often each decoder block ran and what torch's checkpoint received.

    ``torch.utils.checkpoint.checkpoint`` is replaced by a recording wrapper for the duration (process-wide: use it
    in tests and examples, never in production code). Calls that look the function up when they run are seen:
    this library's routed blocks and Qwen v1's own remote code; a copy bound earlier (``from
    torch.utils.checkpoint import checkpoint`` at import time, as transformers does) is not.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`): the model whose decoder blocks (the classes named in
            ``_no_split_modules``, else the class of the layer list its code checkpoints) are watched.

    Yields:
        `CheckpointWatch`: filled in while the block runs.
    """
    import torch.utils.checkpoint

    from .._detection import found_block_names, is_decoder_block, unwrap_model

    root = unwrap_model(model)
    names = set(found_block_names(root))
    blocks = [module for module in root.modules() if is_decoder_block(module, names)]
    seen = CheckpointWatch(num_blocks=len(blocks))
    original = torch.utils.checkpoint.checkpoint

    def recording_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
        seen.checkpoint_calls.append(dict(kwargs))
        return original(function, *args, **kwargs)

    def count(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            seen.block_runs[index] += 1
            if index == 0:
                length = _sequence_length(args, kwargs)
                if length is not None:
                    seen.first_block_lengths.append(length)

        return hook

    handles = [block.register_forward_pre_hook(count(i), with_kwargs=True) for i, block in enumerate(blocks)]
    torch.utils.checkpoint.checkpoint = recording_checkpoint
    try:
        yield seen
    finally:
        torch.utils.checkpoint.checkpoint = original
        for handle in handles:
            handle.remove()
