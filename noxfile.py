r"""Nox sessions: the transformers compatibility matrix, the wheel check and the table.

    nox                                   # the era rows, every matrix row, then the wheel check (what CI runs)
    nox -t quick                          # four rows, one per era
    nox -l                                # list the sessions
    nox -s "tests(4.35.0-enable-typeerror)" -- -k lora   # one row; pytest arguments after --
    nox -s constraints                    # regenerate constraints/*.txt (needs PyPI)
    nox -s table                          # docs/compatibility.md from reports/*.xml
    QCC_ALL_TESTS=1 nox -s "tests(4.40.2-fallback)"   # one row's whole suite (see SPAWN_ROWS)
    QCC_GPU_SYSTEM_PYTHON=1 nox -s gpu    # the CUDA tests and the bench, with the machine's own Python

Each matrix row installs torch 2.13.0 beside one transformers release and the peft, accelerate,
tokenizers, huggingface_hub, ... that PyPI had the day after that release, pinned in
``constraints/<row-id>.txt``, so a row can be reproduced outside nox:

    uv pip install torch==2.13.0 -c constraints/<row-id>.txt transformers peft accelerate \
        transformers_stream_generator safetensors pytest -e .

Era rows (``nox -t era``) prove the Python and torch bounds instead: each installs its own Python, torch
from PyPI and one transformers release, all as PyPI had them then (see ERA_ROWS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nox
import tomllib

nox.needs_version = ">=2026.10.20"  # --parallel / allow_parallel / Session.parallel
nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"  # the install step still runs (a no-op when nothing changed)
nox.options.error_on_external_run = True  # pytest and python must come from the session's venv
nox.options.download_python = "never"  # Python 3.11 must be on PATH; never fetch one
# Two rows at a time on CI's 2 cores (one torch thread each): the whole default run took 5m46s
# against 11m53s one at a time, measured on 2026-11-28 with a warm uv cache.
nox.options.parallel = 2

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
CONSTRAINTS = ROOT / "constraints"
TIMINGS = REPORTS / "timings.tsv"

PLATFORM = "x86_64-manylinux_2_28"  # the constraints are resolved for CI's platform (Linux x86_64)
PYTHON = "3.11"  # the constraints are compiled for 3.11; the oldest rows have no 3.12 wheels
TORCH = "2.13.0"  # one torch for every row (never unpinned: that pulls a multi-GB CUDA build)

# Installed beside transformers in every row (pinned by the row's constraints file).
# sentencepiece: the tiny ChatGLM2/3, Baichuan2 and InternLM tokenizers load a SentencePiece model, as the real
# ones do (tests/test_tokenizers.py); tiktoken: the tiny GLM-4 tokenizer reads a tiktoken ranks file, as the real
# one does (tests/test_glm4.py). Neither is in the constraints files: one version (the newest) on every row.
COMPANIONS = ("peft", "accelerate", "transformers_stream_generator", "safetensors", "sentencepiece", "tiktoken")
# Printed at the top of every session.
SHOWN = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "transformers_stream_generator",
)

# Everything else in a constraints file is as PyPI had it at the row's cut-off; these are not.
# torch 2.13.0 is from 2026 and needs newer versions of its own dependencies than old cut-offs
# allow (typing-extensions>=4.10, sympy>=1.13.3, ...); setuptools builds the sdist-only
# transformers_stream_generator; pytest is one version for every row, since the test runner is
# not what the matrix is about. All of these resolve as of TOOLS_CUTOFF instead.
TOOLS_CUTOFF = "2026-11-28"
UNDATED = (
    # torch and its dependencies
    "torch",
    "typing-extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "filelock",
    "fsspec",
    "setuptools",
    # the test runner and its dependencies
    "pytest",
    "pluggy",
    "iniconfig",
    "pygments",
)
# Extra pins for rows whose era's resolution does not work with torch 2.13 / Python 3.11.
# None were needed on 2026-11-28: every row resolves, installs and imports as it is.
EXTRA_PINS: dict[str, tuple[str, ...]] = {}


@dataclasses.dataclass(frozen=True)
class Row:
    transformers: str
    id: str
    uploaded: str  # when PyPI received this transformers release (UTC)
    quick: bool = False
    spawns: bool = False  # runs the tests marked `spawns` (see SPAWN_ROWS); each row's comment says why or why not

    @property
    def cutoff(self) -> str:
        """The day after the upload, 00:00 UTC: companions newer than that are excluded."""
        day = datetime.date.fromisoformat(self.uploaded[:10]) + datetime.timedelta(days=1)
        return f"{day.isoformat()}T00:00:00Z"

    @property
    def constraints(self) -> Path:
        return CONSTRAINTS / f"{self.id}.txt"


# Rows sit at the behaviour boundaries of docs/facts/transformers-releases.md; ids say what changed there.
# Upload times: the earliest file of each release in https://pypi.org/pypi/transformers/json,
# looked up once on 2026-11-28 and hard-coded here.
ROWS = (
    # oldest supported: gradient_checkpointing_enable() does apply(_set_gradient_checkpointing, value=True)
    # spawns: yes, the 4.x row: the oldest API and companions (peft 0.4, accelerate 0.21) under DDP, accelerate and
    # FSDP1/FSDP2 on torch 2.13 (the era row of this release has torch 2.0, whose FSDP does not run on the CPU)
    Row("4.31.0", "4.31.0-oldest", "2023-07-18T20:12:21Z", quick=True, spawns=True),
    # old apply(value=) API with the companions of late summer 2023 (peft 0.5, accelerate 0.22)
    # spawns: no, the same apply(value=) API and torch as 4.31.0-oldest; the engines' in-process tests run here
    Row("4.32.1", "4.32.1-apply-value", "2023-08-28T12:45:23Z"),
    # last release before the new _set_gradient_checkpointing(enable=...) API
    # spawns: no, the same apply(value=) API and torch as 4.31.0-oldest
    Row("4.34.1", "4.34.1-last-apply-value", "2023-10-18T21:15:07Z"),
    # new API and no fallback: enabling on the old signature raises TypeError
    # spawns: no: the library enables through its own routing on every release (the in-process engine tests run
    # here); the 4.35.2-py3.10-torch2.1.1 era row launches the engines in this era
    Row("4.35.0", "4.35.0-enable-typeerror", "2023-11-02T16:45:27Z"),
    # last release of the TypeError era
    # spawns: no, its era row (4.35.2-py3.10-torch2.1.1) launches them with this release and its companions
    Row("4.35.2", "4.35.2-last-typeerror", "2023-11-15T16:38:58Z", quick=True),
    # fallback to the old signature added; gradient_checkpointing_kwargs silently ignored
    # spawns: no: what the engines check is the library's routing, the same on every release of the fallback era
    # (launched by the 4.48.3-py3.12-torch2.5.1 era row)
    Row("4.36.2", "4.36.2-fallback-ignores-kwargs", "2023-12-18T18:24:40Z"),
    # default gradient_checkpointing_kwargs become {"use_reentrant": True} for native models
    # spawns: no, a native-model default: the engines run the remote-code model with explicit settings
    Row("4.38.2", "4.38.2-default-reentrant", "2024-03-01T03:24:16Z"),
    # fallback era; companions move: peft 0.10, accelerate 0.30, transformers_stream_generator 0.0.5
    # spawns: no, the fallback era (launched by the 4.48.3-py3.12-torch2.5.1 era row)
    Row("4.40.2", "4.40.2-fallback", "2024-05-06T16:07:56Z"),
    # fallback era; peft 0.12, accelerate 0.33, huggingface_hub 0.24
    # spawns: no, the fallback era (launched by the 4.48.3-py3.12-torch2.5.1 era row)
    Row("4.43.4", "4.43.4-fallback", "2024-08-05T10:55:56Z"),
    # fallback era; first row with accelerate 1.x and numpy 2.x
    # spawns: no, the fallback era; accelerate 1.x is launched by the 4.48.3 era row (accelerate 1.3) and 5.x rows
    Row("4.45.2", "4.45.2-fallback", "2024-10-07T17:42:51Z"),
    # fallback era; peft 0.14, accelerate 1.3, tokenizers 0.21
    # spawns: no here; its era row (4.48.3-py3.12-torch2.5.1) launches them with these companions on torch 2.5.1
    Row("4.48.3", "4.48.3-fallback", "2025-02-07T10:10:43Z"),
    # last release before native models use GradientCheckpointingLayer (4.52); peft 0.15
    # spawns: no, the fallback era (launched by the 4.48.3-py3.12-torch2.5.1 era row)
    Row("4.51.3", "4.51.3-fallback", "2025-04-14T08:13:43Z"),
    # native models checkpoint through GradientCheckpointingLayer
    # spawns: no, a native-model change: the remote-code model the engines run keeps its own blocks
    Row("4.53.3", "4.53.3-ckpt-layer", "2025-07-22T07:30:48Z"),
    # newest release where the Qwen v1 remote code still loads
    # spawns: no, the fallback era (launched by the 4.48.3-py3.12-torch2.5.1 era row)
    Row("4.55.4", "4.55.4-last-loading", "2025-08-22T15:18:40Z", quick=True),
    # remote code no longer loads: transformers_stream_generator imports the removed BeamSearchScorer
    # spawns: no: loading through the library's import hook is tested in process here; 5.25.0-newest launches
    # the engines on a release where only the library loads the model
    Row("4.57.6", "4.57.6-beamsearch-gone", "2026-01-16T10:38:31Z"),
    # native default becomes use_reentrant=False; get_head_mask and DisjunctiveConstraint removed
    # spawns: no, the 5.x era is launched by 5.25.0-newest and its era row (5.24.0-py3.13-torch2.15.0)
    Row("5.0.0", "5.0.0-nonreentrant-no-head-mask", "2026-01-26T10:46:43Z"),
    # mid-5.x before every_n_layers; huggingface_hub 1.x era
    # spawns: no, the 5.x era is launched by 5.25.0-newest and its era row
    Row("5.12.1", "5.12.1-v5", "2026-06-15T17:27:46Z"),
    # every_n_layers (5.16) and offload=True (5.17) for native models; ignored for the old format
    # spawns: no, native-model options: the engines run the remote-code model (5.25.0-newest has both options too)
    Row("5.17.0", "5.17.0-every-n-offload", "2026-09-09T15:39:53Z"),
    # activation_checkpointing_enable(); gradient_checkpointing_enable becomes a deprecated alias
    # spawns: no, 5.25.0-newest has the same API
    Row("5.23.0", "5.23.0-activation-ckpt", "2026-11-13T14:10:36Z"),
    # generate passes the past to prepare_inputs_for_generation as cache= instead of past_key_values=
    # spawns: no, 5.25.0-newest has the same API (its era row, 5.24.0-py3.13-torch2.15.0, launches them on 5.24)
    Row("5.24.0", "5.24.0-cache-keyword", "2026-11-21T12:24:29Z"),
    # newest transformers on PyPI (2026-12-03)
    # spawns: yes, the 5.x row: the newest transformers, peft and accelerate on torch 2.13. It also runs the
    # release-independent tests (RELEASE_INDEPENDENT_ROWS): with both, it runs the whole test suite
    Row("5.25.0", "5.25.0-newest", "2026-12-01T18:03:52Z", quick=True, spawns=True),
)
ROWS_BY_ID = {row.id: row for row in ROWS}
ROWS_BY_VERSION = {row.transformers: row for row in ROWS}
# Rows re-run without transformers_stream_generator installed (the remote code's check_imports
# demands it): the newest release that still loads the remote code, and the newest release.
# tests/test_concurrent_loading.py's stress test: all its 100 rounds (about a minute on CI's two cores) on one 4.x row
# (4.45.2, where one folder from four threads failed one round in 20 before the import hook serialised the copy
# and import of remote files, which transformers does outside its own lock) and on one 5.x row (5.12.1, not the
# newest: that row runs the whole suite and is the run's longest session); a few elsewhere.
STRESS_ROWS = ("4.45.2-fallback", "5.12.1-v5")
STRESS_ROUNDS_ELSEWHERE = "8"
NO_TSG_ROWS = ("4.55.4-last-loading", "5.25.0-newest")
# Rows re-run with what Qwen-VL's remote visual.py imports when it loads (Pillow, requests; elsewhere its tests
# skip): the newest release where Qwen's remote code loads unmodified, and the newest release. Pinned here, as
# PyPI had them at each row's cut-off (the rows' constraints files do not list Pillow). torchvision, which the
# real visual.py imports too, is left out: PyPI's wheels do not import beside the CPU build of torch 2.13.0
# ("operator torchvision::nms does not exist"), so the tiny fixture does its image transform with Pillow.
VISION_ROWS = {
    "4.55.4-last-loading": ("pillow==11.3.0", "requests==2.32.5"),
    "5.25.0-newest": ("pillow==13.0.0", "requests==2.34.2"),
}
# What the vision rows run: the family test files, Qwen-VL's tests only (the rest runs in the rows themselves).
VISION_TESTS = (
    "tests/test_families.py", "tests/test_families_newer.py", "tests/test_fixture_faithful_families.py",
    "tests/test_examples.py",  # examples/finetune_families.py --family qwen_vl
)  # fmt: skip
# What the no-tsg rows run: the test files whose outcome depends on whether transformers_stream_generator is
# installed (loading Qwen-style code through the import hook's check, chat_stream, the doctor's streaming checks,
# the fixtures' faithfulness to the real loading), plus the LoRA path on a model loaded that way. The rest runs in
# the rows themselves, with the package installed: nothing else imports it.
NO_TSG_TESTS = (
    "tests/test_newer_transformers.py", "tests/test_loading_patch.py", "tests/test_fixture_faithful.py",
    "tests/test_fixture_faithful_families.py", "tests/test_families.py", "tests/test_doctor.py",
    "tests/test_doctor_release.py", "tests/test_lora.py",
)
# The wheel check uses the newest row's pins.
PACKAGE_ROW = ROWS[-1]


@dataclasses.dataclass(frozen=True)
class EraRow:
    """One Python, one torch and one transformers release (``row``), as a user of that era had them."""

    row: Row  # the transformers release; its cut-off dates everything else
    python: str
    torch: str
    spawns: bool = True  # runs the tests marked `spawns` (see SPAWN_ROWS)

    @property
    def id(self) -> str:
        return f"{self.row.transformers}-py{self.python}-torch{self.torch}"

    @property
    def constraints(self) -> Path:
        return CONSTRAINTS / f"{self.id}.txt"


# The rows above prove the transformers range on Python 3.11 and torch 2.13.0 alone. These prove the Python
# and torch ranges of pyproject.toml: each runs its Python (found under pyenv on CI's machines), torch as PyPI
# has it (a CUDA build of 2-3 GB that runs on the CPU: PyPI has no CPU builds for Linux and the machines reach
# no other index) and every other package as PyPI had it at the row's cut-off; only the test runner is newer
# (TEST_RUNNER). Measured on 2026-11-28 with an empty uv cache (as on a fresh CI machine) and CI's 2 cores
# shared with other work (load ~9): install 60-97 s and tests 104-156 s per era row, 14 of the run's 85
# session-minutes; the whole default run took 43m52s of CI's 90. So all four are in the default run.
# Not run: Python 3.14 and later (CI's machines have no such interpreter; pyproject.toml declares 3.9-3.13),
# torch below 2.0 (below the floor).
ERA_ROWS = (
    # every floor at once: Python 3.9, torch 2.0.0, transformers 4.31.0, peft 0.4.0, accelerate 0.21.0, and
    # the library's own floors (ERA_EXTRA_PINS)
    # spawns: yes, as on every era row: torch decides which engines run on the CPU and how (torch 2.0: DDP and
    # accelerate; its FSDP asks for CUDA); also the release-independent tests (RELEASE_INDEPENDENT_ROWS)
    EraRow(ROWS_BY_ID["4.31.0-oldest"], "3.9", "2.0.0"),
    # the 4.35 TypeError era as users had it in November 2023; first torch whose checkpoint takes context_fn,
    # determinism_check and debug, and whose save_on_cpu takes device_type (2.1)
    # spawns: yes: torch 2.1's DDP and accelerate (its FSDP asks for CUDA streams)
    EraRow(ROWS_BY_ID["4.35.2-last-typeerror"], "3.10", "2.1.1"),
    # Python 3.12; first torch with create_selective_checkpoint_contexts (2.5); its FSDP1 runs on the CPU
    # spawns: yes: the first torch whose FSDP1, FSDP2 (torch.distributed._composable) and selective recompute run
    # on the CPU, with the fallback era's transformers
    EraRow(ROWS_BY_ID["4.48.3-fallback"], "3.12", "2.5.1"),
    # the newest Python the bounds declare with the newest torch and transformers on PyPI (2026-11-28)
    # spawns: yes: the newest torch's FSDP2 (torch.distributed.fsdp) and every engine
    EraRow(ROWS_BY_ID["5.24.0-cache-keyword"], "3.13", "2.15.0"),
)
ERA_ROWS_BY_ID = {era.id: era for era in ERA_ROWS}

# What each session runs of the tests with a marker (pyproject.toml registers them):
# - `spawns` (the 2-process engine runs under torch.distributed.run: about 35 s of a row's 150 on CI's 2 cores) run
#   where they can check something another row does not: one 4.x and one 5.x row on torch 2.13, and every era row
#   (each has its own torch, which decides which engines run on the CPU). The other rows skip them, with
#   SPAWNS_SKIPPED as the reason: docs/compatibility.md notes that row's engines column as partly skipped; the
#   engine tests that run in process (wrappers, DDP in one process, FSDP2's classes, 8-bit layers) run everywhere.
# - `release_independent` (the doctor's command line, JSON schema and colour, the bench's --tiny run, import and
#   packaging checks: about 70 s of a row) run on the newest row (Python 3.11, torch 2.13) and on the oldest
#   era row (Python 3.9, torch 2.0: what these check there, torch's imports and the bench's modes, can differ);
#   the other sessions deselect them.
# Variant sessions (tests-no-tsg, tests-vision) repeat a row that already ran both: they run neither.
SPAWN_ROWS = tuple(row.id for row in ROWS if row.spawns) + tuple(era.id for era in ERA_ROWS if era.spawns)
SPAWNS_SKIPPED = f"the multi-process engine runs are launched on {', '.join(SPAWN_ROWS)} only (noxfile.py SPAWN_ROWS)"
# - `heavy` (several seconds each: torch.compile's graphs, about 80 s of a row on CI's 2 cores) run once per torch:
#   on the newest row (torch 2.13) and on the era rows (each its own torch), which decides what they check; the
#   transformers release is only a bystander.
HEAVY_ROWS = (ROWS[-1].id, *(era.id for era in ERA_ROWS))
HEAVY_SKIPPED = f"the tests marked heavy run once per torch, on {', '.join(HEAVY_ROWS)} only (noxfile.py HEAVY_ROWS)"
RELEASE_INDEPENDENT_ROWS = (ROWS[-1].id, ERA_ROWS[0].id)
ALL_TESTS = os.environ.get("QCC_ALL_TESTS", "") not in ("", "0")  # QCC_ALL_TESTS=1: every session runs every test
# The test runner and its dependencies resolve as of TOOLS_CUTOFF in era rows too (the newest pytest that
# supports the row's Python); everything else is the era's.
TEST_RUNNER = ("pytest", "pluggy", "iniconfig", "pygments", "exceptiongroup", "tomli")
# The declared floors of the library's own dependencies, proven by the oldest era row. packaging: the
# lowest that huggingface_hub 0.16 (transformers 4.31's) admits.
ERA_EXTRA_PINS: dict[str, tuple[str, ...]] = {ERA_ROWS[0].id: ("packaging==20.9", "wrapt==1.14.0")}


def _pyenv_interpreter(version: str) -> str:
    """``version`` for nox to find, or pyenv's newest ``<version>.x`` when nox cannot find one on PATH.

    This project's machines keep Python 3.9, 3.10, 3.12 and 3.13 under pyenv without putting them on PATH
    (its shims only answer for the active versions), and nox never downloads an interpreter here. When neither
    has it, nox reports the interpreter missing: locally the session is skipped, on CI it fails.
    """
    found = shutil.which(f"python{version}")
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    if found and Path(found).parent != root / "shims":
        return version
    candidates = [p for p in root.glob(f"versions/{version}.*/bin/python{version}") if p.is_file()]
    if not candidates:
        return version
    return str(max(candidates, key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()]))


def _params(rows: tuple[Row, ...], *, quick: bool = True) -> list[nox.Param]:
    # The value is the transformers version (nox serialises parameters as JSON under --parallel).
    return [
        nox.param(row.transformers, id=row.id, tags=["quick"] if quick and row.quick else []) for row in rows
    ]


def _find_links() -> list[str]:
    """``--find-links DIR`` from pip's config when that folder exists (uv ignores pip's config).

    On this project's machines it holds a CPU build of torch 2.13.0; elsewhere torch comes from
    PyPI as usual.
    """
    value = ""
    # nox's own interpreter may have no pip (pipx, uv tool): fall back to python3's.
    for python in dict.fromkeys([sys.executable, shutil.which("python3") or "python3"]):
        try:
            result = subprocess.run(
                [python, "-m", "pip", "config", "get", "global.find-links"],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            continue
        if result.returncode == 0:
            value = result.stdout
            break
    args: list[str] = []
    for location in value.split():
        if Path(location).is_dir():
            args += ["--find-links", location]
    return args


def _uv() -> str:
    """The uv that nox uses: the `uv` package beside nox if there is one, else uv on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv") or "uv"


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """One install at a time across parallel sessions: `-e .` writes the egg-info in the tree."""
    try:
        import fcntl
    except ImportError:  # Windows: nox's --parallel is the user's choice there
        yield
        return
    lock = ROOT / ".nox" / "install.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _timed(session: nox.Session, label: str) -> Iterator[None]:
    """Append ``label  seconds  status`` to reports/timings.tsv (CI prints it at the end)."""
    REPORTS.mkdir(exist_ok=True)
    start = time.monotonic()
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        seconds = time.monotonic() - start
        with TIMINGS.open("a", encoding="utf-8") as f:
            f.write(f"{session.name}\t{label}\t{seconds:.1f}\t{status}\n")


def _show_versions(session: nox.Session) -> None:
    script = (
        'import sys, importlib.metadata as m; print("python".ljust(32) + sys.version.split()[0]);'
        ' [print(n.ljust(32) + next((d.version for d in m.distributions(name=n)), "(absent)"))'
        " for n in sys.argv[1:]]"
    )
    session.run("python", "-c", script, *SHOWN, silent=False)


def _test_env(session: nox.Session) -> dict[str, str]:
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "always::FutureWarning",
        "TOKENIZERS_PARALLELISM": "false",
        # Bytecode is cached (under .nox/, out of the source tree), even where the machine sets
        # PYTHONDONTWRITEBYTECODE, as this project's machines do: the tests start fresh interpreters (the doctor's command line, the
        # examples, the engine runs, the bench), and without a cache each one compiled the sources of torch,
        # transformers and peft again, 10-15 s an interpreter (the doctor on a tiny model: 24.6 s against 10.2 s,
        # transformers 5.24, measured on 2026-12-03).
        "PYTHONDONTWRITEBYTECODE": "",
        "PYTHONPYCACHEPREFIX": str(ROOT / ".nox" / "pycache"),
    }
    if session.parallel:
        # Two sessions share CI's two cores: one torch thread each instead of two fighting ones.
        env["OMP_NUM_THREADS"] = "1"
    return env


def _install_and_test(
    session: nox.Session,
    row: Row,
    *,
    stream_generator: bool = True,
    era: EraRow | None = None,
    extras: tuple[str, ...] = (),
    variant: str = "",
    pytest_args: tuple[str, ...] = (),
) -> None:
    """Install one matrix row (or era row) into the session's venv and run the test suite against it.

    ``extras`` are installed beside the row (the vision rows); ``variant`` names the report ``<row>+<variant>``;
    ``pytest_args`` are used when none are given after ``--``.
    """
    constraints = era.constraints if era else row.constraints
    if not constraints.is_file():
        session.error(f"{constraints} is missing: run `nox -s constraints -- {era.id if era else row.id}`")
    companions = [p for p in COMPANIONS if stream_generator or p != "transformers_stream_generator"]
    companions += list(extras)
    variant = variant or ("" if stream_generator else "no-tsg")
    report_name = era.id if era else f"{row.id}+{variant}" if variant else row.id

    with _timed(session, "install"), _install_lock():
        session.install(
            *([] if era else _find_links()),  # era rows take torch from PyPI, pinned in their constraints
            "-c",
            str(constraints),
            f"torch=={era.torch if era else TORCH}",
            f"transformers=={row.transformers}",
            *companions,
            "pytest",
            "-e",
            ".",
        )
        if not stream_generator:
            # A reused venv may still have it from an older layout of this session.
            session.run_install(
                _uv(), "pip", "uninstall", "transformers_stream_generator", external=True, silent=True
            )
    _show_versions(session)

    REPORTS.mkdir(exist_ok=True)
    env = _test_env(session)
    if not stream_generator:
        env["QCC_WITHOUT_STREAM_GENERATOR"] = "1"
    if not (row.quick and stream_generator and era is None):
        env["QCC_RUN_EXAMPLES"] = "0"  # tests/test_examples.py: about 30 s a row; the quick rows cover each era
    if not (row.id in STRESS_ROWS and stream_generator and era is None):
        env["QCC_STRESS_ROUNDS"] = STRESS_ROUNDS_ELSEWHERE
    row_id = era.id if era else row.id
    selection: list[str] = []  # a `-m` given after `--` comes later and wins
    if (variant or row_id not in RELEASE_INDEPENDENT_ROWS) and not ALL_TESTS:
        selection += ["-m", "not release_independent"]
    if (variant or row_id not in SPAWN_ROWS) and not ALL_TESTS:
        selection += ["--skip-marked", f"spawns={SPAWNS_SKIPPED}"]
    if (variant or row_id not in HEAVY_ROWS) and not ALL_TESTS:
        selection += ["--skip-marked", f"heavy={HEAVY_SKIPPED}"]
    with _timed(session, "pytest"):
        session.run(
            "python",
            "-m",
            "pytest",
            "--strict-markers",
            f"--junitxml={REPORTS / f'{report_name}.xml'}",
            "-o",
            f"junit_suite_name={report_name}",
            *selection,
            *(session.posargs or pytest_args),
            env=env,
        )


# Defined first, so that the default run starts with them: nox --parallel starts sessions in the order they are
# defined, and these are the longest (PyPI's torch to download, every spawns test) and would otherwise run last, alone.
@nox.session(name="tests-era", tags=["era"], allow_parallel=True)
@nox.parametrize(
    "python,era_id", [nox.param(_pyenv_interpreter(era.python), era.id, id=era.id) for era in ERA_ROWS]
)
def tests_era(session: nox.Session, era_id: str) -> None:
    """One era row (see ERA_ROWS): its Python, PyPI's torch and a transformers release, dated alike."""
    era = ERA_ROWS_BY_ID[era_id]
    _install_and_test(session, era.row, era=era)


# The rows that run the multi-process engine tests take two to three times as long as the others: they start first,
# so that the run does not end on one of them alone (nox --parallel starts sessions in the order they are listed).
@nox.session(python=PYTHON, tags=["matrix"], allow_parallel=True)
@nox.parametrize("transformers", _params(tuple(sorted(ROWS, key=lambda row: not row.spawns))))
def tests(session: nox.Session, transformers: str) -> None:
    """One transformers release (see ROWS) with its era's companions and torch 2.13.0."""
    _install_and_test(session, ROWS_BY_VERSION[transformers])


@nox.session(name="tests-vision", python=PYTHON, tags=["matrix"], allow_parallel=True)
@nox.parametrize("transformers", _params(tuple(ROWS_BY_ID[i] for i in VISION_ROWS), quick=False))
def tests_vision(session: nox.Session, transformers: str) -> None:
    """A row with Pillow and requests installed, running Qwen-VL's tests (they skip in the other rows)."""
    row = ROWS_BY_VERSION[transformers]
    _install_and_test(
        session, row, extras=VISION_ROWS[row.id], variant="vision", pytest_args=(*VISION_TESTS, "-k", "qwen_vl")
    )


@nox.session(name="tests-no-tsg", python=PYTHON, tags=["matrix"], allow_parallel=True)
@nox.parametrize("transformers", _params(tuple(ROWS_BY_ID[i] for i in NO_TSG_ROWS), quick=False))
def tests_no_tsg(session: nox.Session, transformers: str) -> None:
    """A row installed without transformers_stream_generator (everything else the same), running NO_TSG_TESTS."""
    _install_and_test(session, ROWS_BY_VERSION[transformers], stream_generator=False, pytest_args=NO_TSG_TESTS)


# Runs alone (allow_parallel=False): it builds in the source tree (build/, egg-info, dist/).
@nox.session(python=PYTHON, reuse_venv=False, allow_parallel=False)
def package(session: nox.Session) -> None:
    """Build sdist + wheel, install the wheel into a clean venv, run the demo and an example outside the repo."""
    with _timed(session, "build"):
        shutil.rmtree(ROOT / "dist", ignore_errors=True)
        # uv builds the sdist, then the wheel from the sdist: a file missing from the sdist fails here.
        session.run(_uv(), "build", "--out-dir", str(ROOT / "dist"), str(ROOT), external=True)
        wheels = sorted((ROOT / "dist").glob("*.whl"))
        if len(wheels) != 1:
            session.error(f"expected one wheel in dist/, found {wheels}")
    with _timed(session, "install"):
        session.install(
            *_find_links(),
            "-c",
            str(PACKAGE_ROW.constraints),
            f"torch=={TORCH}",
            str(wheels[0]),
            *COMPANIONS,
        )
    _show_versions(session)
    outside = tempfile.mkdtemp(prefix="qcc-package-")
    with _timed(session, "demo"), session.chdir(outside):
        # The import must come from the installed wheel, not from a checkout on sys.path.
        session.run(
            "python",
            "-c",
            "import sys, qwen_ckpt_compat as m; print(m.__file__);"
            ' sys.exit("site-packages" not in m.__file__)',
        )
        session.run("python", "-m", "qwen_ckpt_compat", "demo", *session.posargs, env=_test_env(session))
        # the doctor and the JSON Schema it documents ship in the wheel
        session.run("python", "-c", "from qwen_ckpt_compat.doctor import SCHEMA_PATH; assert SCHEMA_PATH.is_file()")
        session.run("python", "-m", "qwen_ckpt_compat", "doctor", env=_test_env(session))
    with _timed(session, "example"), session.chdir(outside):
        # A user's script against the installed wheel (its testing fixture included); it asserts what it shows.
        example = str(ROOT / "examples" / "tutorial_lora.py")
        session.run("python", example, env={**_test_env(session), "TMPDIR": outside, "TQDM_DISABLE": "1"})
    shutil.rmtree(outside, ignore_errors=True)


# The GPU session (not in the default run): the tests that skip without a CUDA device, and the bench's tests (its
# --tiny run, its report and the plot, which needs matplotlib). For a GPU machine that has Python, torch,
# transformers, peft, accelerate and pytest installed and maybe no PyPI:
#     QCC_GPU_SYSTEM_PYTHON=1 nox -s gpu          # that interpreter as it is: installs nothing
# runs them with the first of nox's own interpreter, python3 and python on PATH that imports torch and pytest (or
# the interpreter QCC_GPU_SYSTEM_PYTHON names, when it is a path), with this checkout first on sys.path. Without it,
# `nox -s gpu` makes a venv as the newest row does, with matplotlib, and torch as the index has it (PyPI's CUDA
# build where no --find-links folder holds torch).
GPU_TESTS = (
    "tests/test_selective_cuda.py", "tests/test_offload_cuda.py", "tests/test_bf16_cuda.py", "tests/test_bench.py"
)
GPU_SYSTEM_PYTHON = os.environ.get("QCC_GPU_SYSTEM_PYTHON", "").strip()
GPU_SYSTEM = GPU_SYSTEM_PYTHON not in ("", "0")


def _system_python(session: nox.Session) -> str:
    """The interpreter QCC_GPU_SYSTEM_PYTHON asks for (see the GPU session's comment)."""
    if GPU_SYSTEM_PYTHON != "1":
        return GPU_SYSTEM_PYTHON
    candidates = list(dict.fromkeys(c for c in (sys.executable, shutil.which("python3"), shutil.which("python")) if c))
    for python in candidates:
        probe = subprocess.run([python, "-c", "import torch, pytest"], capture_output=True, check=False)
        if probe.returncode == 0:
            return python
    session.error(f"QCC_GPU_SYSTEM_PYTHON=1: none of {candidates} imports torch and pytest; name one instead")


@nox.session(python=False if GPU_SYSTEM else PYTHON, default=False)
def gpu(session: nox.Session) -> None:
    """The CUDA tests, the bench's --tiny run and its plot, on a GPU machine (QCC_GPU_SYSTEM_PYTHON=1: install nothing)."""
    env = _test_env(session)
    if GPU_SYSTEM:
        python = _system_python(session)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    else:
        python = "python"
        with _timed(session, "install"):
            session.install(
                *_find_links(), "-c", str(PACKAGE_ROW.constraints), f"torch=={TORCH}",
                f"transformers=={PACKAGE_ROW.transformers}", *COMPANIONS, "pytest", "matplotlib", "-e", ".",
            )
    script = (
        'import sys, importlib.metadata as m, torch; print("python".ljust(32) + sys.version.split()[0]);'
        ' [print(n.ljust(32) + next((d.version for d in m.distributions(name=n)), "(absent)"))'
        ' for n in sys.argv[1:]]; print("cuda".ljust(32) + (torch.cuda.get_device_name() if'
        ' torch.cuda.is_available() else "(none: the CUDA tests skip)"))'
    )
    session.run(python, "-c", script, *SHOWN, "matplotlib", env=env, external=True, silent=False)
    REPORTS.mkdir(exist_ok=True)
    with _timed(session, "pytest"), session.chdir(ROOT):
        session.run(
            python, "-m", "pytest", "--strict-markers", f"--junitxml={REPORTS / 'gpu.xml'}",
            "-o", "junit_suite_name=gpu", *(session.posargs or GPU_TESTS), env=env, external=True,
        )


@nox.session(python=PYTHON, default=False)
def lint(session: nox.Session) -> None:
    """ruff, mypy and the house's import contracts, against the newest row's packages (not in the default run).

    ``lint-imports`` (import-linter) checks the contracts in pyproject.toml: the core never imports a wing, the
    wings never import each other, and the core's layers; it fails on a violation.
    """
    session.install(
        *_find_links(), "-c", str(PACKAGE_ROW.constraints), f"torch=={TORCH}",
        f"transformers=={PACKAGE_ROW.transformers}", *COMPANIONS, "-e", ".", "ruff", "mypy", "import-linter==2.17",
    )
    session.run("ruff", "check", ".")  # the rules are in pyproject.toml; the remote-code fixtures are excluded there
    session.run("lint-imports")
    session.run("mypy", "qwen_ckpt_compat")


def _project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]


@nox.session(python=False, default=False)
def constraints(session: nox.Session) -> None:
    """Regenerate constraints/<row-id>.txt (all rows, or the row ids given after --)."""
    wanted = session.posargs or [row.id for row in ROWS] + [era.id for era in ERA_ROWS]
    unknown = sorted(set(wanted) - set(ROWS_BY_ID) - set(ERA_ROWS_BY_ID))
    if unknown:
        session.error(f"unknown row ids {unknown}; known: {list(ROWS_BY_ID) + list(ERA_ROWS_BY_ID)}")
    for era_id in [i for i in wanted if i in ERA_ROWS_BY_ID]:
        _write_era_constraints(session, ERA_ROWS_BY_ID[era_id])
    wanted = [i for i in wanted if i in ROWS_BY_ID]
    if not wanted:
        return
    find_links = _find_links()
    undated_names = list(UNDATED)
    if not find_links:
        # torch comes from PyPI: the CUDA build, whose nvidia-*/cuda-*/triton dependencies are
        # newer than any old cut-off too. Exempt them as well; _drop_cuda_pins leaves them out.
        session.warn("no --find-links folder: torch resolves from PyPI; its CUDA pins are dropped")
        undated_names += [n for n in _torch_dependencies(session) if n not in UNDATED]
    undated: list[str] = []
    for name in undated_names:
        undated += ["--exclude-newer-package", f"{name}={TOOLS_CUTOFF}T00:00:00Z"]
    CONSTRAINTS.mkdir(exist_ok=True)
    for row_id in wanted:
        row = ROWS_BY_ID[row_id]
        requirements = [
            f"transformers=={row.transformers}",
            f"torch=={TORCH}",
            *COMPANIONS,
            *_project_requirements(),
            *EXTRA_PINS.get(row.id, ()),
        ]
        cmd = [
            "uv",
            "pip",
            "compile",
            "-",  # the requirements come on stdin
            "--quiet",
            "--no-header",
            "--python-version",
            PYTHON,
            "--python-platform",
            PLATFORM,
            "--exclude-newer",
            row.cutoff,
            *undated,
            "--no-emit-package",
            "torch",
            *find_links,
        ]
        if row_id == wanted[0]:
            session.log(f"{row.id}: {' '.join(cmd)}")
        started = time.monotonic()
        result = subprocess.run(
            [_uv(), *cmd[1:]],
            input="\n".join(requirements) + "\n",
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        if result.returncode:
            session.error(f"{row.id}: uv pip compile failed:\n{result.stderr}")
        pins = _drop_cuda_pins(result.stdout)
        header = [
            f"# Matrix row {row.id}: transformers {row.transformers} with the packages PyPI had",
            f"# on {row.cutoff} (transformers {row.transformers} was uploaded {row.uploaded});",
            f"# torch {TORCH} is installed beside these pins and is not listed. Resolved as of",
            *_comment(f"{TOOLS_CUTOFF} instead: {', '.join(UNDATED)} (see UNDATED in noxfile.py)."),
        ]
        if row.id in EXTRA_PINS:
            header.append(f"# Extra pins for this row (see EXTRA_PINS): {' '.join(EXTRA_PINS[row.id])}")
        header += _regeneration_note(row.id, requirements, cmd, "Use", TORCH)
        row.constraints.write_text("\n".join(header) + "\n" + pins, encoding="utf-8")
        session.log(f"{row.id}: wrote {row.constraints.name} in {time.monotonic() - started:.1f}s")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=96, initial_indent="# ", subsequent_indent="# ")


def _regeneration_note(row_id: str, requirements: list[str], cmd: list[str], use: str, torch: str) -> list[str]:
    """The last lines of a constraints file's header: how to regenerate it and how to install from it."""
    printf = "\\n".join(requirements)
    return [
        f"# Regenerate: nox -s constraints -- {row_id}",
        "# which runs (requirements on stdin):",
        f"#   printf '{printf}\\n' | \\",
        "#   " + " ".join(c for c in cmd if c != "--quiet"),
        f"# {use}: uv pip install torch=={torch} -c constraints/{row_id}.txt transformers peft accelerate \\",
        "#   transformers_stream_generator safetensors pytest -e .",
    ]


def _write_era_constraints(session: nox.Session, era: EraRow) -> None:
    """constraints/<era-id>.txt: everything as of the row's cut-off for its Python, torch's CUDA pins included."""
    requirements = [
        f"transformers=={era.row.transformers}",
        f"torch=={era.torch}",
        *COMPANIONS,
        *_project_requirements(),
        *ERA_EXTRA_PINS.get(era.id, ()),
    ]
    undated = [a for name in TEST_RUNNER for a in ("--exclude-newer-package", f"{name}={TOOLS_CUTOFF}T00:00:00Z")]
    cmd = [
        "uv", "pip", "compile", "-", "--quiet", "--no-header", "--no-python-downloads",
        "--python-version", era.python, "--python-platform", PLATFORM, "--exclude-newer", era.row.cutoff, *undated,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        [_uv(), *cmd[1:]], input="\n".join(requirements) + "\n", capture_output=True, text=True, check=False, cwd=ROOT
    )
    if result.returncode:
        session.error(f"{era.id}: uv pip compile failed:\n{result.stderr}")
    header = [
        f"# Era row {era.id}: Python {era.python}, torch {era.torch} (PyPI's build) and transformers",
        f"# {era.row.transformers} with the packages PyPI had on {era.row.cutoff} for that Python;",
        *_comment(f"{', '.join(TEST_RUNNER)} resolved as of {TOOLS_CUTOFF} instead (see TEST_RUNNER in noxfile.py)."),
    ]
    if era.id in ERA_EXTRA_PINS:
        header.append(f"# Extra pins for this row (see ERA_EXTRA_PINS): {' '.join(ERA_EXTRA_PINS[era.id])}")
    header += _regeneration_note(era.id, requirements, cmd, f"Use (Python {era.python})", era.torch)
    era.constraints.write_text("\n".join(header) + "\n" + result.stdout, encoding="utf-8")
    session.log(f"{era.id}: wrote {era.constraints.name} in {time.monotonic() - started:.1f}s")


def _torch_dependencies(session: nox.Session) -> list[str]:
    """Names of everything ``torch==TORCH`` pulls in from PyPI, as of TOOLS_CUTOFF."""
    result = subprocess.run(
        [_uv(), "pip", "compile", "-", "--quiet", "--no-header", "--no-annotate"]
        + ["--python-version", PYTHON, "--python-platform", PLATFORM]
        + ["--exclude-newer", f"{TOOLS_CUTOFF}T00:00:00Z"],
        input=f"torch=={TORCH}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        session.error(f"resolving torch=={TORCH} alone failed:\n{result.stderr}")
    return [line.split("==")[0] for line in result.stdout.splitlines() if "==" in line]


def _drop_cuda_pins(text: str) -> str:
    """Drop the nvidia-*/triton pins a PyPI (CUDA) torch brings, so files match the CPU build's."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        name = line.split("==")[0].strip().lower()
        if line and not line.startswith((" ", "#")):
            skipping = name.startswith(("nvidia-", "cuda-")) or name == "triton"
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


@nox.session(python=False, default=False)
def table(session: nox.Session) -> None:
    """Write docs/compatibility.md from reports/*.xml (run after `nox`)."""
    session.run(
        sys.executable,
        str(ROOT / "tools" / "compat_table.py"),
        "--reports",
        str(REPORTS),
        "--constraints",
        str(CONSTRAINTS),
        "--output",
        str(ROOT / "docs" / "compatibility.md"),
        *session.posargs,
        external=True,
    )
