"""qwen-ckpt-compat: LoRA + gradient checkpointing for Qwen v1 remote-code models on every transformers release.

```python
from qwen_ckpt_compat import prepare_for_lora

model = prepare_for_lora(model)
```

Importing the package is cheap: torch, transformers and peft are imported only when a function is used.

This module is the contract: what ``__all__`` lists is the public API; every module whose name starts with an
underscore is the core's implementation and may change. The house:

* the core (private modules): the import hook (``_loading``), detection (``_detection``), the class patch
  (``_class_patch``), the per-block checkpoint layer (``_checkpoint_layer``) with its settings (``_settings``),
  ``prepare_for_lora`` (``_lora``), the repairs of removed APIs (``_repairs``), the patch registry (``_patches``),
  the per-model state (``_model_state``), the family registry (``_family_registry``) and the points where the
  wings plug in (``_hooks``);
* the wings, which the core never imports: ``speed`` (memory budget, selective recompute, fused attention),
  ``engines`` (DDP, FSDP, DeepSpeed, bitsandbytes), ``families`` (one module per model family) and ``doctor``
  (the ``qwen-ckpt-compat doctor`` command). They are named here and imported when the core first needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._hooks import plug
from ._loading import enable_on_import
from ._version import __version__

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
    "prepare_for_lora": "_lora",
    "patch": "_preparation",
    "unpatch": "_class_patch",
    "is_patched": "_class_patch",
    "checkpoint_settings": "_class_patch",
    "CheckpointRequest": "_settings",
    "memory_plan": "speed.budget",
    "MemoryPlan": "speed.budget",
    "describe": "_description",
    "ModelInfo": "_description",
    "capabilities": "_versions",
    "CompatError": "errors",
    "CompatWarning": "errors",
    "CheckpointingNotSupportedError": "errors",
    "UnsupportedModelError": "errors",
    "UnsupportedTorchError": "errors",
    "StreamingUnavailableError": "errors",
    "enable_remote_code_loading": "_loading",
    "disable_remote_code_loading": "_loading",
}

if TYPE_CHECKING:
    from ._class_patch import checkpoint_settings, is_patched, unpatch
    from ._description import ModelInfo, describe
    from ._loading import disable_remote_code_loading, enable_remote_code_loading
    from ._lora import prepare_for_lora
    from ._preparation import patch
    from ._settings import CheckpointRequest
    from ._versions import capabilities
    from .errors import (
        CheckpointingNotSupportedError,
        CompatError,
        CompatWarning,
        StreamingUnavailableError,
        UnsupportedModelError,
        UnsupportedTorchError,
    )
    from .speed.budget import MemoryPlan, memory_plan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# The wings, imported when the core first asks them something (qwen_ckpt_compat._hooks).
plug(engines=f"{__name__}.engines", speed=f"{__name__}.speed", families=f"{__name__}.families")

# Prepares old remote code when transformers loads it, and lets Qwen-style code load on transformers >= 4.57
# (qwen_ckpt_compat._loading; narrow, reversible, off with QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1). Cheap: it only
# registers a post-import hook.
enable_on_import()
