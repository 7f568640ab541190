"""qwen-ckpt-compat: LoRA + gradient checkpointing for Qwen v1 remote-code models on every transformers release.

```python
from qwen_ckpt_compat import prepare_for_lora

model = prepare_for_lora(model)
```

Importing the package is cheap: torch, transformers and peft are imported only when a function is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .loading import _enable_on_import

__all__ = [
    "CheckpointRequest",
    "CheckpointingNotSupportedError",
    "CompatError",
    "CompatWarning",
    "ModelInfo",
    "MemoryPlan",
    "UnsupportedModelError",
    "UnsupportedTorchError",
    "__version__",
    "StreamingUnavailableError",
    "capabilities",
    "disable_remote_code_loading",
    "enable_remote_code_loading",
    "checkpoint_settings",
    "describe",
    "is_patched",
    "memory_plan",
    "patch",
    "prepare_for_lora",
    "unpatch",
]

_LAZY = {
    "prepare_for_lora": "lora",
    "patch": "patching",
    "unpatch": "patching",
    "is_patched": "patching",
    "checkpoint_settings": "patching",
    "CheckpointRequest": "patching",
    "memory_plan": "budget",
    "MemoryPlan": "budget",
    "describe": "detection",
    "ModelInfo": "detection",
    "capabilities": "versions",
    "CompatError": "errors",
    "CompatWarning": "errors",
    "CheckpointingNotSupportedError": "errors",
    "UnsupportedModelError": "errors",
    "UnsupportedTorchError": "errors",
    "StreamingUnavailableError": "loading",
    "enable_remote_code_loading": "loading",
    "disable_remote_code_loading": "loading",
}

if TYPE_CHECKING:
    from .budget import MemoryPlan, memory_plan
    from .detection import ModelInfo, describe
    from .errors import (
        CheckpointingNotSupportedError,
        CompatError,
        CompatWarning,
        UnsupportedModelError,
        UnsupportedTorchError,
    )
    from .loading import StreamingUnavailableError, disable_remote_code_loading, enable_remote_code_loading
    from .lora import prepare_for_lora
    from .patching import CheckpointRequest, checkpoint_settings, is_patched, patch, unpatch
    from .versions import capabilities


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Lets Qwen-style remote code load on transformers >= 4.57 (see qwen_ckpt_compat.loading; narrow, reversible,
# off with QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1). Cheap: it only registers a post-import hook.
_enable_on_import()
