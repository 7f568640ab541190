"""The tiny InternLM v1 fixture: `write_tiny_internlm` / `load_tiny_internlm` (see ``internlm/``)."""

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

CODE_DIR: Path = Path(__file__).resolve().parent / "internlm"
CODE_FILES: Tuple[str, ...] = ("configuration_internlm.py", "modeling_internlm.py", "tokenization_internlm.py")
# InternLM's chat markers are pieces of its SentencePiece model.
TOKENIZER_PIECES = tuple((piece, 0.0, _sentencepiece.USER_DEFINED) for piece in ("<|User|>", "<|Bot|>", "<eoh>", "<eoa>"))
TARGET_MODULES: Tuple[str, ...] = family_named("internlm").lora_targets
"""The LoRA targets InternLM users pass to peft."""


def _tensors(config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Parameters only: the rotary tables are non-persistent buffers, in no checkpoint (as in the real ones)."""
    weights = SeededWeights(seed, std=config["initializer_range"])
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    tensors = {"model.embed_tokens.weight": weights.normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}self_attn.{name}.weight"] = weights.normal(hidden, hidden)
            if config["bias"]:
                tensors[f"{prefix}self_attn.{name}.bias"] = weights.normal(hidden)
        tensors.update(mlp_and_norm_tensors(weights, prefix, hidden, inner))
    tensors["model.norm.weight"] = weights.ones(hidden)
    tensors["lm_head.weight"] = weights.normal(config["vocab_size"], hidden)
    return tensors


def write_tiny_internlm(
    path: PathLike,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int = 256,
    max_position_embeddings: int = 64,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Writes a local InternLM v1 remote-code model directory with tiny random weights.

    Biased attention projections (``bias=True``, as internlm-chat-7b has), float32. The checkpoint holds the
    parameters only: the rotary tables are computed by ``InternLMRotaryEmbedding.__init__`` and registered as
    non-persistent buffers, as in the real model. Load it with :func:`load_tiny_internlm`.

    Args:
        path (`str` or `os.PathLike`): directory to write into (created if missing).
        num_hidden_layers (`int`, *optional*, defaults to 2): number of ``InternLMDecoderLayer``s.
        hidden_size (`int`, *optional*, defaults to 32): model width.
        num_attention_heads (`int`, *optional*, defaults to 4): attention heads.
        intermediate_size (`int`, *optional*, defaults to 64): MLP width.
        vocab_size (`int`, *optional*, defaults to 256): vocabulary size.
        max_position_embeddings (`int`, *optional*, defaults to 64): length of the rotary tables built in
            ``__init__``.
        seed (`int`, *optional*, defaults to 0): seed of the weights.
        config_overrides (`Any`, *optional*): any other ``config.json`` key.

    Returns:
        `pathlib.Path`: the model directory.
    """
    config: Dict[str, Any] = {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm.InternLMConfig",
            "AutoModel": "modeling_internlm.InternLMForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
        },
        "model_type": "internlm",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "bias": True,
        "torch_dtype": "float32",
    }
    config.update(config_overrides)
    generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    return write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES,
        config=config,
        tensors=lambda c: _tensors(c, seed),
        generation_config=generation_config,
        tokenizer_config=remote_tokenizer_config(
            "InternLMTokenizer",
            "tokenization_internlm",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="</s>",
            unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        ),
        files={"tokenizer.model": _sentencepiece.model_bytes(TOKENIZER_PIECES)},
    )


def internlm_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """InternLM v1's chat format, as its model's ``build_inputs`` makes it: ``<s><|User|>:...<eoh>\\n<|Bot|>:``
    per turn (``<eoa>\\n`` after each answer), tokenized as one text.

    One turn only: with history the text holds ``<eoa>\\n<s>``, and transformers before 4.34 stripped the
    whitespace next to a special token given as a string (``<s>``), later releases keep it, for the real
    tokenizer as for this one: a change of transformers, not of the remote code.
    """
    prompt = "<s><|User|>:how are you?<eoh>\n<|Bot|>:"
    return {"prompt": prompt, "chat_ids": tokenizer([prompt], return_tensors="pt")["input_ids"][0].tolist()}


def load_tiny_internlm(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_internlm` the way users load InternLM (remote code)."""
    return load_remote_model(path, **kwargs)
