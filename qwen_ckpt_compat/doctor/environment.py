"""What the doctor asks the installed packages: versions, capabilities, companions, the stream package.

Every question is guarded: a broken or missing torch, transformers or peft becomes a problem in the report.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import platform
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from packaging.version import Version

from .._hooks import speed_hooks
from .._loading import import_hook_disabled_by_env, is_remote_code_loading_enabled
from .._repairs.streaming import STREAM_PACKAGE, stream_generator_incompatibility, stream_generator_problem
from .._versions import capabilities
from .report import Problem

__all__ = ["Runtime", "import_hook_enabled", "installed_versions", "stream_generator_status"]

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

_FILE_SUFFIX = re.compile(r"\s*\([^()]*\.py\)$")


def short_message(text: str) -> str:
    """The first line of an error message, without the trailing ``(/path/to/module.py)`` of ImportErrors."""
    lines = text.strip().splitlines()
    return _FILE_SUFFIX.sub("", lines[0]) if lines else ""


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {short_message(str(error))}".rstrip(": ")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings while probing installed packages (deprecation notices are not the doctor's output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _guarded(question: Callable[[], Any]) -> Any:
    """The answer to ``question``, or ``None`` when asking raises (a broken package is reported elsewhere)."""
    with quiet():
        try:
            return question()
        except Exception:  # noqa: BLE001
            return None


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


class Runtime:
    """Questions to the installed torch / transformers / peft / accelerate; each one guarded."""

    def __init__(self, versions: dict) -> None:
        self.versions = versions
        self.problems: list[Problem] = []
        self.caps: Any = None
        with quiet():
            self._probe()

    def _probe(self) -> None:
        self._require("torch", "Install a working torch (>= 2.0) for this Python; the library, transformers and peft need it.")
        try:
            self.caps = capabilities()
        except Exception as error:  # noqa: BLE001 - transformers broken or missing: report it
            self.problems.append(
                Problem(
                    "transformers-unusable",
                    f"transformers cannot be used: {one_line(error)}",
                    "Install transformers (>= 4.31) working with the installed torch; nothing that needs it was checked.",
                    needs_action=True,
                )
            )
        self._require("peft", "Install a peft released together with (or after) the installed transformers.")
        if self.caps is not None:
            self._check_companions()

    def _require(self, package: str, fix: str) -> None:
        error = self._import_error(package)
        if error:
            summary = f"{package} cannot be imported: {error}"
            self.problems.append(Problem(f"{package}-unusable", summary, fix, needs_action=True, subject=package))

    @staticmethod
    def _import_error(name: str) -> Optional[str]:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001
            return one_line(error)
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
    def selective_available(self) -> Optional[bool]:
        """Whether torch has selective activation checkpointing (``selective=True``); ``None``: cannot tell."""
        return _guarded(lambda: speed_hooks().selective_available())

    @functools.cached_property
    def attention_class_names(self) -> Optional[tuple]:
        """The attention classes ``fused_attention=True`` knows (Qwen v1's); ``None``: cannot tell."""
        return _guarded(lambda: tuple(speed_hooks().attention_class_names()))

    @functools.cached_property
    def generation_mixin(self) -> Optional[type]:
        return self._attribute("transformers.generation", "GenerationMixin")

    @functools.cached_property
    def config_attributes(self) -> Optional[frozenset]:
        """What every config has on this release: attributes of a default ``PretrainedConfig``."""
        return _guarded(lambda: frozenset(dir(importlib.import_module("transformers").PretrainedConfig())))

    def config_keeps(self, name: str, value: Any) -> Optional[bool]:
        """Whether a ``PretrainedConfig`` given ``name=value`` (as from config.json) has the attribute after.

        5.x drops generation parameters (``max_length`` ...) found in config.json instead of loading them.
        """
        return _guarded(lambda: hasattr(importlib.import_module("transformers").PretrainedConfig(**{name: value}), name))

    def _attribute(self, module: str, name: str) -> Optional[Any]:
        if self.caps is None:
            return None
        with quiet():
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
        with quiet():
            try:
                imported = importlib.import_module(module)
            except Exception as error:  # noqa: BLE001
                return one_line(error)
            if name is None or name == "*":
                return None
            try:
                if hasattr(imported, name):
                    return None
            except Exception as error:  # noqa: BLE001 - a lazy module failing to import the name
                return one_line(error)
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


def stream_generator_status() -> tuple:
    """(status, detail): ``ok``, ``missing``, ``broken`` (does not import) or ``incompatible`` (imports, cannot stream)."""
    with quiet():
        if importlib.util.find_spec(STREAM_PACKAGE) is None:
            return "missing", f"{STREAM_PACKAGE} is not installed"
        try:
            problem = stream_generator_problem()
        except Exception as error:  # noqa: BLE001 - anything else its import raises
            problem = f"{STREAM_PACKAGE} does not import: {one_line(error)}"
        if problem is not None:
            return "broken", short_message(problem)
        try:
            incompatibility = stream_generator_incompatibility()
        except Exception as error:  # noqa: BLE001
            return "unknown", one_line(error)
        if incompatibility is not None:
            # "it imports, but ..." -> "transformers_stream_generator imports, but ..."
            return "incompatible", f"{STREAM_PACKAGE} {incompatibility.split(' ', 1)[1] if incompatibility.startswith('it ') else incompatibility}"
        return "ok", None


def import_hook_enabled() -> bool:
    return is_remote_code_loading_enabled() or not import_hook_disabled_by_env()
