r"""Nox sessions: the transformers compatibility matrix, the wheel check and the table.

    nox                                   # every matrix row, then the wheel check (what CI runs)
    nox -t quick                          # four rows, one per era
    nox -l                                # list the sessions
    nox -s "tests(4.35.0-enable-typeerror)" -- -k lora   # one row; pytest arguments after --
    nox -s constraints                    # regenerate constraints/*.txt (needs PyPI)
    nox -s table                          # docs/compatibility.md from reports/*.xml

Each matrix row installs torch 2.13.0 beside one transformers release and the peft, accelerate,
tokenizers, huggingface_hub, ... that PyPI had the day after that release, pinned in
``constraints/<row-id>.txt``, so a row can be reproduced outside nox:

    uv pip install torch==2.13.0 -c constraints/<row-id>.txt transformers peft accelerate \
        transformers_stream_generator safetensors pytest -e .
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
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
COMPANIONS = ("peft", "accelerate", "transformers_stream_generator", "safetensors")
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

    @property
    def cutoff(self) -> str:
        """The day after the upload, 00:00 UTC: companions newer than that are excluded."""
        day = datetime.date.fromisoformat(self.uploaded[:10]) + datetime.timedelta(days=1)
        return f"{day.isoformat()}T00:00:00Z"

    @property
    def constraints(self) -> Path:
        return CONSTRAINTS / f"{self.id}.txt"


# Rows sit at the behaviour boundaries of shared/QWEN_V1_FACTS.md; ids say what changed there.
# Upload times: the earliest file of each release in https://pypi.org/pypi/transformers/json,
# looked up once on 2026-11-28 and hard-coded here.
ROWS = (
    # oldest supported: gradient_checkpointing_enable() does apply(_set_gradient_checkpointing, value=True)
    Row("4.31.0", "4.31.0-oldest", "2023-07-18T20:12:21Z", quick=True),
    # old apply(value=) API with the companions of late summer 2023 (peft 0.5, accelerate 0.22)
    Row("4.32.1", "4.32.1-apply-value", "2023-08-28T12:45:23Z"),
    # last release before the new _set_gradient_checkpointing(enable=...) API
    Row("4.34.1", "4.34.1-last-apply-value", "2023-10-18T21:15:07Z"),
    # new API and no fallback: enabling on the old signature raises TypeError
    Row("4.35.0", "4.35.0-enable-typeerror", "2023-11-02T16:45:27Z"),
    # last release of the TypeError era
    Row("4.35.2", "4.35.2-last-typeerror", "2023-11-15T16:38:58Z", quick=True),
    # fallback to the old signature added; gradient_checkpointing_kwargs silently ignored
    Row("4.36.2", "4.36.2-fallback-ignores-kwargs", "2023-12-18T18:24:40Z"),
    # default gradient_checkpointing_kwargs become {"use_reentrant": True} for native models
    Row("4.38.2", "4.38.2-default-reentrant", "2024-03-01T03:24:16Z"),
    # fallback era; companions move: peft 0.10, accelerate 0.30, transformers_stream_generator 0.0.5
    Row("4.40.2", "4.40.2-fallback", "2024-05-06T16:07:56Z"),
    # fallback era; peft 0.12, accelerate 0.33, huggingface_hub 0.24
    Row("4.43.4", "4.43.4-fallback", "2024-08-05T10:55:56Z"),
    # fallback era; first row with accelerate 1.x and numpy 2.x
    Row("4.45.2", "4.45.2-fallback", "2024-10-07T17:42:51Z"),
    # fallback era; peft 0.14, accelerate 1.3, tokenizers 0.21
    Row("4.48.3", "4.48.3-fallback", "2025-02-07T10:10:43Z"),
    # last release before native models use GradientCheckpointingLayer (4.52); peft 0.15
    Row("4.51.3", "4.51.3-fallback", "2025-04-14T08:13:43Z"),
    # native models checkpoint through GradientCheckpointingLayer
    Row("4.53.3", "4.53.3-ckpt-layer", "2025-07-22T07:30:48Z"),
    # newest release where the Qwen v1 remote code still loads
    Row("4.55.4", "4.55.4-last-loading", "2025-08-22T15:18:40Z", quick=True),
    # remote code no longer loads: transformers_stream_generator imports the removed BeamSearchScorer
    Row("4.57.6", "4.57.6-beamsearch-gone", "2026-01-16T10:38:31Z"),
    # native default becomes use_reentrant=False; get_head_mask and DisjunctiveConstraint removed
    Row("5.0.0", "5.0.0-nonreentrant-no-head-mask", "2026-01-26T10:46:43Z"),
    # mid-5.x before every_n_layers; huggingface_hub 1.x era
    Row("5.12.1", "5.12.1-v5", "2026-06-15T17:27:46Z"),
    # every_n_layers (5.16) and offload=True (5.17) for native models; ignored for the old format
    Row("5.17.0", "5.17.0-every-n-offload", "2026-09-09T15:39:53Z"),
    # activation_checkpointing_enable(); gradient_checkpointing_enable becomes a deprecated alias
    Row("5.23.0", "5.23.0-activation-ckpt", "2026-11-13T14:10:36Z"),
    # newest transformers on PyPI (2026-11-28)
    Row("5.24.0", "5.24.0-newest", "2026-11-21T12:24:29Z", quick=True),
)
ROWS_BY_ID = {row.id: row for row in ROWS}
ROWS_BY_VERSION = {row.transformers: row for row in ROWS}
# Rows re-run without transformers_stream_generator installed (the remote code's check_imports
# demands it): the newest release that still loads the remote code, and the newest release.
NO_TSG_ROWS = ("4.55.4-last-loading", "5.24.0-newest")
# The wheel check uses the newest row's pins.
PACKAGE_ROW = ROWS[-1]


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
    }
    if session.parallel:
        # Two sessions share CI's two cores: one torch thread each instead of two fighting ones.
        env["OMP_NUM_THREADS"] = "1"
    return env


def _install_and_test(session: nox.Session, row: Row, *, stream_generator: bool = True) -> None:
    """Install one matrix row into the session's venv and run the test suite against it."""
    if not row.constraints.is_file():
        session.error(f"{row.constraints} is missing: run `nox -s constraints -- {row.id}`")
    companions = [p for p in COMPANIONS if stream_generator or p != "transformers_stream_generator"]
    report_name = row.id if stream_generator else f"{row.id}+no-tsg"

    with _timed(session, "install"), _install_lock():
        session.install(
            *_find_links(),
            "-c",
            str(row.constraints),
            f"torch=={TORCH}",
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
    if not (row.quick and stream_generator):
        env["QCC_RUN_EXAMPLES"] = "0"  # tests/test_examples.py: about 30 s a row; the quick rows cover each era
    with _timed(session, "pytest"):
        session.run(
            "python",
            "-m",
            "pytest",
            "--strict-markers",
            f"--junitxml={REPORTS / f'{report_name}.xml'}",
            "-o",
            f"junit_suite_name={report_name}",
            *session.posargs,
            env=env,
        )


@nox.session(python=PYTHON, tags=["matrix"], allow_parallel=True)
@nox.parametrize("transformers", _params(ROWS))
def tests(session: nox.Session, transformers: str) -> None:
    """One transformers release (see ROWS) with its era's companions and torch 2.13.0."""
    _install_and_test(session, ROWS_BY_VERSION[transformers])


@nox.session(name="tests-no-tsg", python=PYTHON, tags=["matrix"], allow_parallel=True)
@nox.parametrize("transformers", _params(tuple(ROWS_BY_ID[i] for i in NO_TSG_ROWS), quick=False))
def tests_no_tsg(session: nox.Session, transformers: str) -> None:
    """A row installed without transformers_stream_generator (everything else the same)."""
    _install_and_test(session, ROWS_BY_VERSION[transformers], stream_generator=False)


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


@nox.session(python=PYTHON, default=False)
def lint(session: nox.Session) -> None:
    """ruff and mypy, against the newest row's packages (not part of the default run)."""
    session.install(
        *_find_links(), "-c", str(PACKAGE_ROW.constraints), f"torch=={TORCH}",
        f"transformers=={PACKAGE_ROW.transformers}", *COMPANIONS, "-e", ".", "ruff", "mypy",
    )
    session.run("ruff", "check", "qwen_ckpt_compat", "tests", "tools", "noxfile.py",
                "--select", "F,E9,B,I", "--ignore", "B905")
    session.run("mypy", "qwen_ckpt_compat")


def _project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]


@nox.session(python=False, default=False)
def constraints(session: nox.Session) -> None:
    """Regenerate constraints/<row-id>.txt (all rows, or the row ids given after --)."""
    wanted = session.posargs or [row.id for row in ROWS]
    unknown = sorted(set(wanted) - set(ROWS_BY_ID))
    if unknown:
        session.error(f"unknown row ids {unknown}; known: {list(ROWS_BY_ID)}")
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
        printf = "\\n".join(requirements)
        header = [
            f"# Matrix row {row.id}: transformers {row.transformers} with the packages PyPI had",
            f"# on {row.cutoff} (transformers {row.transformers} was uploaded {row.uploaded});",
            f"# torch {TORCH} is installed beside these pins and is not listed. Resolved as of",
            *textwrap.wrap(
                f"{TOOLS_CUTOFF} instead: {', '.join(UNDATED)} (see UNDATED in noxfile.py).",
                width=96,
                initial_indent="# ",
                subsequent_indent="# ",
            ),
        ]
        if row.id in EXTRA_PINS:
            header.append(f"# Extra pins for this row (see EXTRA_PINS): {' '.join(EXTRA_PINS[row.id])}")
        header += [
            f"# Regenerate: nox -s constraints -- {row.id}",
            "# which runs (requirements on stdin):",
            f"#   printf '{printf}\\n' | \\",
            "#   " + " ".join(c for c in cmd if c != "--quiet"),
            f"# Use: uv pip install torch=={TORCH} -c constraints/{row.id}.txt transformers peft accelerate \\",
            "#   transformers_stream_generator safetensors pytest -e .",
        ]
        row.constraints.write_text("\n".join(header) + "\n" + pins, encoding="utf-8")
        session.log(f"{row.id}: wrote {row.constraints.name} in {time.monotonic() - started:.1f}s")


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
