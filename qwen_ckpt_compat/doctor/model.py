"""The model the doctor reads: its directory (or cached Hub snapshot), config.json, and the facts of its code."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .._family_registry import family_for_config
from .._remote_code import ClassFacts, RemoteCode, RemoteCodeError, auto_map_references
from .._repairs.streaming import is_qwen_style_module
from .environment import Runtime, one_line, quiet
from .report import DoctorInputError

__all__ = ["ModelFacts", "ModelFiles", "class_constant", "family_of", "locate", "model_facts", "model_json", "read_model"]

_MODEL_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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
        raise DoctorInputError(path, f"cannot be read ({one_line(error)})") from None
    if not isinstance(data, dict):
        raise DoctorInputError(path, f"must hold a JSON object, not {type(data).__name__}")
    return data


def _hub_cache_location() -> str:
    try:
        from huggingface_hub import constants

        return str(getattr(constants, "HF_HUB_CACHE", None) or constants.HUGGINGFACE_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return "the Hugging Face cache"


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a Hub repo, offline; `DoctorInputError` when it is not in the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with quiet():
            import huggingface_hub
    except Exception as error:  # noqa: BLE001
        raise DoctorInputError(
            repo_id, f"is not a directory, and huggingface_hub cannot be imported to look it up ({one_line(error)})"
        ) from None
    with quiet():
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
class ModelFiles:
    """The model as read from disk (no runtime questions yet)."""

    directory: Path
    config: dict
    code: RemoteCode
    model_class: Optional[ClassFacts] = None
    config_class: Optional[ClassFacts] = None
    tokenizer_class: Optional[ClassFacts] = None
    tokenizer_config: dict = field(default_factory=dict)

    @property
    def model_type(self) -> Optional[str]:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def remote(self) -> bool:
        return self.model_class is not None

    def remote_mro(self, cls: ClassFacts) -> list:
        """The remote-code classes of ``cls``'s method resolution order, ``cls`` first."""
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


def read_model(directory: Path) -> ModelFiles:
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

    model = ModelFiles(
        directory=directory, config=config, code=RemoteCode(directory, _hub_snapshot), tokenizer_config=tokenizer_config
    )
    try:
        resolved = {key: [model.code.resolve(ref) for ref in refs] for key, refs in references.items()}
    except RemoteCodeError as error:
        raise DoctorInputError(error.path, error.message) from None
    if "AutoConfig" in resolved:
        model.config_class = resolved["AutoConfig"][0]
    model_keys = [k for k in _MODEL_AUTO_CLASSES if k in resolved]
    model_keys += sorted(k for k in resolved if k.startswith("AutoModel") and k not in model_keys)
    if model_keys:
        model.model_class = resolved[model_keys[0]][0]
    if "AutoTokenizer" in resolved:
        model.tokenizer_class = resolved["AutoTokenizer"][0]  # the slow class: remote tokenizers have no other
    return model


def family_of(model: ModelFiles) -> Optional[str]:
    """The registered family's name, from the files alone (the doctor never imports the model's classes); the
    model type for a family the registry does not know."""
    family = family_for_config(model.config)
    return family.name if family is not None else model.model_type


def class_constant(klass: Optional[ClassFacts], attribute: str) -> Any:
    """The class-level literal ``attribute`` of ``klass``, or ``None`` when absent or not a literal."""
    if klass is None or attribute not in klass.attributes:
        return None
    try:
        return klass.literal(attribute)
    except (ValueError, SyntaxError, TypeError):
        return None


@dataclass
class ModelFacts:
    """The model facts of the report, plus what the checks need."""

    remote: bool
    old_api: bool = False
    checkpointing_class: Optional[ClassFacts] = None
    owners: list = field(default_factory=list)
    decoder_blocks: Optional[list] = None
    supports_gradient_checkpointing: Optional[bool] = None
    qwen_style: bool = False


def model_facts(model: ModelFiles, runtime: Runtime) -> ModelFacts:
    if model.model_class is None:
        native = runtime.native_class(model.model_type) if model.model_type else None
        facts = ModelFacts(remote=False)
        if native is not None:
            facts.decoder_blocks = list(getattr(native, "_no_split_modules", None) or [])
            facts.supports_gradient_checkpointing = bool(getattr(native, "supports_gradient_checkpointing", False))
        return facts
    facts = ModelFacts(remote=True, qwen_style=is_qwen_style_module(str(model.model_class.module.path)))
    owner = model.first_defining("_set_gradient_checkpointing", method=True)
    if owner is not None and "value" in owner.parameters("_set_gradient_checkpointing"):
        facts.old_api = True
        facts.checkpointing_class = owner
        facts.owners = owner.isinstance_targets("_set_gradient_checkpointing")
    blocks = model.first_defining("_no_split_modules")
    if blocks is None:
        facts.decoder_blocks = []
    else:
        value = class_constant(blocks, "_no_split_modules")
        facts.decoder_blocks = [str(v) for v in value] if isinstance(value, (list, tuple)) else None
    support = model.first_defining("supports_gradient_checkpointing")
    if support is not None:
        value = class_constant(support, "supports_gradient_checkpointing")
        facts.supports_gradient_checkpointing = value if isinstance(value, bool) else None
    else:
        bases = [runtime.external_class(b) for b in model.external_bases(model.model_class)]
        known = [b for b in bases if b is not None]
        if known:
            facts.supports_gradient_checkpointing = bool(getattr(known[0], "supports_gradient_checkpointing", False))
    return facts


def model_json(model: ModelFiles, facts: ModelFacts) -> dict:
    klass = facts.checkpointing_class
    return {
        "config_path": str(model.directory / "config.json"),
        "model_type": model.model_type,
        "family": family_of(model),
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
