"""The tiny GLM-4-9B(-chat) fixture: `write_tiny_glm4` / `load_tiny_glm4` (see ``glm4/``, docs/facts/glm4.md).

The weights have ChatGLM2/3's names and shapes (the same tensors as :func:`write_tiny_chatglm` draws); the remote
code is GLM-4's: batch-first blocks, the attention picked by ``config._attn_implementation``, no old
``_set_gradient_checkpointing``, and, in the June 2024 revision (the default), a ``gradient_checkpointing_enable``
of its own that enables nothing. ``revision="latest"`` writes the file without that override (its maintainers
removed it, the model's discussion 60), which leaves transformers' enable to flag ``GLMTransformer``; both keep
``use_reentrant=False`` hard-coded in the owner's checkpoint call.

The tokenizer is tiktoken's, as the real one: ``tokenizer.model`` is a ranks file written here in code (every
byte, then the merges that spell a few words), so nothing is downloaded. Its remote code imports ``tiktoken``
when it loads.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ._chatglm import _tensors
from ._writer import PathLike, load_remote_model, remote_tokenizer_config, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "glm4"
CODE_FILES: Tuple[str, ...] = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
REVISIONS: Tuple[str, ...] = ("2024-06", "latest")
"""The revisions of the remote code the fixture can write: June 2024's (with the enable override) and the latest."""
PACKAGES: Tuple[str, ...] = ("tiktoken",)
"""What the fixture's ``tokenization_chatglm.py`` imports when it loads (the real one too)."""

# The June 2024 override, as the fixture's modeling file has it; `revision="latest"` removes it.
_OVERRIDE = (
    "    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):\n"
    "        # GLM-4-9B's June 2024 code: refuses a model that cannot checkpoint; turns nothing on.\n"
    "        if not self.supports_gradient_checkpointing:\n"
    '            raise ValueError(f"{self.__class__.__name__} does not support gradient checkpointing.")\n'
)
_WORDS = (
    "hello", " hello", " world", "world", " how", " are", " you", "the", " the", " test", " token", " is", " good",
    " day", " what", " name", "你好", "世界", "\n",
)  # fmt: skip
#: The special tokens' text, as ``tokenizer_config.json`` lists them (the ids follow the ranks).
SPECIAL_TOKENS: Tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
# GLM-4-9B-chat's chat template, in substance: the prefix, then each message as its role token, a newline and its
# content; `add_generation_prompt` appends the assistant's role token.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def ranks() -> Dict[bytes, int]:
    """The tiny BPE: the 256 bytes, then for each word of :data:`_WORDS` its prefixes, shortest first (so that
    tiktoken's merges reach every word from its bytes)."""
    table: Dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for word in _WORDS:
        data = word.encode("utf-8")
        for end in range(2, len(data) + 1):
            table.setdefault(data[:end], len(table))
    return table


def ranks_file() -> bytes:
    """``tokenizer.model`` as GLM-4 ships it: ``<base64 token> <rank>`` per line."""
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in ranks().items()]
    return ("\n".join(lines) + "\n").encode("ascii")


def write_tiny_glm4(
    path: PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 64,
    vocab_size: int = 384,
    seq_length: int = 64,
    seed: int = 0,
    revision: str = "2024-06",
    **config_overrides: Any,
) -> Path:
    """Writes a local GLM-4-9B(-chat) remote-code model directory with tiny random weights and its tokenizer.

    Multi-query attention with a qkv bias as GLM-4-9B has; float32, no dropout; ``rope_ratio`` and
    ``original_rope`` in ``config.json``; ``use_cache`` there too (the config class does not set it). Load it with
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` or :func:`load_tiny_glm4`.

    Args:
        path (`str` or `os.PathLike`): directory to write into (created if missing).
        num_layers (`int`, *optional*, defaults to 2): number of ``GLMBlock``s.
        hidden_size (`int`, *optional*, defaults to 32): model width.
        num_attention_heads (`int`, *optional*, defaults to 4): query heads.
        multi_query_group_num (`int`, *optional*, defaults to 2): key/value groups.
        ffn_hidden_size (`int`, *optional*, defaults to 64): the MLP width (the gate doubles it).
        vocab_size (`int`, *optional*, defaults to 384): ``padded_vocab_size`` (the tokenizer uses 339 ids).
        seq_length (`int`, *optional*, defaults to 64): the rotary table's length.
        seed (`int`, *optional*, defaults to 0): seed of the weights.
        revision (`str`, *optional*, defaults to ``"2024-06"``): ``"2024-06"`` (the enable override that enables
            nothing) or ``"latest"`` (without it). Same weights.
        config_overrides (`Any`, *optional*): any other ``config.json`` key.

    Returns:
        `pathlib.Path`: the model directory.
    """
    if revision not in REVISIONS:
        raise ValueError(f"revision must be one of {REVISIONS}, got {revision!r}")
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
        "layernorm_epsilon": 1.5625e-07,
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "multi_query_attention": True,
        "multi_query_group_num": multi_query_group_num,
        "fp32_residual_connection": False,
        "rope_ratio": 500,
        "original_rope": True,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": [len(ranks()), len(ranks()) + SPECIAL_TOKENS.index("<|user|>")],
        "pad_token_id": len(ranks()),
    }
    config.update(config_overrides)
    eos = len(ranks())
    generation_config = {
        "eos_token_id": [eos, eos + SPECIAL_TOKENS.index("<|user|>")],
        "pad_token_id": eos,
        "do_sample": False,
    }
    target = write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES,
        config=config,
        tensors=lambda c: _tensors(c, seed),
        generation_config=generation_config,
        tokenizer_config=remote_tokenizer_config(
            "ChatGLM4Tokenizer",
            "tokenization_chatglm",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=list(SPECIAL_TOKENS),
            chat_template=CHAT_TEMPLATE,
            padding_side="left",
            remove_space=False,
            do_lower_case=False,
            model_max_length=128,
        ),
        files={"tokenizer.model": ranks_file()},
    )
    if revision == "latest":
        modeling = target / "modeling_chatglm.py"
        text = modeling.read_text(encoding="utf-8")
        if text.count(_OVERRIDE) != 1:
            raise RuntimeError(
                "the GLM-4 fixture changed: its enable override is not found once in modeling_chatglm.py"
            )
        modeling.write_text(text.replace(_OVERRIDE, ""), encoding="utf-8")
    return target


def write_tiny_glm4_latest(path: PathLike, **kwargs: Any) -> Path:
    """:func:`write_tiny_glm4` with ``revision="latest"`` (no enable override of its own)."""
    return write_tiny_glm4(path, revision="latest", **kwargs)


def glm4_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """GLM-4's chat formats: ``build_chat_input`` (role tokens, with one turn of history) and, where the release has
    it (4.34+), ``apply_chat_template`` with the template of ``tokenizer_config.json``."""
    history: List[Dict[str, str]] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "good day"},
    ]
    built = tokenizer.build_chat_input("how are you?", history=history)
    result: Dict[str, Any] = {
        "build_chat_input_ids": built["input_ids"][0].tolist(),
        "build_chat_input_position_ids": built["position_ids"][0].tolist(),
    }
    if hasattr(tokenizer, "apply_chat_template"):
        messages = [*history, {"role": "user", "content": "how are you?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # 5.x returns the encoding (a mapping) where 4.x returned the ids
        result["template_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return result


def load_tiny_glm4(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_glm4` the way users load GLM-4 (remote code)."""
    return load_remote_model(path, **kwargs)
