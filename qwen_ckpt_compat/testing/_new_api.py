"""A tiny remote-code model already on the new checkpointing API (internlm2 style): `write_tiny_new_api_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from ._writer import PathLike, SeededWeights, load_remote_model, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "new_api"
CODE_FILES: Tuple[str, ...] = ("configuration_internlm2.py", "modeling_internlm2.py")


def _tensors(config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    weights = SeededWeights(seed)
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    tensors = {"model.tok_embeddings.weight": weights.normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "attention_norm.weight"] = weights.ones(hidden)
        tensors[prefix + "wqkv.weight"] = weights.normal(3 * hidden, hidden)
        tensors[prefix + "wo.weight"] = weights.normal(hidden, hidden)
        tensors[prefix + "ffn_norm.weight"] = weights.ones(hidden)
        tensors[prefix + "w1.weight"] = weights.normal(inner, hidden)
        tensors[prefix + "w3.weight"] = weights.normal(inner, hidden)
        tensors[prefix + "w2.weight"] = weights.normal(hidden, inner)
    tensors["model.norm.weight"] = weights.ones(hidden)
    tensors["output.weight"] = weights.normal(config["vocab_size"], hidden)
    return tensors


def write_tiny_new_api_model(path: PathLike, *, num_hidden_layers: int = 2, seed: int = 0, **config_overrides: Any) -> Path:
    """Writes a tiny remote-code model (``model_type`` "internlm2") that uses transformers' new checkpointing API.

    It defines no ``_set_gradient_checkpointing``: qwen-ckpt-compat must leave it to transformers.
    """
    config: Dict[str, Any] = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "model_type": "internlm2",
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    config.update(config_overrides)
    return write_model_dir(path, code_dir=CODE_DIR, code_files=CODE_FILES, config=config, tensors=lambda c: _tensors(c, seed))


def load_tiny_new_api_model(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_new_api_model` (remote code)."""
    return load_remote_model(path, **kwargs)
