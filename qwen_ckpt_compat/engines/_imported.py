"""Looking up an engine's class without importing the engine."""

from __future__ import annotations

import sys
from typing import Any


def loaded_class(module: str, name: str) -> Any:
    """``module.name`` if ``module`` is imported, else ``None``: an object can only be an engine's if the engine is
    imported. Typed ``Any``: an engine's class, unknown here."""
    return getattr(sys.modules.get(module), name, None)
