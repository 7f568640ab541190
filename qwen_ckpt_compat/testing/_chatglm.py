"""The tiny ChatGLM2/3 fixture: `write_tiny_chatglm` / `load_tiny_chatglm` (see ``chatglm/``).

``write_tiny_chatglm(path, revision="37fe000")`` writes the modeling file of ChatGLM3-6B's revision 37fe000
("support transformers>=4.37.2 for finetuning") instead: the 2023 file with the three changes that revision made
to checkpointing, applied by :func:`revision_37fe000` (docs/facts/chatglm.md#revision-37fe000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from .._family_registry import family_named
from . import _sentencepiece
from ._writer import PathLike, SeededWeights, load_remote_model, remote_tokenizer_config, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "chatglm"
CODE_FILES: Tuple[str, ...] = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
REVISIONS: Tuple[str, ...] = ("2023", "37fe000")
"""The revisions of the remote code the fixture can write: the 2023 one, and ChatGLM3-6B's 37fe000."""

# Revision 37fe000 of ChatGLM3-6B (docs/facts/chatglm.md): `ChatGLMPreTrainedModel` gets a
# `gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None)` of its own that only refuses a model
# without checkpointing support (it enables nothing), and `GLMTransformer`'s own checkpoint call hard-codes
# `use_reentrant=False`. Each change is (what the 2023 file says, what the revision says).
_REVISION_37FE000 = (
    (
        "# copy of the real code.\n",
        "# copy of the real code.\n#\n# Revision 37fe000 of ChatGLM3-6B (written by `write_tiny_chatglm(revision=\"37fe000\")`): an own\n"
        "# `gradient_checkpointing_enable` that enables nothing, and `use_reentrant=False` in the owner's checkpoint call.\n",
    ),
    (
        "kv_caches[index], use_cache\n                )",
        "kv_caches[index], use_cache,\n                    use_reentrant=False,\n                )",
    ),
    (
        "            module.gradient_checkpointing = value\n",
        "            module.gradient_checkpointing = value\n\n"
        "    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):\n"
        "        # 37fe000: refuses a model that cannot checkpoint; turns nothing on.\n"
        "        if not self.supports_gradient_checkpointing:\n"
        "            raise ValueError(f\"{type(self).__name__} cannot checkpoint its layers.\")\n",
    ),
)


def revision_37fe000(source: str) -> str:
    """The 2023 fixture's ``modeling_chatglm.py`` text turned into revision 37fe000's (each change found once)."""
    for old, new in _REVISION_37FE000:
        if source.count(old) != 1:
            raise RuntimeError(f"the ChatGLM fixture changed: {old!r} is not found once in modeling_chatglm.py")
        source = source.replace(old, new)
    return source
TARGET_MODULES: Tuple[str, ...] = family_named("chatglm").lora_targets
"""The LoRA targets ChatGLM users pass to peft (``dense`` also matches ``dense_h_to_4h``/``dense_4h_to_h``)."""


def _tensors(config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    weights = SeededWeights(seed)
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv = heads * kv + 2 * kv * groups
    ffn = config["ffn_hidden_size"]
    tensors = {"transformer.embedding.word_embeddings.weight": weights.normal(config["padded_vocab_size"], hidden)}
    rotary = kv // 2  # RotaryEmbedding(rotary_dim // 2): inv_freq is a saved (persistent) buffer, as in the real checkpoints
    import torch

    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    for i in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = weights.ones(hidden)
        tensors[prefix + "self_attention.query_key_value.weight"] = weights.normal(qkv, hidden)
        tensors[prefix + "self_attention.query_key_value.bias"] = weights.normal(qkv)
        tensors[prefix + "self_attention.dense.weight"] = weights.normal(hidden, heads * kv)
        tensors[prefix + "post_attention_layernorm.weight"] = weights.ones(hidden)
        tensors[prefix + "mlp.dense_h_to_4h.weight"] = weights.normal(2 * ffn, hidden)
        tensors[prefix + "mlp.dense_4h_to_h.weight"] = weights.normal(hidden, ffn)
    tensors["transformer.encoder.final_layernorm.weight"] = weights.ones(hidden)
    tensors["transformer.output_layer.weight"] = weights.normal(config["padded_vocab_size"], hidden)
    return tensors


def write_tiny_chatglm(
    path: PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 64,
    vocab_size: int = 256,
    seq_length: int = 64,
    seed: int = 0,
    revision: str = "2023",
    **config_overrides: Any,
) -> Path:
    """Writes a local ChatGLM2/3 remote-code model directory with tiny random weights.

    Multi-query attention with ``multi_query_group_num`` key/value groups and a qkv bias, as ChatGLM3-6B has;
    float32, no dropout; ``use_cache`` in ``config.json`` (the config class does not set it itself). Load it with
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` or :func:`load_tiny_chatglm`.

    Args:
        path (`str` or `os.PathLike`): directory to write into (created if missing).
        num_layers (`int`, *optional*, defaults to 2): number of ``GLMBlock``s.
        hidden_size (`int`, *optional*, defaults to 32): model width; ``kv_channels`` is
            ``hidden_size // num_attention_heads``.
        num_attention_heads (`int`, *optional*, defaults to 4): query heads.
        multi_query_group_num (`int`, *optional*, defaults to 2): key/value groups.
        ffn_hidden_size (`int`, *optional*, defaults to 64): the MLP width (the gate doubles it).
        vocab_size (`int`, *optional*, defaults to 256): ``padded_vocab_size``.
        seq_length (`int`, *optional*, defaults to 64): the rotary table's length.
        seed (`int`, *optional*, defaults to 0): seed of the weights.
        revision (`str`, *optional*, defaults to ``"2023"``): which remote code to write: ``"2023"``, or
            ``"37fe000"`` (ChatGLM3-6B's revision with its own ``gradient_checkpointing_enable`` that enables
            nothing, and ``use_reentrant=False`` hard-coded in the owner's checkpoint call). Same weights.
        config_overrides (`Any`, *optional*): any other ``config.json`` key.

    Returns:
        `pathlib.Path`: the model directory.
    """
    config: Dict[str, Any] = {
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "model_type": "chatglm",
        "num_layers": num_layers,
        "padded_vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "ffn_hidden_size": ffn_hidden_size,
        "kv_channels": hidden_size // num_attention_heads,
        "num_attention_heads": num_attention_heads,
        "seq_length": seq_length,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "multi_query_attention": True,
        "multi_query_group_num": multi_query_group_num,
        "fp32_residual_connection": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(config_overrides)
    if revision not in REVISIONS:
        raise ValueError(f"revision must be one of {REVISIONS}, got {revision!r}")
    generation_config = {"eos_token_id": 2, "pad_token_id": 0, "do_sample": False, "max_new_tokens": 16}
    target = write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES,
        config=config,
        tensors=lambda c: _tensors(c, seed),
        generation_config=generation_config,
        tokenizer_config=remote_tokenizer_config(
            "ChatGLMTokenizer", "tokenization_chatglm", remove_space=False, do_lower_case=False
        ),
        files={"tokenizer.model": _sentencepiece.model_bytes()},
    )
    if revision == "37fe000":
        modeling = target / "modeling_chatglm.py"
        modeling.write_text(revision_37fe000(modeling.read_text(encoding="utf-8")), encoding="utf-8")
    return target


def write_tiny_chatglm_37fe000(path: PathLike, **kwargs: Any) -> Path:
    """:func:`write_tiny_chatglm` with ``revision="37fe000"`` (the fixture ``chatglm_37fe000``)."""
    return write_tiny_chatglm(path, revision="37fe000", **kwargs)


def chatglm_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """The chat formats of the fixture's tokenizer: ChatGLM2's ``build_prompt`` (then encoded, as its ``chat``
    does) and ChatGLM3's ``build_chat_input``, each with one turn of history."""
    prompt = tokenizer.build_prompt("你好", history=[("hello", "hello world")])
    chat3 = tokenizer.build_chat_input(
        "how are you?", history=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good day"}]
    )
    return {
        "chatglm2_prompt": prompt,
        "chatglm2_ids": tokenizer([prompt])["input_ids"][0],
        "chatglm3_ids": chat3["input_ids"][0].tolist(),
        "chatglm3_position_ids": chat3["position_ids"][0].tolist(),
    }


def load_tiny_chatglm(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_chatglm` the way users load ChatGLM (remote code)."""
    return load_remote_model(path, **kwargs)
