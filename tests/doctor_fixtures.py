"""Crafted model directories for the doctor's tests, and a small JSON Schema validator.

The remote-code modules written here for other families (ChatGLM-, Baichuan- and InternLM-like) are this
project's own few lines with the interface the family pages of docs/facts/ describe (class names, the old
``_set_gradient_checkpointing(module, value)``, ``_no_split_modules``, the config quirks). They only need to
parse: the doctor never runs them, and neither do the tests.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from qwen_ckpt_compat.testing import write_tiny_qwen

# --------------------------------------------------------------------------------- crafted directories

_CONFIG_MODULE = '''\
from transformers import PretrainedConfig


class {prefix}Config(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, num_layers=2, hidden_size=64, gradient_checkpointing=False, **kwargs):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
{gradient_checkpointing}        super().__init__(**kwargs)
'''

_MODELING_MODULE = '''\
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_{module} import {prefix}Config


class {block}(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return (self.dense(hidden_states),)


class {owner}(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([{block}(config) for _ in range(config.num_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states)[0]
            else:
                hidden_states = layer(hidden_states)[0]
        return hidden_states


class {prefix}PreTrainedModel(PreTrainedModel):
    config_class = {prefix}Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["{block}"]

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, {owner}):
            module.gradient_checkpointing = value


class {prefix}ForCausalLM({prefix}PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
{extra_init}        self.encoder = {owner}(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        return {{"input_ids": input_ids}}

    def forward(self, hidden_states):
        return BaseModelOutputWithPast(last_hidden_state=self.encoder(hidden_states))
'''

#: family -> (module stem, class prefix, block, owner, config quirk, modeling quirk)
FAMILIES = {
    # ChatGLM2/3: reads config.max_length, which its config class never sets (5.x PretrainedConfig lacks it).
    "chatglm": ("chatglm", "ChatGLM", "GLMBlock", "GLMTransformer", "", "        self.max_sequence_length = config.max_length\n"),
    # Baichuan2: stores gradient_checkpointing as a one-element tuple, always true.
    "baichuan": ("baichuan", "Baichuan", "BaichuanLayer", "BaichuanModel",
                 "        self.gradient_checkpointing = (gradient_checkpointing,)\n", ""),
    # InternLM v1: nothing to see in the code; its 5.x problem is a measured fact.
    "internlm": ("internlm", "InternLM", "InternLMDecoderLayer", "InternLMModel", "", ""),
}


def write_family(path: Path, family: str, **config: Any) -> Path:
    """A model directory with a small old-API remote-code module of another family (parse-only)."""
    module, prefix, block, owner, config_quirk, modeling_quirk = FAMILIES[family]
    path.mkdir(parents=True, exist_ok=True)
    (path / f"configuration_{module}.py").write_text(
        _CONFIG_MODULE.format(prefix=prefix, model_type=family, gradient_checkpointing=config_quirk)
    )
    (path / f"modeling_{module}.py").write_text(
        _MODELING_MODULE.format(module=module, prefix=prefix, block=block, owner=owner, extra_init=modeling_quirk)
    )
    reference = f"modeling_{module}.{prefix}ForCausalLM"
    content = {
        "model_type": family,
        "architectures": [f"{prefix}ForCausalLM"],
        "auto_map": {
            "AutoConfig": f"configuration_{module}.{prefix}Config",
            "AutoModel": reference,
            "AutoModelForCausalLM": reference,
            "AutoModelForSeq2SeqLM": reference,
        },
        "num_layers": 2,
        "hidden_size": 64,
        **config,
    }
    (path / "config.json").write_text(json.dumps(content, indent=2))
    return path


def write_native(path: Path, model_type: str = "llama") -> Path:
    """A native transformers model directory: config.json only (the doctor never reads weights)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_qwen(path: Path, **config_overrides: Any) -> Path:
    """The shipped tiny Qwen v1 model, in a directory of its own."""
    return write_tiny_qwen(path, **config_overrides)


def edit_config(path: Path, drop: tuple = (), **values: Any) -> Path:
    config = json.loads((path / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(values)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def prepend(path: Path, text: str) -> None:
    path.write_text(text + path.read_text())


def cache_repo(hub_cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Puts ``source``'s files into a Hugging Face cache laid out as huggingface_hub does (refs + snapshots)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for item in source.iterdir():
        if item.is_file():
            shutil.copyfile(item, snapshot / item.name)
    return snapshot


# ------------------------------------------------------------------------- a small JSON Schema validator

#: The keywords this validator understands; a schema using any other keyword is refused, so that nothing in
#: the shipped schema can go unchecked.
SUPPORTED_KEYWORDS = frozenset(
    {"$schema", "$id", "$defs", "$ref", "title", "description", "type", "required", "properties",
     "additionalProperties", "items", "enum", "const", "pattern", "minLength"}
)
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_keywords(schema: Any) -> set:
    """Every keyword used anywhere in ``schema`` (property names are not keywords)."""
    found: set = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key in ("properties", "$defs"):
                for sub in value.values():
                    found |= schema_keywords(sub)
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                found |= schema_keywords(value)
    return found


def validation_errors(instance: Any, schema: dict, root: Optional[dict] = None, where: str = "$") -> list:
    """JSON Schema (2020-12, the subset in SUPPORTED_KEYWORDS) errors of ``instance``; empty when valid."""
    root = schema if root is None else root
    unknown = schema_keywords(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"the schema uses keywords this validator does not check: {sorted(unknown)}")
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return validation_errors(instance, target, root, where)
    errors = []
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{where}: {instance!r} is not {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: {instance!r} is not one of {schema['enum']!r}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in types):
            return errors + [f"{where}: {instance!r:.60} is not of type {types}"]
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{where}: {instance!r} does not match {schema['pattern']!r}")
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{where}: {instance!r} is shorter than {schema['minLength']}")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                errors.append(f"{where}: {name!r} is required")
        for name, value in instance.items():
            if name in properties:
                errors += validation_errors(value, properties[name], root, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected property {name!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validation_errors(value, schema["additionalProperties"], root, f"{where}.{name}")
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            errors += validation_errors(item, schema["items"], root, f"{where}[{index}]")
    return errors
