"""What every check of the doctor is given: the model's files and facts, the installation, and the problems found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .environment import Runtime
from .model import ModelFacts, ModelFiles
from .report import Problem

__all__ = ["CheckContext"]


@dataclass
class CheckContext:
    """One run of the checks: each check reads the model and the runtime, and adds the problems it finds."""

    model: ModelFiles
    facts: ModelFacts
    runtime: Runtime
    problems: list = field(default_factory=list)

    @property
    def caps(self) -> Any:
        return self.runtime.caps

    @property
    def transformers(self) -> str:
        return str(self.runtime.versions.get("transformers"))

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.problems.append(Problem(*args, **kwargs))

    def fixed_by_loading_hook(self) -> Optional[str]:
        """Who fixes what the import hook fixes: the hook, which prepares Qwen-style and old-API classes as they load."""
        return "import" if self.facts.qwen_style or self.facts.old_api else None
