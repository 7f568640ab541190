"""The doctor's report: problems, the report itself (JSON, text), and the exit status it implies."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from .._loading import NO_IMPORT_HOOK_ENV
from .._repairs.streaming import STREAM_PACKAGE
from .._version import __version__

__all__ = [
    "FIXED_BY",
    "PROBLEM_IDS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "DoctorInputError",
    "Problem",
    "Report",
    "render_text",
    "use_colour",
]

SCHEMA_VERSION = 3
#: The JSON Schema of :meth:`Report.to_json` (documented in docs/doctor.md).
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"

#: The library calls that can fix a problem; ``None`` in a problem means the library cannot fix it.
FIXED_BY = ("import", "patch", "prepare_for_lora")

#: Every problem id the doctor can report (docs/doctor.md explains each; schema.json lists them). Ids are stable:
#: a new kind of problem gets a new id (and a new schema version); an id is never reused for something else.
PROBLEM_IDS = frozenset(
    {
        # the installation
        "torch-unusable",
        "transformers-unusable",
        "peft-unusable",
        "accelerate-too-old",
        "peft-too-old-for-transformers",
        "peft-fails-with-transformers",
        "resume-from-checkpoint-fails",
        # the model
        "no-model-type",
        "unknown-model-type",
        "checkpointing-not-supported",
        "old-gc-api-reentrant-only",
        "old-gc-api-enable-typeerror",
        "old-gc-api-kwargs-ignored",
        "lora-no-input-grads",
        "options-not-honoured",
        "import-before-loading",
        "stream-generator-missing",
        "stream-generator-broken",
        "chat-stream-unavailable",
        "missing-package",
        "removed-transformers-import",
        "removed-api-called",
        "config-attribute-missing",
        "checkpointing-enabled-on-load",
        "load-raises-enable-typeerror",
        "import-hook-disabled",
        "enable-override-enables-nothing",
        # the tokenizer
        "tokenizer-pad-padding-side",
        "tokenizer-attributes-after-base-init",
        "tokenizer-saved-special-tokens",
        "tokenizer-saved-switches-dropped",
        # measured family facts (each family module's doctor_facts)
        "internlm-nan-loss",
        "qwen-vl-vision-tower",
    }
)


class DoctorInputError(Exception):
    """The doctor cannot read its input (exit status 2); ``path`` names what could not be read."""

    def __init__(self, path: Any, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


@dataclass(frozen=True)
class Problem:
    """One thing that is wrong, or will go wrong, on this installation with this model.

    Attributes:
        id (`str`): stable identifier of the kind of problem (see docs/doctor.md).
        summary (`str`): one line saying what happens.
        fix (`str`): what to do: the library call when the library fixes it, else the user's fix.
        fixed_by (`str`, *optional*): ``"import"``, ``"patch"`` or ``"prepare_for_lora"``: the library call that
            fixes it (``prepare_for_lora`` calls ``patch``); ``None`` when the library cannot.
        needs_action (`bool`): loading or LoRA training with checkpointing fails, or silently does something else
            than asked, even when the library is used as documented. Drives exit status 1.
        subject (`str`, *optional*): what the problem is about when a kind can occur more than once (a package,
            a method, a config attribute).
    """

    id: str
    summary: str
    fix: str
    fixed_by: Optional[str] = None
    needs_action: bool = False
    subject: Optional[str] = None

    def __post_init__(self) -> None:
        if self.id not in PROBLEM_IDS:
            raise ValueError(f"unknown problem id {self.id!r}: add it to PROBLEM_IDS and docs/doctor.md")
        if self.fixed_by is not None and self.fixed_by not in FIXED_BY:
            raise ValueError(f"fixed_by must be one of {FIXED_BY} or None, got {self.fixed_by!r}")

    @property
    def fixed_by_library(self) -> bool:
        return self.fixed_by is not None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "subject": self.subject,
            "summary": self.summary,
            "fixed_by_library": self.fixed_by_library,
            "fixed_by": self.fixed_by,
            "fix": self.fix,
            "needs_action": self.needs_action,
        }


@dataclass
class Report:
    """Everything the doctor found; :meth:`to_json` follows ``schema.json``."""

    argument: Optional[str]
    path: Optional[str] = None
    source: Optional[str] = None  # "directory" or "hub-cache"
    versions: dict = field(default_factory=dict)
    capabilities: Optional[dict] = None
    environment: Optional[dict] = None
    model: Optional[dict] = None
    problems: list = field(default_factory=list)
    error: Optional[DoctorInputError] = None

    @property
    def exit_status(self) -> int:
        if self.error is not None:
            return 2
        return 1 if any(problem.needs_action for problem in self.problems) else 0

    def problem(self, problem_id: str) -> Optional[Problem]:
        """The first problem with this id, or ``None``."""
        return next((p for p in self.problems if p.id == problem_id), None)

    @property
    def ids(self) -> list:
        return [p.id for p in self.problems]

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "qwen-ckpt-compat doctor", "version": __version__},
            "input": {"argument": self.argument, "path": self.path, "source": self.source},
            "versions": self.versions,
            "capabilities": self.capabilities,
            "environment": self.environment,
            "model": self.model,
            "problems": [p.to_json() for p in self.problems],
            "error": None if self.error is None else {"path": self.error.path, "message": self.error.message},
            "exit_status": self.exit_status,
        }


# ------------------------------------------------------------------------------------------- text

_COLOURS = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "dim": "2"}


def use_colour(stream: TextIO, choice: str = "auto") -> bool:
    """``always``/``never``, or ``auto``: a TTY and no ``NO_COLOR`` (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _wrap(text: str, first: str, rest: str) -> list:
    return textwrap.wrap(text, 100, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def render_text(report: Report, colour: bool = False) -> str:
    """The short, human-readable report."""

    def paint(text: str, *styles: str) -> str:
        if not colour:
            return text
        return "".join(f"\033[{_COLOURS[s]}m" for s in styles) + text + "\033[0m"

    lines = [paint(f"qwen-ckpt-compat doctor {__version__}", "bold"), ""]
    # non-breaking spaces keep each "name version" on one line; turned back into spaces below
    versions = ", ".join(f"{k}\u00a0{v or '-'}" for k, v in report.versions.items())
    lines.append(paint("Environment", "bold"))
    lines += [line.replace("\u00a0", " ") for line in _wrap(versions, "  ", "  ")]
    caps = report.capabilities
    if caps is not None:
        names = [
            ("checkpointing_kwargs", "checkpointing kwargs"),
            ("old_format_fallback", "old-format fallback"),
            ("every_n_layers", "every_n_layers"),
            ("offload", "offload"),
            ("activation_checkpointing_api", "activation_checkpointing_enable"),
        ]
        has = ", ".join(label for key, label in names if caps.get(key)) or "none of the newer options"
        lines += _wrap(f"transformers has: {has}", "  ", "    ")
    if report.environment is not None:
        stream = report.environment["stream_generator"]
        detail = stream["detail"] or ""
        if detail.startswith(STREAM_PACKAGE + " "):
            detail = detail[len(STREAM_PACKAGE) + 1 :]
        lines += _wrap(f"{STREAM_PACKAGE}: {stream['status']}" + (f" ({detail})" if detail else ""), "  ", "    ")
        if not report.environment["import_hook_enabled"]:
            lines.append(f"  import hook: off ({NO_IMPORT_HOOK_ENV} is set)")
    model = report.model
    if model is not None:
        where = f"  {report.path}" + (" (from the Hub cache)" if report.source == "hub-cache" else "")
        lines += ["", paint("Model", "bold") + where]
        kind = "remote code" if model["remote_code"] else "native transformers model"
        family = f", family {model['family']}" if model["family"] != model["model_type"] else ""
        what = f"  {kind}, model_type {model['model_type']}{family}"
        if model["model_class"]:
            what += f": {model['model_class']} ({model['model_file']})"
        lines.append(what)
        if model["old_gradient_checkpointing_api"]:
            owners = f" on {', '.join(model['checkpointing_owners'])}" if model["checkpointing_owners"] else ""
            lines.append(f"  old checkpointing API: {model['checkpointing_signature']}{owners}")
        else:
            lines.append("  old checkpointing API: no")
        blocks = model["decoder_blocks"]
        blocks_text = "unknown" if blocks is None else (", ".join(blocks) or "none named")
        support = {True: "yes", False: "no", None: "unknown"}[model["supports_gradient_checkpointing"]]
        lines.append(f"  decoder blocks: {blocks_text}; supports_gradient_checkpointing: {support}")
    lines.append("")
    action = sum(p.needs_action for p in report.problems)
    heading = f"Problems: {len(report.problems)}"
    if action:
        heading += f" ({action} need{'s' if action == 1 else ''} your action)"
    lines.append(paint(heading if report.problems else "Problems: none found", "bold"))
    for problem in report.problems:
        if problem.needs_action:
            tag = paint("ACTION", "bold", "red")
        elif problem.fixed_by_library:
            tag = paint("fixed ", "green")
        else:
            tag = paint("note  ", "yellow")
        lines += _wrap(f"{problem.id}: {problem.summary}", f"  {tag} ", " " * 9)
        lines += _wrap(problem.fix, paint("         -> ", "dim"), " " * 12)
    lines.append("")
    if report.exit_status == 1:
        lines.append(paint("Something needs your action (see ACTION above).", "bold", "red"))
    elif report.problems:
        lines.append(paint("Nothing needs your action when qwen-ckpt-compat is used as the fixes say.", "green"))
    else:
        lines.append(paint("Nothing to fix.", "green"))
    return "\n".join(lines) + "\n"
