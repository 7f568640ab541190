"""The tiny Baichuan2 fixture: `write_tiny_baichuan` / `load_tiny_baichuan` (see ``baichuan2/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from .._family_registry import family_named
from . import _sentencepiece
from ._writer import (
    PathLike,
    SeededWeights,
    load_remote_model,
    mlp_and_norm_tensors,
    remote_tokenizer_config,
    write_model_dir,
)

CODE_DIR: Path = Path(__file__).resolve().parent / "baichuan2"
CODE_FILES: Tuple[str, ...] = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
# The 7B layout (rotary tables as plain tensor attributes, `DecoderLayer`) has a modeling file of its own and the
# same configuration class.
CODE_FILES_7B: Tuple[str, ...] = (
    "configuration_baichuan.py",
    str(Path(__file__).resolve().parent / "baichuan2_7b" / "modeling_baichuan.py"),
    "tokenization_baichuan.py",
)
# Baichuan2's chat roles are two reserved pieces of its SentencePiece model (195 and 196 in the real one), whose
# ids `generation_config.json` names (`user_token_id`, `assistant_token_id`).
TOKENIZER_PIECES = (("<reserved_106>", 0.0, _sentencepiece.CONTROL), ("<reserved_107>", 0.0, _sentencepiece.CONTROL))
USER_TOKEN_ID = _sentencepiece.piece_count() + 0
ASSISTANT_TOKEN_ID = _sentencepiece.piece_count() + 1
TARGET_MODULES: Tuple[str, ...] = family_named("baichuan").lora_targets
"""The LoRA targets Baichuan2 users pass to peft."""


def _tensors(config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    weights = SeededWeights(seed, std=config["initializer_range"])
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    tensors = {"model.embed_tokens.weight": weights.normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "self_attn.W_pack.weight"] = weights.normal(3 * hidden, hidden)
        tensors[prefix + "self_attn.o_proj.weight"] = weights.normal(hidden, hidden)
        tensors.update(mlp_and_norm_tensors(weights, prefix, hidden, inner))
    tensors["model.norm.weight"] = weights.ones(hidden)
    tensors["lm_head.weight"] = weights.normal(config["vocab_size"], hidden)
    return tensors


def write_tiny_baichuan(
    path: PathLike,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int = 256,
    model_max_length: int = 64,
    seed: int = 0,
    layout: str = "13b",
    **config_overrides: Any,
) -> Path:
    """Writes a local Baichuan2 remote-code model with tiny random weights.

    ``layout="13b"`` (the default): ALiBi attention biases, ``BaichuanLayer``. ``layout="7b"``: rotary position
    embeddings whose tables ``RotaryEmbedding.__init__`` computes as plain tensor attributes, ``DecoderLayer``
    (:func:`write_tiny_baichuan_7b`). The weights have the same names and values in both.

    Like the real ``config.json`` files, it says nothing about ``gradient_checkpointing``: the config class's
    default ``False`` becomes the truthy ``(False,)``, so every load enables checkpointing. Load it with
    :func:`load_tiny_baichuan`.

    Args:
        path (`str` or `os.PathLike`): directory to write into (created if missing).
        num_hidden_layers (`int`, *optional*, defaults to 2): number of ``BaichuanLayer``s.
        hidden_size (`int`, *optional*, defaults to 32): model width.
        num_attention_heads (`int`, *optional*, defaults to 4): attention heads (ALiBi slopes per head).
        intermediate_size (`int`, *optional*, defaults to 64): MLP width.
        vocab_size (`int`, *optional*, defaults to 256): vocabulary size.
        model_max_length (`int`, *optional*, defaults to 64): the ALiBi cache length.
        seed (`int`, *optional*, defaults to 0): seed of the weights.
        layout (`str`, *optional*, defaults to `"13b"`): ``"13b"`` or ``"7b"``.
        config_overrides (`Any`, *optional*): any other ``config.json`` key.

    Returns:
        `pathlib.Path`: the model directory.
    """
    if layout not in ("13b", "7b"):
        raise ValueError(f"layout must be '13b' or '7b', got {layout!r}")
    config: Dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_type": "baichuan",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "hidden_act": "silu",
        "model_max_length": model_max_length,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "z_loss_weight": 0,
        "torch_dtype": "float32",
    }
    config.update(config_overrides)
    generation_config = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "do_sample": False,
        "user_token_id": USER_TOKEN_ID,
        "assistant_token_id": ASSISTANT_TOKEN_ID,
    }
    return write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES if layout == "13b" else CODE_FILES_7B,
        config=config,
        tensors=lambda c: _tensors(c, seed),
        generation_config=generation_config,
        tokenizer_config=remote_tokenizer_config(
            "BaichuanTokenizer",
            "tokenization_baichuan",
            add_bos_token=False,
            add_eos_token=False,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
            unk_token="<unk>",
            model_max_length=model_max_length,
            sp_model_kwargs={},
            use_fast=False,
        ),
        files={"tokenizer.model": _sentencepiece.model_bytes(TOKENIZER_PIECES)},
    )


def baichuan_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """Baichuan2's chat format, as its ``generation_utils.build_chat_input`` makes it: per message the role's
    reserved id (from ``generation_config.json``) and the encoded content, the assistant's id last."""
    import json

    generation = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "你好, how are you?"},
    ]
    ids = []
    for message in messages:
        role = generation["user_token_id"] if message["role"] == "user" else generation["assistant_token_id"]
        ids += [role] + tokenizer.encode(message["content"])
    return {"chat_ids": ids + [generation["assistant_token_id"]]}


def load_tiny_baichuan(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_baichuan` the way users load Baichuan2 (remote code)."""
    return load_remote_model(path, **kwargs)


def write_tiny_baichuan_7b(path: PathLike, **kwargs: Any) -> Path:
    """:func:`write_tiny_baichuan` with ``layout="7b"``."""
    return write_tiny_baichuan(path, layout="7b", **kwargs)
