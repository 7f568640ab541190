"""What the doctor asks the installed packages: versions, capabilities, companions, the stream package.

Every question is guarded: a broken or missing torch, transformers or peft becomes a problem in the report.
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
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from packaging.version import Version

from .._hooks import speed_hooks
from .._loading import import_hook_disabled_by_env, is_remote_code_loading_enabled
from .._repairs.streaming import STREAM_PACKAGE, stream_generator_incompatibility, stream_generator_problem
from .._versions import capabilities
from .releases import install_advice, matrix_pins
from .report import Problem

__all__ = [
    "Runtime",
    "import_hook_enabled",
    "installed_versions",
    "peft_probe",
    "start_peft_probe",
    "stream_generator_status",
    "torch_load_refuses_rng_state",
]

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
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


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
        start_peft_probe()
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
        peft_fine = self._require("peft", self._peft_fix())
        if self.caps is not None:
            self._check_companions()
            self._check_resume()
        failure = peft_probe()  # collected even when unused: no interpreter left behind
        if self.caps is not None and peft_fine and failure is not None:
            self._report_peft_failure(failure)

    def _require(self, package: str, fix: str) -> bool:
        """Whether ``package`` imports; a problem when it does not."""
        error = self._import_error(package)
        if error:
            summary = f"{package} cannot be imported: {error}"
            self.problems.append(Problem(f"{package}-unusable", summary, fix, needs_action=True, subject=package))
        return not error

    def _peft_fix(self) -> str:
        """Install the peft the test matrix runs with the nearest transformers (a release that exists)."""
        transformers_version = self.versions.get("transformers")
        pins = matrix_pins(transformers_version)
        if pins is None:
            return "Install a peft released together with the installed transformers."
        if pins.peft == self.versions.get("peft"):
            return (
                f"peft {pins.peft} is the release the library's test matrix runs with transformers "
                f"{pins.transformers}: reinstall torch, transformers and peft together, then run the doctor "
                "again."
            )
        same = pins.transformers == transformers_version
        nearest = "" if same else f", the nearest below {transformers_version}"
        return (
            f"pip install 'peft=={pins.peft}' (the peft the library's test matrix runs with transformers "
            f"{pins.transformers}{nearest})"
        )

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
                    install_advice("accelerate", accelerate_needed),
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
                    f"adapter methods, {install_advice('peft', peft_needed)}",
                    subject="peft",
                )
            )

    def _report_peft_failure(self, failure: str) -> None:
        """peft imports, and its get_peft_model fails with this transformers and torch (see peft_probe)."""
        fix = self._peft_fix().rstrip(".")
        if "torch.distributed' has no attribute 'tensor'" in failure:
            fix += "; or keep this peft and `import torch.distributed.tensor` before calling get_peft_model"
        self.problems.append(
            Problem(
                "peft-fails-with-transformers",
                f"peft {self.versions.get('peft')}'s get_peft_model fails with transformers "
                f"{self.versions.get('transformers')} and torch {self.versions.get('torch')} (LoRA on a tiny "
                f"Llama built in memory, in a fresh interpreter): {failure}",
                fix,
                needs_action=True,
                subject="peft",
            )
        )

    def _check_resume(self) -> None:
        """``Trainer.train(resume_from_checkpoint=...)``: transformers < 4.47 loads ``rng_state.pth`` with a
        bare ``torch.load``, which torch >= 2.6 refuses (weights only). transformers is asked by version
        (running a Trainer to resume is too heavy for the doctor), torch by behaviour
        (:func:`torch_load_refuses_rng_state`).
        """
        transformers_version = self.versions.get("transformers")
        try:
            if Version(str(transformers_version)) >= RNG_STATE_LOADS_SINCE:
                return
        except Exception:  # noqa: BLE001 - no readable version: nothing claimed
            return
        refusal = torch_load_refuses_rng_state()
        if refusal is None:
            return
        self.problems.append(
            Problem(
                "resume-from-checkpoint-fails",
                f"Trainer.train(resume_from_checkpoint=...) raises on transformers {transformers_version} "
                f"with torch {self.versions.get('torch')}: {refusal} (loading the checkpoint's "
                f"rng_state.pth: transformers < {RNG_STATE_LOADS_SINCE} calls torch.load without allowing "
                "numpy's RNG state, and torch >= 2.6 loads weights only by default)",
                f"pip install 'transformers>={RNG_STATE_LOADS_SINCE}', or 'torch<2.6'; or, for checkpoints "
                "you trust, set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment of the run that "
                "resumes.",
                subject="transformers",
            )
        )

    # -- questions about transformers' classes (None: cannot tell)

    @functools.cached_property
    def pretrained_model(self) -> Optional[type]:
        return self._attribute("transformers", "PreTrainedModel")

    @functools.cached_property
    def tokenizer_base(self) -> Optional[type]:
        return self._attribute("transformers", "PreTrainedTokenizerBase")

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


#: The first transformers whose Trainer loads the RNG state with an allowlist (``safe_globals``) that torch
#: >= 2.6's weights-only loading accepts (transformers issue #34631); every release before calls a bare
#: ``torch.load`` there. Measured: 4.46.3 raises, 4.47.0 resumes (torch 2.13).
RNG_STATE_LOADS_SINCE = Version("4.47.0")


def torch_load_refuses_rng_state() -> Optional[str]:
    """Why torch's ``torch.load`` with its default arguments refuses an RNG state as ``Trainer`` saves it
    (python's, numpy's and torch's), or ``None`` when it loads it. In memory; guarded."""
    import io
    import pickle
    import random

    with quiet():
        try:
            import numpy
            import torch

            buffer = io.BytesIO()
            state = {"python": random.getstate(), "numpy": numpy.random.get_state(),
                     "cpu": torch.random.get_rng_state()}
            torch.save(state, buffer)
            buffer.seek(0)
        except Exception:  # noqa: BLE001 - cannot tell
            return None
        try:
            torch.load(buffer)
        except pickle.UnpicklingError as error:
            # "Weights only load failed. This file can still be loaded, ..." (terminal escapes too): its start
            return f"UnpicklingError: {_ESCAPES.sub('', str(error)).split('.')[0]}"
        except Exception:  # noqa: BLE001
            return None
    return None


#: Run by :func:`peft_probe` in a fresh interpreter: LoRA on a tiny Llama built in memory (no download, none
#: of the user's model code), as a training script does it. Prints a JSON line: the stage reached, the error.
_PEFT_PROBE = """\
import json, warnings
warnings.simplefilter("ignore")
result = {"stage": "import"}
try:
    import torch, transformers, peft
    result["stage"] = "model"
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    result["stage"] = "get_peft_model"
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    result["stage"] = "done"
except BaseException as error:
    message = (str(error).strip().splitlines() or [""])[0]
    result["error"] = (type(error).__name__ + ": " + message).rstrip(": ")
print("\\n" + json.dumps(result))
"""


#: (interpreter, PYTHONPATH) -> the running probe (``subprocess.Popen``), or its answer once collected.
_PEFT_PROBES: dict = {}


def start_peft_probe() -> None:
    """Starts :func:`peft_probe`'s interpreter, so that it runs while this one asks its own questions."""
    key = (sys.executable, os.environ.get("PYTHONPATH"))
    if key in _PEFT_PROBES:
        return
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                       PYTHONWARNINGS="ignore")
    try:
        _PEFT_PROBES[key] = subprocess.Popen([sys.executable, "-c", _PEFT_PROBE], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                                             env=environment)
    except Exception:  # noqa: BLE001 - cannot start it: cannot tell
        _PEFT_PROBES[key] = None


def peft_probe() -> Optional[str]:
    """Why ``get_peft_model`` fails with the installed peft, transformers and torch, or ``None`` (it works,
    or the probe could not tell: a failure before get_peft_model is another problem's).

    Asked in a fresh interpreter, so that a broken peft is reported, not raised, and so that what this process
    imported (``torch.distributed.tensor``, say) does not hide it. Once per interpreter and ``PYTHONPATH``.
    """
    start_peft_probe()
    key = (sys.executable, os.environ.get("PYTHONPATH"))
    probe = _PEFT_PROBES[key]
    if isinstance(probe, subprocess.Popen):
        try:
            output, _ = probe.communicate(timeout=300)
            result = json.loads(output.strip().splitlines()[-1])
            failed = result.get("stage") == "get_peft_model" and result.get("error")
            probe = short_message(result["error"]) if failed else None
        except Exception:  # noqa: BLE001 - a probe that hangs or does not answer: cannot tell
            probe.kill()
            probe.communicate()
            probe = None
        _PEFT_PROBES[key] = probe
    return probe


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
