"""Tiny fixtures of four patterns of 2023 remote code, not of a named model: :func:`write_pattern_model`.

One small causal LM in the style of that code (``patterns/``: the old ``_set_gradient_checkpointing(module, value)``,
its own ``torch.utils.checkpoint.checkpoint`` call) is written with exactly one pattern switched on
(docs/facts/old-remote-code.md):

* ``"renamed_block"``: ``_no_split_modules`` names ``PatternDecoderLayer``, a class the code does not define (its
  blocks are ``PatternBlock``);
* ``"tied_head"``: a causal-LM head meant to be tied to the input embeddings: no ``tie_word_embeddings`` in
  ``config.json``, no ``_tied_weights_keys`` in the code, no head in the checkpoint;
* ``"strict_forward"``: the causal LM's ``forward`` takes ``**deprecated_arguments`` and raises ``ValueError: Got
  unexpected arguments`` for any of them (BLOOM-era code);
* ``"rope_scaling_null"``: ``config.json`` says ``"rope_scaling": null`` and the attention tests
  ``config.rope_scaling is None`` (else reads ``config.rope_scaling["type"]``).

Without a pattern (``"plain"``) the model has none of them. Importing this module imports neither torch nor
transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from ._writer import PathLike, SeededWeights, load_remote_model, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "patterns"
CODE_FILES: Tuple[str, ...] = ("configuration_pattern.py", "modeling_pattern.py")
PATTERNS: Tuple[str, ...] = ("renamed_block", "tied_head", "strict_forward", "rope_scaling_null")
TARGET_MODULES: Tuple[str, ...] = ("qkv", "o_proj", "mlp_up", "mlp_down")
BLOCK = "PatternBlock"

# pattern -> {file: ((what the plain file says, what the pattern's says), ...)}
_EDITS: Dict[str, Dict[str, Tuple[Tuple[str, str], ...]]] = {
    "renamed_block": {
        "modeling_pattern.py": (('_no_split_modules = ["PatternBlock"]', '_no_split_modules = ["PatternDecoderLayer"]'),),
    },
    "strict_forward": {
        "modeling_pattern.py": (
            (
                "        return_dict=None,\n    ):\n",
                "        return_dict=None,\n        **deprecated_arguments,\n    ):\n"
                "        if deprecated_arguments:\n"
                '            raise ValueError(f"Got unexpected arguments: {deprecated_arguments}")\n',
            ),
        ),
    },
    "rope_scaling_null": {
        "configuration_pattern.py": (
            ("        rms_norm_eps=1e-6,\n", "        rms_norm_eps=1e-6,\n        rope_scaling=None,\n"),
            ("        self.rms_norm_eps = rms_norm_eps\n", "        self.rms_norm_eps = rms_norm_eps\n        self.rope_scaling = rope_scaling\n"),
        ),
        "modeling_pattern.py": (
            (
                "        self.rope_scale = 1.0  # ROPE SCALING\n",
                "        if config.rope_scaling is None:\n"
                "            self.rope_scale = 1.0\n"
                "        else:\n"
                '            if config.rope_scaling["type"] != "linear":\n'
                '                raise ValueError(f"unsupported rope scaling {config.rope_scaling}")\n'
                '            self.rope_scale = float(config.rope_scaling["factor"])\n',
            ),
        ),
    },
}


def _tensors(config: Dict[str, Any], seed: int, with_head: bool) -> Dict[str, Any]:
    weights = SeededWeights(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": weights.normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_norm.weight"] = weights.ones(hidden)
        tensors[prefix + "attn.qkv.weight"] = weights.normal(3 * hidden, hidden)
        tensors[prefix + "attn.o_proj.weight"] = weights.normal(hidden, hidden)
        tensors[prefix + "post_norm.weight"] = weights.ones(hidden)
        tensors[prefix + "mlp_up.weight"] = weights.normal(2 * hidden, hidden)
        tensors[prefix + "mlp_down.weight"] = weights.normal(hidden, 2 * hidden)
    tensors["model.norm.weight"] = weights.ones(hidden)
    if with_head:
        tensors["lm_head.weight"] = weights.normal(vocab, hidden)
    return tensors


def write_pattern_model(
    path: PathLike,
    pattern: str = "plain",
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    vocab_size: int = 256,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Writes a tiny remote-code model directory with one pattern of old remote code (see the module doc).

    Args:
        path (`str` or `os.PathLike`): directory to write into (created if missing).
        pattern (`str`, *optional*, defaults to ``"plain"``): one of :data:`PATTERNS`, or ``"plain"``.
        num_hidden_layers, hidden_size, num_attention_heads, vocab_size (`int`, *optional*): the shapes.
        seed (`int`, *optional*, defaults to 0): seed of the weights.
        config_overrides (`Any`, *optional*): any other ``config.json`` key.

    Returns:
        `pathlib.Path`: the model directory. Load it with ``AutoModelForCausalLM.from_pretrained(path,
        trust_remote_code=True)`` or :func:`load_pattern_model`.
    """
    if pattern != "plain" and pattern not in PATTERNS:
        raise ValueError(f"pattern must be 'plain' or one of {PATTERNS}, got {pattern!r}")
    config: Dict[str, Any] = {
        "architectures": ["PatternForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_pattern.PatternConfig",
            "AutoModelForCausalLM": "modeling_pattern.PatternForCausalLM",
        },
        "model_type": "qcc_pattern",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
    }
    if pattern == "tied_head":
        del config["tie_word_embeddings"]  # tied by default before 5.0 (PretrainedConfig's True)
    if pattern == "rope_scaling_null":
        config["rope_scaling"] = None
    config.update(config_overrides)
    target = write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES,
        config=config,
        tensors=lambda c: _tensors(c, seed, with_head=pattern != "tied_head"),
    )
    for name, edits in _EDITS.get(pattern, {}).items():
        file = target / name
        text = file.read_text(encoding="utf-8")
        for old, new in edits:
            if text.count(old) != 1:
                raise RuntimeError(f"the pattern fixture changed: {old!r} is not found once in {name}")
            text = text.replace(old, new)
        file.write_text(text, encoding="utf-8")
    return target


def load_pattern_model(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_pattern_model` the way users load remote code."""
    return load_remote_model(path, **kwargs)
