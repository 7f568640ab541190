"""The tiny Qwen v1 fixture: a model directory with the remote code of ``qwen_v1/`` and seeded weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Tuple, Union

if TYPE_CHECKING:
    import torch

__all__ = ["AUTO_MAP", "REMOTE_CODE_DIR", "REMOTE_CODE_FILES", "load_tiny_qwen", "write_tiny_qwen"]


REMOTE_CODE_DIR: Path = Path(__file__).resolve().parent / "qwen_v1"
"""Folder holding the remote-code files that `write_tiny_qwen` copies next to the weights."""

REMOTE_CODE_FILES: Tuple[str, ...] = (
    "configuration_qwen.py",
    "modeling_qwen.py",
    "qwen_generation_utils.py",
    "tokenization_qwen.py",
)

AUTO_MAP: Dict[str, str] = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}

# Ids of the byte-level tokenizer's special tokens (see `qwen_v1/tokenization_qwen.py`).
_EOD_ID, _IM_START_ID, _IM_END_ID = 0, 1, 2


def _config_dict(
    *,
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
    vocab_size: int,
    seq_length: int,
    overrides: Dict[str, Any],
) -> Dict[str, Any]:
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
        )
    config: Dict[str, Any] = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "qwen",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "kv_channels": hidden_size // num_attention_heads,
        "intermediate_size": intermediate_size,
        "seq_length": seq_length,
        "max_position_embeddings": seq_length,
        "layer_norm_epsilon": 1e-6,
        "initializer_range": 0.02,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "use_flash_attn": False,
        "bf16": False,
        "fp16": False,
        "fp32": True,
        "no_bias": True,
        "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def _state_dict(config: Dict[str, Any], seed: int) -> Dict[str, torch.Tensor]:
    """Builds the weights from the config alone: normal(0, std) matrices and biases, ones for RMSNorm."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    std = float(config["initializer_range"])

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32) * std

    hidden = config["hidden_size"]
    projection = config["kv_channels"] * config["num_attention_heads"]
    width = config["intermediate_size"] // 2
    with_bias = not config["no_bias"]

    tensors: Dict[str, torch.Tensor] = {"transformer.wte.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"transformer.h.{i}."
        tensors[prefix + "ln_1.weight"] = torch.ones(hidden)
        tensors[prefix + "attn.c_attn.weight"] = normal(3 * projection, hidden)
        tensors[prefix + "attn.c_attn.bias"] = normal(3 * projection)
        tensors[prefix + "attn.c_proj.weight"] = normal(hidden, projection)
        tensors[prefix + "ln_2.weight"] = torch.ones(hidden)
        mlp_shapes = {"w1": (width, hidden), "w2": (width, hidden), "c_proj": (hidden, width)}
        for name, (rows, cols) in mlp_shapes.items():
            tensors[f"{prefix}mlp.{name}.weight"] = normal(rows, cols)
            if with_bias:
                tensors[f"{prefix}mlp.{name}.bias"] = normal(rows)
        if with_bias:
            tensors[prefix + "attn.c_proj.bias"] = normal(hidden)
    tensors["transformer.ln_f.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return tensors


def write_tiny_qwen(
    path: Union[str, os.PathLike],
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    seq_length: int = 64,
    seed: int = 0,
    weights: bool = True,
    **config_overrides: Any,
) -> Path:
    """
    Writes a complete local Qwen v1 remote-code model directory with tiny random weights.

    The directory holds the four remote-code files, `config.json` (with the Qwen v1 `auto_map`, float32,
    no dropout, no flash attention), `generation_config.json`, `tokenizer_config.json` (a byte-level
    tokenizer that needs no vocabulary file) and `model.safetensors`. Load it with
    `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` or `load_tiny_qwen(path)`.

    Args:
        path (`str` or `os.PathLike`):
            Directory to write into; created if missing. Existing files with the same names are replaced.
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Number of `QWenBlock`s.
        hidden_size (`int`, *optional*, defaults to 32):
            Model width; `kv_channels` is `hidden_size // num_attention_heads`.
        num_attention_heads (`int`, *optional*, defaults to 4):
            Number of attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 128):
            As in Qwen v1, the MLP width is `intermediate_size // 2`.
        vocab_size (`int`, *optional*, defaults to 256):
            Vocabulary size; 256 matches the byte-level tokenizer.
        seq_length (`int`, *optional*, defaults to 64):
            Training context length (also `max_position_embeddings`); dynamic NTK and log-n attention
            only act beyond it.
        seed (`int`, *optional*, defaults to 0):
            Seed of the CPU `torch.Generator` the weights are drawn from. Same seed, same config: same bytes.
        weights (`bool`, *optional*, defaults to `True`):
            Write `model.safetensors`. Without it the directory holds the code and configs only, for
            `AutoModelForCausalLM.from_config` at any size (the benchmark builds Qwen-7B shapes that way on the GPU).
        config_overrides (`Any`, *optional*):
            Any other `config.json` key (for example `no_bias=False` or `use_cache=False`).

    Returns:
        `pathlib.Path`: the model directory.
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    config = _config_dict(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seq_length=seq_length,
        overrides=config_overrides,
    )
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, target / name)

    generation_config = {
        "chat_format": "chatml",
        "max_window_size": seq_length,
        "eos_token_id": _EOD_ID,
        "pad_token_id": _EOD_ID,
        "do_sample": False,
        "max_new_tokens": 16,
    }
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "tokenizer_class": "QWenTokenizer",
        "model_max_length": seq_length,
    }
    for name, content in (
        ("config.json", config),
        ("generation_config.json", generation_config),
        ("tokenizer_config.json", tokenizer_config),
    ):
        (target / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    if weights:
        save_file(_state_dict(config, seed), str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def qwen_chat(tokenizer: Any, path: Union[str, os.PathLike], query: str = "how are you?") -> Dict[str, Any]:
    """The ChatML context Qwen's ``chat`` builds (``make_context`` of the directory's ``qwen_generation_utils.py``)
    with a system prompt and one turn of history, and its stop words."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_qcc_qwen_generation_utils", Path(path) / "qwen_generation_utils.py")
    assert spec is not None and spec.loader is not None
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    text, ids = utils.make_context(
        tokenizer, query, history=[("hello", "hello world")], system="You are a test.", chat_format="chatml"
    )
    return {"prompt": text, "chat_ids": list(ids), "stop_words_ids": utils.get_stop_words_ids("chatml", tokenizer)}


def load_tiny_qwen(path: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """
    Loads a directory written by `write_tiny_qwen` the way users load Qwen v1.

    Args:
        path (`str` or `os.PathLike`):
            The model directory.
        kwargs (`Any`, *optional*):
            Passed on to `AutoModelForCausalLM.from_pretrained`.

    Returns:
        The `QWenLMHeadModel` instance (its class lives in a `transformers_modules.*` module).
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(path), trust_remote_code=True, **kwargs)
