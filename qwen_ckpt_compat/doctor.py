"""``qwen-ckpt-compat doctor [MODEL] [--json]``: what is wrong with this environment and this model, and what to do.

The doctor never imports or runs the model's remote code and never loads weights. It reads ``config.json``, the
files ``auto_map`` names (parsed with :mod:`ast`, see :mod:`qwen_ckpt_compat.static_analysis`), and asks the
installed transformers what it can do (:func:`qwen_ckpt_compat.versions.capabilities`). Every question put to an
installed package is guarded, so that a broken or missing torch or transformers is reported, not raised.

The JSON output follows ``doctor_schema.json`` (shipped with the package; documented in ``docs/doctor.md``).
Exit status: 0 when nothing needs the user's action, 1 when something does, 2 when the input cannot be read.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

from packaging.version import Version

from ._version import __version__
from .loading import _NO_IMPORT_HOOK_ENV, STREAM_PACKAGE
from .static_analysis import (
    ClassFacts,
    ClassReference,
    ModuleFacts,
    RemoteCode,
    RemoteCodeError,
    auto_map_references,
)

__all__ = ["SCHEMA_PATH", "SCHEMA_VERSION", "DoctorInputError", "Problem", "Report", "diagnose", "render_text", "run"]

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "doctor_schema.json"

#: What the library call that fixes a problem is; ``None`` in a problem means the library cannot fix it.
FIXED_BY = ("import", "patch", "prepare_for_lora")

#: (key in the report, distribution name); python is added from the interpreter.
_DISTRIBUTIONS = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("deepspeed", "deepspeed"),
    ("bitsandbytes", "bitsandbytes"),
    ("transformers_stream_generator", "transformers_stream_generator"),
    ("huggingface_hub", "huggingface_hub"),
    ("qwen_ckpt_compat", "qwen-ckpt-compat"),
)
_MODEL_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel")
_GENERATING_METHODS = ("prepare_inputs_for_generation", "generate")
_INSTALL_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn", "yaml": "pyyaml"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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
    """Everything the doctor found; :meth:`to_json` follows ``doctor_schema.json``."""

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


# ------------------------------------------------------------------------------------ the installation


_FILE_SUFFIX = re.compile(r"\s*\([^()]*\.py\)$")


def _short(text: str) -> str:
    """The first line of an error message, without the trailing ``(/path/to/module.py)`` of ImportErrors."""
    lines = text.strip().splitlines()
    return _FILE_SUFFIX.sub("", lines[0]) if lines else ""


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {_short(str(error))}".rstrip(": ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings while probing installed packages (deprecation notices are not the doctor's output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def installed_versions() -> dict:
    """Installed versions (metadata only, nothing imported); ``None`` for what is not installed."""
    found: dict = {"python": platform.python_version()}
    for key, distribution in _DISTRIBUTIONS:
        try:
            found[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[key] = None
        except Exception:  # noqa: BLE001 - broken metadata is reported as absent
            found[key] = None
    return found


class _Runtime:
    """Questions to the installed torch / transformers / peft / accelerate; each one guarded."""

    def __init__(self, versions: dict) -> None:
        self.versions = versions
        self.problems: list[Problem] = []
        self.caps: Any = None
        with _quiet():
            self._probe()

    def _probe(self) -> None:
        torch_error = self._import_error("torch")
        if torch_error:
            self.problems.append(
                Problem(
                    "torch-unusable",
                    f"torch cannot be imported: {torch_error}",
                    "Install a working torch (>= 2.0) for this Python; the library, transformers and peft need it.",
                    needs_action=True,
                )
            )
        try:
            from .versions import capabilities

            self.caps = capabilities()
        except Exception as error:  # noqa: BLE001 - transformers broken or missing: report it
            self.problems.append(
                Problem(
                    "transformers-unusable",
                    f"transformers cannot be used: {_one_line(error)}",
                    "Install transformers (>= 4.31) working with the installed torch; nothing that needs it was checked.",
                    needs_action=True,
                )
            )
        peft_error = self._import_error("peft")
        if peft_error:
            self.problems.append(
                Problem(
                    "peft-unusable",
                    f"peft cannot be imported: {peft_error}",
                    "Install a peft released together with (or after) the installed transformers.",
                    needs_action=True,
                )
            )
        if self.caps is not None:
            self._check_companions()

    @staticmethod
    def _import_error(name: str) -> Optional[str]:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001
            return _one_line(error)
        return None

    def _minimum(self, module: str, attribute: str) -> Optional[Version]:
        try:
            return Version(getattr(importlib.import_module(module), attribute))
        except Exception:  # noqa: BLE001 - not in this release
            return None

    def _check_companions(self) -> None:
        transformers_version = self.versions.get("transformers")
        accelerate_needed = self._minimum("transformers.utils.import_utils", "ACCELERATE_MIN_VERSION")
        accelerate = self.versions.get("accelerate")
        if accelerate_needed is not None and (accelerate is None or Version(accelerate) < accelerate_needed):
            self.problems.append(
                Problem(
                    "accelerate-too-old",
                    f"transformers {transformers_version}'s Trainer needs accelerate >= {accelerate_needed}; "
                    f"installed: {accelerate or 'none'}",
                    f"pip install 'accelerate>={accelerate_needed}'",
                    needs_action=True,
                    subject="accelerate",
                )
            )
        peft_needed = self._minimum("transformers.integrations.peft", "MIN_PEFT_VERSION")
        peft = self.versions.get("peft")
        if peft_needed is not None and peft is not None and Version(peft) < peft_needed:
            self.problems.append(
                Problem(
                    "peft-too-old-for-transformers",
                    f"transformers {transformers_version}'s own PEFT integration (model.add_adapter, "
                    f"model.load_adapter, ...) needs peft >= {peft_needed}; installed: {peft}",
                    f"peft's own API (get_peft_model, PeftModel.from_pretrained) works as it is; for transformers' "
                    f"adapter methods, pip install 'peft>={peft_needed}'",
                    subject="peft",
                )
            )

    # -- questions about transformers' classes (None: cannot tell)

    @functools.cached_property
    def pretrained_model(self) -> Optional[type]:
        return self._attribute("transformers", "PreTrainedModel")

    @functools.cached_property
    def generation_mixin(self) -> Optional[type]:
        return self._attribute("transformers.generation", "GenerationMixin")

    @functools.cached_property
    def config_attributes(self) -> Optional[frozenset]:
        """What every config has on this release: attributes of a default ``PretrainedConfig``."""
        with _quiet():
            try:
                from transformers import PretrainedConfig

                return frozenset(dir(PretrainedConfig()))
            except Exception:  # noqa: BLE001
                return None

    def config_keeps(self, name: str, value: Any) -> Optional[bool]:
        """Whether a ``PretrainedConfig`` given ``name=value`` (as from config.json) has the attribute after.

        5.x drops generation parameters (``max_length`` ...) found in config.json instead of loading them.
        """
        with _quiet():
            try:
                from transformers import PretrainedConfig

                return hasattr(PretrainedConfig(**{name: value}), name)
            except Exception:  # noqa: BLE001
                return None

    def _attribute(self, module: str, name: str) -> Optional[Any]:
        if self.caps is None:
            return None
        with _quiet():
            try:
                return getattr(importlib.import_module(module), name)
            except Exception:  # noqa: BLE001
                return None

    def external_class(self, dotted: str) -> Optional[type]:
        """The installed class a remote file names, e.g. ``transformers.PreTrainedModel``; ``None`` if unknown."""
        module, _, name = dotted.rpartition(".")
        if not module or module.split(".")[0] not in ("transformers", "torch"):
            return None
        found = self._attribute(module, name)
        return found if isinstance(found, type) else None

    def has_name(self, module: str, name: Optional[str]) -> Optional[str]:
        """Why ``from module import name`` (or ``import module``) fails here, or ``None`` when it works."""
        with _quiet():
            try:
                imported = importlib.import_module(module)
            except Exception as error:  # noqa: BLE001
                return _one_line(error)
            if name is None or name == "*":
                return None
            try:
                if hasattr(imported, name):
                    return None
            except Exception as error:  # noqa: BLE001 - a lazy module failing to import the name
                return _one_line(error)
            try:
                importlib.import_module(f"{module}.{name}")
                return None
            except Exception:  # noqa: BLE001
                return f"cannot import name '{name}' from '{module}'"

    def get_imports(self, path: Path) -> Optional[list]:
        """The packages transformers' own load-time import check demands for this file, or ``None``."""
        get_imports = self._attribute("transformers.dynamic_module_utils", "get_imports")
        if get_imports is None:
            return None
        try:
            return list(get_imports(str(path)))
        except Exception:  # noqa: BLE001
            return None

    def native_class(self, model_type: str) -> Optional[type]:
        """The transformers class a native ``model_type`` loads as with AutoModelForCausalLM (else AutoModel)."""
        for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
            names = self._attribute("transformers.models.auto.modeling_auto", mapping)
            name = names.get(model_type) if names is not None else None
            if isinstance(name, (list, tuple)):
                name = name[0] if name else None
            if name:
                found = self._attribute("transformers", name)
                if isinstance(found, type):
                    return found
        return None

    def knows_model_type(self, model_type: str) -> Optional[bool]:
        names = self._attribute("transformers.models.auto.configuration_auto", "CONFIG_MAPPING_NAMES")
        return None if names is None else model_type in names


@functools.lru_cache(maxsize=1)
def _stream_generator_status() -> tuple:
    """(status, detail): ``ok``, ``missing``, ``broken`` (does not import) or ``incompatible`` (imports, cannot stream)."""
    from .loading import stream_generator_incompatibility, stream_generator_problem

    with _quiet():
        if importlib.util.find_spec(STREAM_PACKAGE) is None:
            return "missing", f"{STREAM_PACKAGE} is not installed"
        try:
            problem = stream_generator_problem()
        except Exception as error:  # noqa: BLE001 - anything else its import raises
            problem = f"{STREAM_PACKAGE} does not import: {_one_line(error)}"
        if problem is not None:
            return "broken", _short(problem)
        try:
            incompatibility = stream_generator_incompatibility()
        except Exception as error:  # noqa: BLE001
            return "unknown", _one_line(error)
        if incompatibility is not None:
            return "incompatible", f"{STREAM_PACKAGE} {incompatibility[3:] if incompatibility.startswith('it ') else incompatibility}"
        return "ok", None


def _import_hook_enabled() -> bool:
    from .loading import is_remote_code_loading_enabled

    env = os.environ.get(_NO_IMPORT_HOOK_ENV, "").strip().lower() in ("1", "true", "yes")
    return is_remote_code_loading_enabled() or not env


# ----------------------------------------------------------------------------------------- the model


def _read_json(path: Path, required: bool) -> Optional[dict]:
    if not path.is_file():
        if required:
            what = "is a directory" if path.exists() else "is missing"
            raise DoctorInputError(path, f"{what}: a model directory needs a config.json file")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DoctorInputError(path, f"is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DoctorInputError(path, f"cannot be read ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise DoctorInputError(path, f"must hold a JSON object, not {type(data).__name__}")
    return data


def _hub_cache_location() -> str:
    try:
        from huggingface_hub import constants

        return str(getattr(constants, "HF_HUB_CACHE", None) or getattr(constants, "HUGGINGFACE_HUB_CACHE"))
    except Exception:  # noqa: BLE001
        return "the Hugging Face cache"


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a Hub repo, offline; `DoctorInputError` when it is not in the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with _quiet():
            import huggingface_hub
    except Exception as error:  # noqa: BLE001
        raise DoctorInputError(
            repo_id, f"is not a directory, and huggingface_hub cannot be imported to look it up ({_one_line(error)})"
        ) from None
    with _quiet():
        try:
            folder = huggingface_hub.snapshot_download(repo_id, local_files_only=True)
            if folder and Path(folder, "config.json").is_file():
                return Path(folder)
        except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError ...): try the single file
            pass
        try:
            config = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
            if isinstance(config, str) and Path(config).is_file():
                return Path(config).parent
        except Exception:  # noqa: BLE001
            pass
    raise DoctorInputError(
        repo_id,
        f"is not a local directory, and the Hub repo {repo_id!r} is not in the local cache "
        f"({_hub_cache_location()}); doctor never downloads. Download it first (`hf download {repo_id}`), "
        "or pass the model directory.",
    )


def locate(argument: str) -> tuple:
    """(directory, source) for a MODEL argument: a local directory, or a Hub id found in the local cache."""
    path = Path(argument).expanduser()
    if path.is_dir():
        return path.resolve(), "directory"
    if path.exists():
        raise DoctorInputError(path, "is a file; pass the model directory (the one holding config.json)")
    if _REPO_ID.fullmatch(argument) and not argument.startswith((".", "~")):
        return _hub_snapshot(argument), "hub-cache"
    raise DoctorInputError(path, "no such directory")


@dataclass
class _Model:
    """The model as read from disk (no runtime questions yet)."""

    directory: Path
    config: dict
    auto_map: dict
    code: RemoteCode
    model_reference: Optional[ClassReference] = None
    model_class: Optional[ClassFacts] = None
    config_class: Optional[ClassFacts] = None
    references: dict = field(default_factory=dict)

    @property
    def model_type(self) -> Optional[str]:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def remote(self) -> bool:
        return self.model_class is not None

    def remote_mro(self, cls: ClassFacts) -> list:
        return [k for k in self.code.mro(cls) if isinstance(k, ClassFacts)]

    def external_bases(self, cls: ClassFacts) -> list:
        return [k for k in self.code.mro(cls) if isinstance(k, str)]

    def first_defining(self, attribute: str, *, method: bool = False) -> Optional[ClassFacts]:
        assert self.model_class is not None
        for klass in self.remote_mro(self.model_class):
            if (attribute in klass.methods) if method else (attribute in klass.attributes):
                return klass
        return None

    @property
    def model_modules(self) -> list:
        """Every parsed file except the configuration class's own."""
        skip = self.config_class.module if self.config_class is not None else None
        return [m for m in self.code.modules if m is not skip]


def read_model(directory: Path) -> _Model:
    """Reads ``config.json`` and parses the remote code it names; `DoctorInputError` for unreadable input."""
    config_path = directory / "config.json"
    config = _read_json(config_path, required=True)
    assert config is not None
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise DoctorInputError(config_path, f"auto_map must be an object, not {type(auto_map).__name__}")
    tokenizer_config = _read_json(directory / "tokenizer_config.json", required=False) or {}
    tokenizer_map = tokenizer_config.get("auto_map") or {}
    try:
        references = auto_map_references(auto_map)
        if isinstance(tokenizer_map, dict):
            for key, refs in auto_map_references(tokenizer_map).items():
                references.setdefault(key, refs)
    except ValueError as error:
        raise DoctorInputError(config_path, f"auto_map: {error}") from None

    model = _Model(directory=directory, config=config, auto_map=auto_map, code=RemoteCode(directory, _hub_snapshot))
    model.references = references
    try:
        resolved = {key: [model.code.resolve(ref) for ref in refs] for key, refs in references.items()}
    except RemoteCodeError as error:
        raise DoctorInputError(error.path, error.message) from None
    if "AutoConfig" in resolved:
        model.config_class = resolved["AutoConfig"][0]
    model_keys = [k for k in _MODEL_AUTO_CLASSES if k in resolved]
    model_keys += sorted(k for k in resolved if k.startswith("AutoModel") and k not in model_keys)
    if model_keys:
        model.model_reference = references[model_keys[0]][0]
        model.model_class = resolved[model_keys[0]][0]
    return model


def _family(model: _Model) -> Optional[str]:
    # Integration point for the families registry (qwen_ckpt_compat/families/, issue 8): it may name the
    # family from the model type and the static facts; until then the family is the model type, with Qwen-VL
    # told apart by its `visual` config.
    if model.model_type == "qwen" and isinstance(model.config.get("visual"), dict):
        return "qwen-vl"
    return model.model_type


def _literal(klass: Optional[ClassFacts], attribute: str) -> Any:
    if klass is None:
        return None
    try:
        return klass.literal(attribute)
    except (ValueError, SyntaxError, TypeError):
        return None


@dataclass
class _Facts:
    """The model facts of the report, plus what the checks need."""

    remote: bool
    old_api: bool = False
    checkpointing_class: Optional[ClassFacts] = None
    owners: list = field(default_factory=list)
    decoder_blocks: Optional[list] = None
    supports_gradient_checkpointing: Optional[bool] = None
    qwen_style: bool = False


def _model_facts(model: _Model, runtime: _Runtime) -> _Facts:
    from .loading import is_qwen_style_module

    if model.model_class is None:
        native = runtime.native_class(model.model_type) if model.model_type else None
        facts = _Facts(remote=False)
        if native is not None:
            facts.decoder_blocks = list(getattr(native, "_no_split_modules", None) or [])
            facts.supports_gradient_checkpointing = bool(getattr(native, "supports_gradient_checkpointing", False))
        return facts
    facts = _Facts(remote=True, qwen_style=is_qwen_style_module(str(model.model_class.module.path)))
    owner = model.first_defining("_set_gradient_checkpointing", method=True)
    if owner is not None and "value" in owner.parameters("_set_gradient_checkpointing"):
        facts.old_api = True
        facts.checkpointing_class = owner
        facts.owners = owner.isinstance_targets("_set_gradient_checkpointing")
    blocks = model.first_defining("_no_split_modules")
    if blocks is None:
        facts.decoder_blocks = []
    else:
        value = _literal(blocks, "_no_split_modules")
        facts.decoder_blocks = [str(v) for v in value] if isinstance(value, (list, tuple)) else None
    support = model.first_defining("supports_gradient_checkpointing")
    if support is not None:
        value = _literal(support, "supports_gradient_checkpointing")
        facts.supports_gradient_checkpointing = value if isinstance(value, bool) else None
    else:
        bases = [runtime.external_class(b) for b in model.external_bases(model.model_class)]
        known = [b for b in bases if b is not None]
        if known:
            facts.supports_gradient_checkpointing = bool(getattr(known[0], "supports_gradient_checkpointing", False))
    return facts


def _model_json(model: _Model, facts: _Facts) -> dict:
    klass = facts.checkpointing_class
    return {
        "config_path": str(model.directory / "config.json"),
        "model_type": model.model_type,
        "family": _family(model),
        "remote_code": facts.remote,
        "model_class": model.model_class.name if model.model_class else None,
        "model_file": model.model_class.module.path.name if model.model_class else None,
        "code_files": sorted(
            m.path.name if m.path.parent == model.directory else str(m.path) for m in model.code.modules
        ),
        "old_gradient_checkpointing_api": facts.old_api,
        "checkpointing_class": klass.name if klass else None,
        "checkpointing_signature": (
            f"{klass.name}._set_gradient_checkpointing({', '.join(klass.parameters('_set_gradient_checkpointing'))})"
            if klass else None
        ),
        "checkpointing_owners": list(facts.owners),
        "decoder_blocks": facts.decoder_blocks,
        "supports_gradient_checkpointing": facts.supports_gradient_checkpointing,
        "qwen_style_remote_code": facts.qwen_style,
    }


# ------------------------------------------------------------------------------------------ the checks


@dataclass
class _Context:
    model: _Model
    facts: _Facts
    runtime: _Runtime
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
        """Who fixes what the import hook fixes: the hook for Qwen-style code, else ``patch`` for old-API code."""
        if self.facts.qwen_style:
            return "import"
        return "patch" if self.facts.old_api else None


_PREPARE = (
    "`model = prepare_for_lora(model)` after loading, before or after get_peft_model (or `patch(model)` before "
    "enabling checkpointing yourself)"
)
_IMPORT_FIRST = (
    "`import qwen_ckpt_compat` before `from_pretrained(..., trust_remote_code=True)` (the import installs the "
    "fix; it does not act on a model loaded before it)"
)


def _check_model_type(ctx: _Context) -> None:
    model = ctx.model
    if model.remote or model.model_type is None:
        if model.model_type is None and not model.remote:
            ctx.add(
                "no-model-type",
                "config.json has neither model_type nor an auto_map model class: transformers cannot load it",
                "Use the config.json of the original checkpoint.",
                needs_action=True,
            )
        return
    known = ctx.runtime.knows_model_type(model.model_type)
    if known is False:
        code = sorted(p.name for p in model.directory.glob("*.py"))
        hint = (
            f"; the directory holds {', '.join(code)}: restore config.json's auto_map that names them and load "
            "with trust_remote_code=True"
            if code
            else ""
        )
        ctx.add(
            "unknown-model-type",
            f"transformers {ctx.transformers} has no model type {model.model_type!r} and config.json has no "
            f"auto_map naming remote code",
            f"Use a transformers release that has {model.model_type!r}, or the original config.json{hint}.",
            needs_action=True,
            subject=model.model_type,
        )


def _check_checkpointing_api(ctx: _Context) -> None:
    facts, caps = ctx.facts, ctx.caps
    if facts.supports_gradient_checkpointing is False:
        ctx.add(
            "checkpointing-not-supported",
            "the model's supports_gradient_checkpointing is False: transformers and prepare_for_lora refuse to "
            "checkpoint it",
            "Train without checkpointing (`prepare_for_lora(model, use_gradient_checkpointing=False)`), or use a "
            "revision of the model that supports it.",
            needs_action=True,
        )
        return
    if not facts.old_api or caps is None:
        return
    klass = facts.checkpointing_class.name if facts.checkpointing_class else "the model"
    if not caps.new_set_gradient_checkpointing_call:
        ctx.add(
            "old-gc-api-reentrant-only",
            f"transformers {ctx.transformers} takes no checkpointing kwargs, and {klass}'s own checkpointing is "
            "reentrant, always: use_reentrant=False, every_n_layers and offload cannot be asked for",
            f"Fixed by {_PREPARE}: its options are honoured on this release.",
            fixed_by="prepare_for_lora",
        )
    elif not caps.old_format_fallback:
        ctx.add(
            "old-gc-api-enable-typeerror",
            f"gradient_checkpointing_enable() raises TypeError on transformers {ctx.transformers}: "
            f"{klass}._set_gradient_checkpointing() got an unexpected keyword argument 'enable'",
            f"Fixed by {_PREPARE}.",
            fixed_by="prepare_for_lora",
        )
    else:
        ignored = ["gradient_checkpointing_kwargs (use_reentrant=False)"]
        ignored += [name for name, present in (("every_n_layers", caps.every_n_layers), ("offload", caps.offload)) if present]
        ctx.add(
            "old-gc-api-kwargs-ignored",
            f"transformers {ctx.transformers} takes {klass}'s old _set_gradient_checkpointing(module, value) path "
            f"and silently ignores {', '.join(ignored)}: checkpointing is always reentrant",
            f"Fixed by {_PREPARE}.",
            fixed_by="prepare_for_lora",
        )
    if caps.old_format_fallback or not caps.new_set_gradient_checkpointing_call:
        if not caps.enable_adds_input_grads:
            ctx.add(
                "lora-no-input-grads",
                "checkpointing enabled after get_peft_model (or by Trainer) with a frozen base fails: RuntimeError: "
                "element 0 of tensors does not require grad and does not have a grad_fn",
                f"Fixed by {_PREPARE}.",
                fixed_by="prepare_for_lora",
            )


def _check_options(ctx: _Context) -> None:
    facts, caps = ctx.facts, ctx.caps
    if caps is None or facts.supports_gradient_checkpointing is False:
        return
    if facts.old_api:
        if facts.decoder_blocks == []:
            ctx.add(
                "options-not-honoured",
                "the model names no decoder blocks in _no_split_modules, so even with qwen-ckpt-compat its remote "
                "code checkpoints itself, reentrantly and every layer: use_reentrant=False, every_n_layers and "
                "offload cannot be honoured",
                "Nothing to do unless you need those options; prepare_for_lora warns (CompatWarning) when asked.",
                subject="gradient_checkpointing_kwargs, every_n_layers, offload",
            )
        return
    missing = [
        name
        for name, present in (
            ("gradient_checkpointing_kwargs", caps.checkpointing_kwargs),
            ("every_n_layers", caps.every_n_layers),
            ("offload", caps.offload),
        )
        if not present
    ]
    if missing:
        ctx.add(
            "options-not-honoured",
            f"transformers {ctx.transformers}'s enable method does not take {', '.join(missing)}: for this model "
            "(transformers' own checkpointing) they cannot be honoured",
            "prepare_for_lora warns (CompatWarning) and uses transformers' behaviour; transformers >= 5.17 takes "
            "all three.",
            subject=", ".join(missing),
        )


def _modules_importing(model: _Model, package: str) -> list:
    return [
        (module, item)
        for module in model.code.modules
        for item in module.imports
        if item.package == package and not item.guarded
    ]


def _check_stream_generator(ctx: _Context) -> None:
    from .loading import is_qwen_style_module

    imports = _modules_importing(ctx.model, STREAM_PACKAGE)
    if not imports:
        return
    status, detail = _stream_generator_status()
    if status in ("ok", "unknown"):
        return
    files = sorted({module.path.name for module, _ in imports})
    excused = all(is_qwen_style_module(str(module.path)) for module, _ in imports)
    functions = sorted({f for module, item in imports if item.lazy for f in _enclosing_functions(module, item.line)})
    streaming = ", ".join(f"{f}()" for f in functions) or "the code that imports it"
    if status in ("missing", "broken"):
        if excused:
            ctx.add(
                "import-before-loading",
                f"transformers {ctx.transformers} cannot load this remote code by itself: its import check demands "
                f"{STREAM_PACKAGE} ({', '.join(files)}), and {detail}",
                f"Fixed by {_IMPORT_FIRST}.",
                fixed_by="import",
                subject=STREAM_PACKAGE,
            )
        else:
            fix = (
                f"pip install {STREAM_PACKAGE}"
                if status == "missing"
                else f"{STREAM_PACKAGE} cannot import on transformers >= 4.57: use transformers <= 4.56 with it"
            )
            ctx.add(
                "stream-generator-missing" if status == "missing" else "stream-generator-broken",
                f"loading fails: {', '.join(files)} import{'s' if len(files) == 1 else ''} {STREAM_PACKAGE} at "
                f"module level, and {detail}",
                fix + " (the library only excuses the package where it is imported inside a function, as Qwen does).",
                needs_action=True,
                subject=STREAM_PACKAGE,
            )
    if functions:
        ctx.add(
            "chat-stream-unavailable",
            f"{streaming} cannot stream: {detail}",
            "Use model.chat(...), or stream with model.generate(..., streamer=transformers.TextIteratorStreamer("
            "tokenizer)); with qwen-ckpt-compat imported, chat_stream() raises StreamingUnavailableError saying so.",
            subject=STREAM_PACKAGE,
        )


def _enclosing_functions(module: ModuleFacts, line: int) -> list:
    import ast

    names = []
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            end = getattr(node, "end_lineno", None) or node.lineno
            if node.lineno <= line <= end:
                names.append(node.name)
    return names[-1:]  # the innermost


def _check_packages(ctx: _Context) -> None:
    demanded: dict = {}
    for module in ctx.model.code.modules:
        packages = ctx.runtime.get_imports(module.path)
        if packages is None:
            packages = [i.package for i in module.imports if i.level == 0 and not i.guarded]
        for package in packages:
            if package and package != STREAM_PACKAGE:
                demanded.setdefault(package, module.path.name)
    for package, file in demanded.items():
        try:
            missing = importlib.util.find_spec(package) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            ctx.add(
                "missing-package",
                f"loading fails: {file} imports {package}, which is not installed (transformers checks every "
                "import of the remote code when it loads)",
                f"pip install {_INSTALL_NAMES.get(package, package)}",
                needs_action=True,
                subject=package,
            )


def _check_transformers_imports(ctx: _Context) -> None:
    if ctx.caps is None:
        return
    for module in ctx.model.code.modules:
        for item in module.imports:
            if item.level != 0 or item.package != "transformers" or item.guarded:
                continue
            for name in item.names or (None,):
                reason = ctx.runtime.has_name(item.module, name)
                if reason is None:
                    continue
                what = f"{item.module}.{name}" if name else item.module
                where = f"{module.path.name} line {item.line}"
                consequence = (
                    f"calling {', '.join(f'{f}()' for f in _enclosing_functions(module, item.line))} fails"
                    if item.lazy
                    else "loading fails"
                )
                ctx.add(
                    "removed-transformers-import",
                    f"{consequence}: {where} imports {what}, which transformers {ctx.transformers} does not have "
                    f"({reason})",
                    "The remote code needs a transformers release that still has it (or an updated revision of "
                    "the model's code); qwen-ckpt-compat does not replace it.",
                    needs_action=not item.lazy,
                    subject=what,
                )


def _check_removed_methods(ctx: _Context) -> None:
    runtime, model = ctx.runtime, ctx.model
    base = runtime.pretrained_model
    if base is None or not model.remote:
        return
    try:
        from .removed_apis import REPLACEMENTS
    except Exception:  # noqa: BLE001 - torch broken: already reported
        REPLACEMENTS = {}
    mixin = runtime.generation_mixin
    missing: dict = {}
    for module in model.model_modules:
        for klass in module.classes.values():
            externals = [runtime.external_class(name) for name in model.external_bases(klass)]
            if not any(e is not None and issubclass(e, base) for e in externals) or None in externals:
                continue  # not a model class, or a base the doctor cannot inspect
            remote = model.remote_mro(klass)
            generates = any(k.defines(name) for k in remote for name in _GENERATING_METHODS)
            for name, line in klass.self_calls.items():
                if any(k.defines(name) for k in remote) or any(hasattr(e, name) for e in externals):
                    continue
                if generates and mixin is not None and hasattr(mixin, name):
                    continue  # transformers adds GenerationMixin to generating remote classes when loading them
                missing.setdefault(name, (klass, line))
    for name, (klass, line) in missing.items():
        fixed_by = ctx.fixed_by_loading_hook() if name in REPLACEMENTS else None
        how = {
            "import": f"Fixed by {_IMPORT_FIRST}; `patch(model)` also adds it to a model loaded before.",
            "patch": f"Fixed by {_PREPARE}, before the first forward.",
        }.get(fixed_by or "", "qwen-ckpt-compat does not replace it: use a transformers release that still has it.")
        ctx.add(
            "removed-api-called",
            f"{klass.name} calls self.{name}() ({klass.module.path.name} line {line}), which transformers "
            f"{ctx.transformers}'s {base.__name__} does not have: AttributeError when that code runs",
            how,
            fixed_by=fixed_by,
            needs_action=fixed_by is None,
            subject=name,
        )


def _check_config_attributes(ctx: _Context) -> None:
    defaults = ctx.runtime.config_attributes
    model = ctx.model
    if defaults is None or not model.remote:
        return
    known = set(defaults)
    if model.config_class is not None:
        for klass in model.remote_mro(model.config_class):
            known |= klass.self_assigned | set(klass.attributes) | set(klass.methods)
            if "__init__" in klass.methods:
                known |= {p.lstrip("*") for p in klass.parameters("__init__")}
            attribute_map = _literal(klass, "attribute_map") if "attribute_map" in klass.attributes else None
            if isinstance(attribute_map, dict):
                known |= set(attribute_map)
    for module in model.model_modules:
        for name, line in module.config_reads.items():
            if name in known or name.startswith("__"):
                continue
            known.add(name)
            # config.json's keys become attributes, except those this release drops (5.x: generation parameters)
            kept = ctx.runtime.config_keeps(name, model.config.get(name, 20))
            if name in model.config and kept is not False:
                continue
            where = f"{module.path.name} line {line} reads config.{name}"
            if kept is False:
                ctx.add(
                    "config-attribute-missing",
                    f"{where}, which transformers {ctx.transformers} does not load from config.json (it drops "
                    f"{name} as a generation parameter) and neither the configuration class nor PretrainedConfig "
                    "provides: AttributeError when that code runs",
                    "Adding it to config.json does not help on this release: use transformers < 5.0, or a revision "
                    "of the model's code that does not read it.",
                    needs_action=True,
                    subject=name,
                )
                continue
            ctx.add(
                "config-attribute-missing",
                f"{where}, which neither config.json, the configuration class nor transformers "
                f"{ctx.transformers}'s PretrainedConfig provides: AttributeError when that code runs",
                f'Add "{name}" to config.json with the value the model expects, or use a transformers release whose '
                "PretrainedConfig still has it.",
                needs_action=True,
                subject=name,
            )


def _auto_enabled_checkpointing(model: _Model) -> Optional[str]:
    """Why the config carries a truthy ``gradient_checkpointing`` on every load, or ``None``."""
    value = model.config.get("gradient_checkpointing")
    if model.config_class is not None:
        for klass in model.remote_mro(model.config_class):
            init = klass.methods.get("__init__")
            if init is None:
                continue
            import ast

            for node in ast.walk(init):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "gradient_checkpointing" for t in node.targets
                ):
                    if isinstance(node.value, (ast.Tuple, ast.List)) and node.value.elts:
                        return (
                            f"{klass.name}.__init__ stores config.gradient_checkpointing as a "
                            f"{type(node.value).__name__.lower()} (line {node.lineno}), which is always true"
                        )
    if value:
        return f"config.json sets gradient_checkpointing to {json.dumps(value)}"
    return None


def _check_auto_enable(ctx: _Context) -> None:
    model, caps, base = ctx.model, ctx.caps, ctx.runtime.pretrained_model
    if not model.remote or caps is None or base is None or not ctx.facts.supports_gradient_checkpointing:
        return
    if not hasattr(base, "_backward_compatibility_gradient_checkpointing"):
        return
    calls_post_init = any("post_init" in k.self_calls for k in model.remote_mro(model.model_class))
    why = _auto_enabled_checkpointing(model) if calls_post_init else None
    if why is None:
        return
    if ctx.facts.old_api and caps.new_set_gradient_checkpointing_call and not caps.old_format_fallback:
        ctx.add(
            "load-raises-enable-typeerror",
            f"from_pretrained raises TypeError on transformers {ctx.transformers}: {why}, so post_init() enables "
            "checkpointing while the model is built, through the new call the old _set_gradient_checkpointing "
            "does not take",
            "Use transformers 4.34.1 or >= 4.36 (no patch can reach a model that is not built yet), or drop the "
            "truthy gradient_checkpointing from the configuration.",
            needs_action=True,
        )
        return
    ctx.add(
        "checkpointing-enabled-on-load",
        f"every from_pretrained turns gradient checkpointing on: {why}, and post_init() enables it",
        f"Fixed by {_PREPARE}; `prepare_for_lora(model, use_gradient_checkpointing=False)` turns it off.",
        fixed_by="prepare_for_lora",
    )


def _check_import_hook(ctx: _Context) -> None:
    if _import_hook_enabled():
        return
    if any(p.fixed_by == "import" for p in ctx.problems):
        ctx.add(
            "import-hook-disabled",
            f"{_NO_IMPORT_HOOK_ENV} is set, so `import qwen_ckpt_compat` does not install the loading fix that "
            "this model needs on this release",
            f"Unset {_NO_IMPORT_HOOK_ENV}, or call qwen_ckpt_compat.enable_remote_code_loading() before "
            "from_pretrained.",
            needs_action=True,
            subject=_NO_IMPORT_HOOK_ENV,
        )


@dataclass(frozen=True)
class FamilyFact:
    """A measured problem of one family that its code does not show (see shared/FAMILIES_FACTS.md)."""

    family: str
    id: str
    applies: Callable[[Any], bool]  # capabilities -> bool
    summary: str
    fix: str
    needs_action: bool


#: Family-specific knowledge, in one table. What can be seen in the code is checked generically above
#: (ChatGLM's `config.max_length` on 5.x is `config-attribute-missing`; Baichuan's always-true
#: `gradient_checkpointing` is `checkpointing-enabled-on-load` / `load-raises-enable-typeerror`). The families
#: registry (qwen_ckpt_compat/families/) is meant to take this table over: each family module would contribute
#: its own FamilyFact entries (and, where it repairs something, mark the matching problem fixed).
FAMILY_FACTS: tuple = (
    FamilyFact(
        "internlm",
        "internlm-nan-loss",
        lambda caps: caps.transformers >= Version("5.0"),
        "InternLM v1 gives loss = nan on transformers 5.x even in a plain forward, without checkpointing "
        "(measured on 5.0.0 and 5.23.0; the cause is not established)",
        "Use transformers 4.55.4 (the newest release measured to work with InternLM v1).",
        True,
    ),
    FamilyFact(
        "qwen-vl",
        "qwen-vl-vision-not-checkpointed",
        lambda caps: True,
        "Qwen-VL: only the text blocks (QWenBlock) are checkpointed; the vision tower's blocks are not in "
        "_no_split_modules, and its behaviour under checkpointing is not established",
        "Nothing to do for text-only batches (measured on 4.34.1-4.55.4); with images, check memory yourself.",
        False,
    ),
    FamilyFact(
        "qwen-vl",
        "qwen-vl-untested-release",
        lambda caps: caps.transformers >= Version("5.0"),
        "Qwen-VL on transformers 5.x is not established (measured on 4.34.1-4.55.4 only)",
        "Prefer transformers 4.55.4 for Qwen-VL until 5.x is measured.",
        False,
    ),
)


def _check_family(ctx: _Context) -> None:
    family = _family(ctx.model)
    if ctx.caps is None or family is None:
        return
    for fact in FAMILY_FACTS:
        if fact.family == family and fact.applies(ctx.caps):
            ctx.add(fact.id, fact.summary, fact.fix, needs_action=fact.needs_action, subject=family)


_CHECKS = (
    _check_model_type,
    _check_checkpointing_api,
    _check_options,
    _check_stream_generator,
    _check_packages,
    _check_transformers_imports,
    _check_removed_methods,
    _check_config_attributes,
    _check_auto_enable,
    _check_family,
    _check_import_hook,  # last: it looks at what the others found
)


# ----------------------------------------------------------------------------------------- the report


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
    runtime = _Runtime(report.versions)
    report.capabilities = _capabilities_json(runtime.caps)
    status, detail = _stream_generator_status() if runtime.caps is not None else ("unknown", None)
    report.environment = {
        "import_hook_enabled": _import_hook_enabled(),
        "stream_generator": {"status": status, "detail": detail},
    }
    report.problems.extend(runtime.problems)
    if model is not None:
        facts = _model_facts(model, runtime)
        report.model = _model_json(model, facts)
        context = _Context(model=model, facts=facts, runtime=runtime)
        for check in _CHECKS:
            with _quiet():
                check(context)
        report.problems.extend(context.problems)
    return report


# ------------------------------------------------------------------------------------------- output

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
    versions = ", ".join(f"{k} {v or '-'}" for k, v in report.versions.items())
    lines.append(paint("Environment", "bold"))
    lines += _wrap(versions, "  ", "  ")
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
        detail = f" ({stream['detail']})" if stream["detail"] else ""
        lines += _wrap(f"{STREAM_PACKAGE}: {stream['status']}{detail}", "  ", "    ")
        if not report.environment["import_hook_enabled"]:
            lines.append(f"  import hook: off ({_NO_IMPORT_HOOK_ENV} is set)")
    model = report.model
    if model is not None:
        lines += ["", paint("Model", "bold") + f"  {report.path}" + (" (from the Hub cache)" if report.source == "hub-cache" else "")]
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
    heading = f"Problems: {len(report.problems)}" + (f" ({action} need{'s' if action == 1 else ''} your action)" if action else "")
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
