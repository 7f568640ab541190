"""Shared pieces of the tiny remote-code fixtures: seeded weights and the model directory itself.

Imports neither torch nor transformers at module level (``qwen_ckpt_compat.testing`` must stay cheap to import).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]


class SeededWeights:
    """Draws tensors from a CPU ``torch.Generator``: same seed and shapes, same bytes on every release."""

    def __init__(self, seed: int, std: float = 0.02) -> None:
        import torch

        self._torch = torch
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.std = std

    def normal(self, *shape: int) -> "torch.Tensor":
        return self._torch.randn(*shape, generator=self.generator, dtype=self._torch.float32) * self.std

    def ones(self, *shape: int) -> "torch.Tensor":
        return self._torch.ones(*shape, dtype=self._torch.float32)


def write_model_dir(
    path: PathLike,
    *,
    code_dir: Path,
    code_files: Iterable[str],
    config: Dict[str, Any],
    tensors: Callable[[Dict[str, Any]], Dict[str, "torch.Tensor"]],
    generation_config: Optional[Dict[str, Any]] = None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    files: Optional[Dict[str, bytes]] = None,
) -> Path:
    """Writes the remote-code files, ``config.json`` (and the optional JSON files) and ``model.safetensors``.

    ``code_files`` are names in ``code_dir``, or paths of their own (a file shared with another fixture);
    ``files`` are other files by name and content (a tokenizer's ``tokenizer.model``).
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    for name in code_files:
        source = code_dir / name  # an absolute path stays what it is
        shutil.copyfile(source, target / Path(name).name)
    documents = {"config.json": config, "generation_config.json": generation_config, "tokenizer_config.json": tokenizer_config}
    for name, content in documents.items():
        if content is not None:
            (target / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name, data in (files or {}).items():
        (target / name).write_bytes(data)
    weights = {name: tensor.contiguous() for name, tensor in tensors(config).items()}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def load_remote_model(path: PathLike, auto_class: str = "AutoModelForCausalLM", **kwargs: Any) -> Any:
    """``<auto_class>.from_pretrained(path, trust_remote_code=True, **kwargs)``, the way users load these models."""
    import transformers

    return getattr(transformers, auto_class).from_pretrained(os.fspath(path), trust_remote_code=True, **kwargs)


def load_remote_tokenizer(path: PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, trust_remote_code=True, **kwargs)``, the way users load these tokenizers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=True, **kwargs)


def remote_tokenizer_config(class_name: str, module: str, **entries: Any) -> Dict[str, Any]:
    """A ``tokenizer_config.json`` naming a remote slow tokenizer (``auto_map``) and the given entries."""
    config: Dict[str, Any] = {"auto_map": {"AutoTokenizer": [f"{module}.{class_name}", None]}, "tokenizer_class": class_name}
    config.update(entries)
    return config


def mlp_and_norm_tensors(weights: SeededWeights, prefix: str, hidden: int, inner: int) -> Dict[str, "torch.Tensor"]:
    """A LLaMA-style layer's gated MLP and its two RMSNorms (``mlp.{gate,up,down}_proj``, ``*_layernorm``)."""
    return {
        prefix + "mlp.gate_proj.weight": weights.normal(inner, hidden),
        prefix + "mlp.up_proj.weight": weights.normal(inner, hidden),
        prefix + "mlp.down_proj.weight": weights.normal(hidden, inner),
        prefix + "input_layernorm.weight": weights.ones(hidden),
        prefix + "post_attention_layernorm.weight": weights.ones(hidden),
    }
