"""``qwen-ckpt-compat doctor [MODEL] [--json]``: what is wrong with this environment and this model, and what to do.

The doctor never imports or runs the model's remote code and never loads weights. It reads ``config.json`` and the
files ``auto_map`` names (parsed with :mod:`ast`, see :mod:`qwen_ckpt_compat._remote_code`), and asks the
installed packages what they can do (:func:`qwen_ckpt_compat.capabilities`), each question guarded, so
that a broken or missing torch or transformers is reported, not raised.

Modules: :mod:`.report` (problems, the report, JSON and text), :mod:`.environment` (the installation),
:mod:`.model` (the model directory and its facts), :mod:`.checks` (the problems), the family registry
(family-specific measured facts). The JSON follows ``schema.json`` (documented in docs/doctor.md).
Exit status: 0 when nothing needs the user's action, 1 when something does, 2 when the input cannot be read.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, TextIO

from .._family_registry import FamilyFact
from .checks import run_checks
from .environment import Runtime, import_hook_enabled, installed_versions, stream_generator_status
from .model import locate, model_facts, model_json, read_model
from .report import (
    PROBLEM_IDS,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    DoctorInputError,
    Problem,
    Report,
    render_text,
    use_colour,
)

__all__ = [
    "PROBLEM_IDS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "DoctorInputError",
    "FamilyFact",
    "Problem",
    "Report",
    "diagnose",
    "render_text",
    "run",
]


def _capabilities_json(caps: Any) -> Optional[dict]:
    if caps is None:
        return None
    from dataclasses import fields

    flags = {f.name: getattr(caps, f.name) for f in fields(caps) if f.name not in ("transformers", "torch", "peft")}
    flags["enable_method_name"] = caps.enable_method_name
    return flags


def diagnose(argument: Optional[str] = None) -> Report:
    """Checks the environment, and the model at ``argument`` (a directory or a cached Hub id) when given.

    Never raises for bad input: an unreadable input is recorded in ``Report.error`` (exit status 2).
    """
    report = Report(argument=argument, versions=installed_versions())
    model = None
    if argument is not None:
        try:
            directory, report.source = locate(argument)
            report.path = str(directory)
            model = read_model(directory)
        except DoctorInputError as error:
            report.error = error
            return report
    runtime = Runtime(report.versions)
    report.capabilities = _capabilities_json(runtime.caps)
    status, detail = stream_generator_status() if runtime.caps is not None else ("unknown", None)
    report.environment = {
        "import_hook_enabled": import_hook_enabled(),
        "stream_generator": {"status": status, "detail": detail},
    }
    report.problems.extend(runtime.problems)
    if model is not None:
        facts = model_facts(model, runtime)
        report.model = model_json(model, facts)
        report.problems.extend(run_checks(model, facts, runtime))
    return report


def run(model: Optional[str], *, as_json: bool = False, colour: str = "auto", out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    """The ``doctor`` command: prints the report (or the JSON) and returns the exit status."""
    report = diagnose(model)
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    elif report.error is None:
        out.write(render_text(report, use_colour(out, colour)))
    if report.error is not None:
        err.write(f"qwen-ckpt-compat doctor: cannot read {report.error.path}: {report.error.message}\n")
    return report.exit_status
