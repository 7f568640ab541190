"""Write docs/compatibility.md from the matrix's JUnit reports.

    nox && nox -s table
    python tools/compat_table.py --reports reports --constraints constraints --output docs/compatibility.md

Each ``constraints/<row-id>.txt`` is one matrix row (an era row's id also names its Python and torch:
``<transformers>-py<X.Y>-torch<version>``); its tests wrote ``reports/<row-id>.xml`` (and
``reports/<row-id>+<variant>.xml`` for variants such as ``+no-tsg``). The Python and torch columns are what the
run recorded (tests/conftest.py); for a row that did not run, what its constraints file is resolved for. Every test carries
``@pytest.mark.behaviour("<column>")``, which tests/conftest.py records as the JUnit property
``behaviour``. A cell is ``yes`` when all of the column's tests passed, ``no`` when one failed,
``xfail`` for a known (strict xfail) failure, ``n/a`` when all were skipped, ``—`` with no test.

A second table shows family x release: tests/conftest.py records each test's remote-code family (the JUnit
property ``family``); a row's cell gathers that family's tests over the row's reports and its variants'.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

COMMAND = "nox && nox -s table"
BEHAVIOURS = (
    "loads",
    "enables",
    "kwargs",
    "lora_grads",
    "grads_equal",
    "trainer",
    "every_n_layers",
    "offload",
    "unpatch",
    "engines",
)
COMPANIONS = ("peft", "accelerate", "tokenizers", "huggingface-hub")
VARIANTS = {
    "no-tsg": "without transformers_stream_generator",
    "vision": "with Pillow and requests: Qwen-VL's tests",
}
ROOT = Path(__file__).resolve().parents[1]


def fixture_columns() -> dict:
    """The family table's columns: each tiny fixture's name (``qwen_ckpt_compat.testing.TINY_FAMILIES``, which the
    family registry checks), the title of its family, and the new-API model the library leaves alone."""
    sys.path.insert(0, str(ROOT))  # the checkout's package: importing it needs neither torch nor transformers
    from qwen_ckpt_compat._family_registry import family_named
    from qwen_ckpt_compat.testing import TINY_FAMILIES

    columns = {name: family_named(fixture.family).title for name, fixture in TINY_FAMILIES.items()}
    columns["new_api"] = "a model on transformers' new API, which the library leaves alone"
    return columns


@dataclass
class Case:
    name: str
    behaviour: str | None
    outcome: str  # passed | failed | xfailed | skipped
    message: str = ""
    family: str | None = None


@dataclass
class Notes:
    """Numbered footnotes, one per distinct text."""

    texts: list[str] = field(default_factory=list)

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[^{self.texts.index(text) + 1}]"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalised name."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def read_python(path: Path) -> str | None:
    """The Python a constraints file was resolved for (its recorded ``--python-version``)."""
    match = re.search(r"--python-version (\S+)", path.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def read_properties(path: Path) -> dict[str, str]:
    """The test-suite properties of one JUnit XML report (``python`` and ``torch``, see tests/conftest.py)."""
    properties: dict[str, str] = {}
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for prop in suite.findall("./properties/property"):
            properties[prop.get("name", "")] = prop.get("value", "")
    return properties


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _first_line(text: str | None, limit: int = 240) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_cases(path: Path) -> list[Case]:
    """The test cases of one JUnit XML report (pytest, any junit_family)."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        behaviour = next(
            (p.get("value") for p in case.iter("property") if p.get("name") == "behaviour"), None
        )
        family = next((p.get("value") for p in case.iter("property") if p.get("name") == "family"), None)
        name = ".".join(filter(None, (case.get("classname"), case.get("name"))))
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or child.text or child.tag
                break
            if child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome = "xfailed" if xfail else "skipped"
                message = child.get("message") or child.text or ""
        cases.append(Case(name, behaviour, outcome, _first_line(message), family))
    return cases


def cell(cases: list[Case], notes: Notes) -> str:
    """One behaviour column of one row."""
    if not cases:
        return "—"
    by_outcome: dict[str, list[Case]] = {}
    for case in cases:
        by_outcome.setdefault(case.outcome, []).append(case)
    if "failed" in by_outcome:
        first = by_outcome["failed"][0]
        return "**no** " + notes.ref(f"failed: `{first.name}`: {first.message}")
    if "xfailed" in by_outcome:
        reasons = sorted({c.message for c in by_outcome["xfailed"]})
        return "xfail " + " ".join(notes.ref(f"known failure (strict xfail): {r}") for r in reasons)
    reasons = sorted({c.message for c in by_outcome.get("skipped", [])})
    if "passed" in by_outcome:
        # Some of the column's tests may not apply on this row (an option this release lacks, an engine this
        # torch cannot run on the CPU): the note says which.
        return " ".join(["yes", *(notes.ref(f"partly skipped: {r}") for r in reasons)])
    return "n/a " + " ".join(notes.ref(f"skipped: {r}") for r in reasons)


def summary(cases: list[Case]) -> str:
    counts = {o: sum(c.outcome == o for c in cases) for o in ("passed", "failed", "xfailed", "skipped")}
    return ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no tests"


def render(reports: Path, constraints: Path, torch: str) -> str:
    rows = sorted(
        ((path.stem, read_pins(path), read_python(path)) for path in constraints.glob("*.txt")),
        key=lambda row: (_version_key(row[1].get("transformers", "0")), row[0]),
    )
    notes = Notes()
    head = ["row", "python", "torch", "transformers", *(c.replace("-", "_") for c in COMPANIONS), *BEHAVIOURS, "tests"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unknown: set[str] = set()
    for row_id, pins, python in rows:
        variants = [reports / f"{row_id}.xml", *sorted(reports.glob(f"{row_id}+*.xml"))]
        for report in variants:
            variant = report.stem.partition("+")[2]
            label = f"`{row_id}`" + (f" ({VARIANTS.get(variant, variant)})" if variant else "")
            ran = read_properties(report) if report.is_file() else {}
            versions = [
                ran.get("python") or python or "?",
                ran.get("torch") or pins.get("torch") or torch,
                pins.get("transformers", "?"),
                *(pins.get(c, "—") for c in COMPANIONS),
            ]
            if not report.is_file():
                if variant:
                    continue
                note = notes.ref(f"no report in {reports.name}/: the row's session did not run")
                lines.append(
                    "| " + " | ".join([label, *versions, *["not run"] * len(BEHAVIOURS), note]) + " |"
                )
                continue
            cases = read_cases(report)
            unknown |= {c.behaviour for c in cases if c.behaviour and c.behaviour not in BEHAVIOURS}
            cells = [cell([c for c in cases if c.behaviour == b], notes) for b in BEHAVIOURS]
            lines.append("| " + " | ".join([label, *versions, *cells, summary(cases)]) + " |")
    if unknown:
        print(f"warning: behaviours with no column: {sorted(unknown)}", file=sys.stderr)
    family_lines = family_table(rows, reports, notes)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Compatibility with transformers, Python and torch releases",
        "",
        f"Generated {now} by `{COMMAND}` (tools/compat_table.py over reports/*.xml).",
        "Each row is one nox matrix session: that transformers release with the companions PyPI had",
        f"the day after it came out, pinned in `constraints/<row>.txt`, on Python 3.11 and torch {torch} (CPU).",
        "Era rows (`<transformers>-py<X.Y>-torch<version>`, session `tests-era`) prove the Python and torch bounds:",
        "that Python, PyPI's torch build (run on the CPU) and everything else as PyPI had it then, the test",
        "runner excepted. The python and torch columns are what each run recorded.",
        "",
        "Cells: **yes** = every test of that behaviour that ran passed (a note names those skipped on that",
        "row); **no** = at least one failed;",
        "**xfail** = a known failure (strict xfail, reason in the note); **n/a** = skipped on this",
        "row (reason in the note); **—** = no test for it.",
        "",
        *lines,
        "",
        "## Families",
        "",
        "Each family's tiny remote-code fixture (`qwen_ckpt_compat.testing`): a cell gathers every test of that",
        "family in the row and its variants (loading, checkpointing, LoRA, Trainer, equivalence with 4.55.4).",
        "",
        *family_lines,
        "",
    ]
    out += [f"[^{i}]: {text}" for i, text in enumerate(notes.texts, 1)]
    return "\n".join(out) + "\n"


def family_cell(cases: list[Case], notes: Notes) -> str:
    """A family's cell: **no** (a note names the first failure), yes, or n/a with the one decisive reason.

    A family's tests are many, and some skip on every row (a release gate: "only 4.35.x"): the behaviour columns
    above say which; here only failures count. A family none of whose tests ran skipped them for several reasons
    at once; the one that applies to all of them is a package missing, where there is one.
    """
    if not cases:
        return "—"
    failed = [c for c in cases if c.outcome == "failed"]
    if failed:
        return "**no** " + notes.ref(f"failed: `{failed[0].name}`: {failed[0].message}")
    if any(c.outcome in ("passed", "xfailed") for c in cases):
        return "yes"
    reasons = sorted({c.message for c in cases})
    missing = [r for r in reasons if "not installed" in r]
    return "n/a " + notes.ref(f"skipped: {(missing or reasons)[0]}")


def family_table(rows: list, reports: Path, notes: Notes) -> list[str]:
    """Family x release: one line per matrix row, its reports and its variants' together."""
    columns = fixture_columns()
    legend = "; ".join(f"`{name}`: {title}" for name, title in columns.items())
    head = ["row", "transformers", *(f"`{name}`" for name in columns)]
    lines = [f"Fixtures: {legend}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row_id, pins, *_ in rows:
        files = [reports / f"{row_id}.xml", *sorted(reports.glob(f"{row_id}+*.xml"))]
        cases = [case for report in files if report.is_file() for case in read_cases(report)]
        if not cases:
            continue
        cells = [family_cell([c for c in cases if c.family == family], notes) for family in columns]
        lines.append("| " + " | ".join([f"`{row_id}`", pins.get("transformers", "?"), *cells]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--constraints", type=Path, default=Path("constraints"))
    parser.add_argument("--output", type=Path, default=Path("docs/compatibility.md"))
    parser.add_argument("--torch", default="2.13.0", help="the torch every row installs")
    args = parser.parse_args(argv)
    if not any(args.reports.glob("*.xml")):
        print(f"no reports in {args.reports}/: run `nox` first", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(args.reports, args.constraints, args.torch), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
