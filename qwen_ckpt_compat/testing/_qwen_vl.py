"""The tiny Qwen-VL fixture: `write_tiny_qwen_vl` / `load_tiny_qwen_vl` / `qwen_vl_image_span` (see ``qwen_vl/``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .._family_registry import family_named
from ._qwen import _config_dict, _state_dict, qwen_chat
from ._writer import PathLike, SeededWeights, load_remote_model, remote_tokenizer_config, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "qwen_vl"
_QWEN_V1_DIR: Path = Path(__file__).resolve().parent / "qwen_v1"
# Qwen-VL's configuration and generation utilities are Qwen v1's: the files are shared with that fixture.
CODE_FILES: Tuple[str, ...] = (
    str(_QWEN_V1_DIR / "configuration_qwen.py"),
    "modeling_qwen.py",
    str(_QWEN_V1_DIR / "qwen_generation_utils.py"),
    "visual.py",
    "tokenization_qwen.py",
)
TARGET_MODULES: Tuple[str, ...] = family_named("qwen_vl").lora_targets
"""LoRA targets of the language model alone (``c_proj`` would also match the vision transformer's MLPs)."""
VISION_TARGET_MODULES: Tuple[str, ...] = ("in_proj", "out_proj", "c_fc")
"""Targets inside the vision transformer's blocks, for tests that train the vision tower too."""
VISION_PACKAGES: Tuple[str, ...] = ("requests", "PIL")
"""What the fixture's ``visual.py`` imports when it is imported (the real one also needs torchvision)."""

IMAGE_START_ID = 300  # <img>; </img> is 301, the padding inside a span 302


def _vision_tensors(config: Dict[str, Any], weights: SeededWeights) -> Dict[str, Any]:
    import torch

    visual = config["visual"]
    width, out = visual["width"], visual["output_dim"]
    grid = visual["image_size"] // visual["patch_size"]
    mlp = int(width * visual["mlp_ratio"])
    prefix = "transformer.visual."
    tensors = {
        prefix + "conv1.weight": weights.normal(width, 3, visual["patch_size"], visual["patch_size"]),
        prefix + "positional_embedding": weights.normal(grid * grid, width),
        prefix + "ln_pre.weight": weights.ones(width),
        prefix + "ln_pre.bias": torch.zeros(width),
    }
    for i in range(visual["layers"]):
        block = f"{prefix}transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            tensors[f"{block}{norm}.weight"] = weights.ones(width)
            tensors[f"{block}{norm}.bias"] = torch.zeros(width)
        shapes = {"attn.in_proj": (3 * width, width), "attn.out_proj": (width, width), "mlp.c_fc": (mlp, width), "mlp.c_proj": (width, mlp)}
        for name, (rows, cols) in shapes.items():
            tensors[f"{block}{name}.weight"] = weights.normal(rows, cols)
            tensors[f"{block}{name}.bias"] = weights.normal(rows)
    pool = prefix + "attn_pool."
    side = int(math.isqrt(visual["n_queries"]))
    tensors[pool + "pos_embed"] = _sincos_2d(out, side)
    tensors[pool + "query"] = weights.normal(side * side, out)
    if width != out:
        tensors[pool + "kv_proj.weight"] = weights.normal(out, width)
    tensors[pool + "attn.in_proj_weight"] = weights.normal(3 * out, out)
    tensors[pool + "attn.in_proj_bias"] = weights.normal(3 * out)
    tensors[pool + "attn.out_proj.weight"] = weights.normal(out, out)
    tensors[pool + "attn.out_proj.bias"] = weights.normal(out)
    for norm in ("ln_q", "ln_kv"):
        tensors[f"{pool}{norm}.weight"] = weights.ones(out)
        tensors[f"{pool}{norm}.bias"] = torch.zeros(out)
    tensors[prefix + "ln_post.weight"] = weights.ones(out)
    tensors[prefix + "ln_post.bias"] = torch.zeros(out)
    tensors[prefix + "proj"] = weights.normal(out, out) * (out**-0.5 / weights.std)
    return tensors


def _sincos_2d(embed_dim: int, grid_size: int) -> Any:
    """The resampler's fixed position table (the same formula as ``visual.sincos_2d``)."""
    import torch

    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(dim: int, positions: Any) -> Any:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], dim=1).float()


def write_tiny_qwen_vl(
    path: PathLike,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vision_width: int = 16,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 28,
    patch_size: int = 7,
    n_queries: int = 64,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Writes a local Qwen-VL remote-code model directory with tiny random weights.

    The text model is the tiny Qwen v1 of :func:`~qwen_ckpt_compat.testing.write_tiny_qwen` (vocabulary of 320:
    byte ids, then ``<img>`` = 300, ``</img>`` = 301 and the span padding 302); ``visual`` configures a vision
    transformer of ``vision_layers`` blocks whose resampler gives ``n_queries`` tokens per image (so an image
    path of up to ``n_queries`` bytes fits in its span). Build the ids of an image with
    :func:`qwen_vl_image_span`. The remote code imports ``requests`` and ``PIL`` when it loads.

    Returns:
        `pathlib.Path`: the model directory.
    """
    config = _config_dict(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        vocab_size=320,
        seq_length=256,
        overrides={},
    )
    config["visual"] = {
        "heads": vision_heads,
        "image_size": image_size,
        "image_start_id": IMAGE_START_ID,
        "layers": vision_layers,
        "mlp_ratio": 2.0,
        "output_dim": hidden_size,
        "patch_size": patch_size,
        "width": vision_width,
        "n_queries": n_queries,
    }
    config.update(config_overrides)

    def tensors(c: Dict[str, Any]) -> Dict[str, Any]:
        result = _state_dict(c, seed)
        result.update(_vision_tensors(c, SeededWeights(seed + 1)))
        return result

    generation_config = {"chat_format": "chatml", "eos_token_id": 0, "pad_token_id": 0, "do_sample": False}
    return write_model_dir(
        path,
        code_dir=CODE_DIR,
        code_files=CODE_FILES,
        config=config,
        tensors=tensors,
        generation_config=generation_config,
        tokenizer_config=remote_tokenizer_config("QWenTokenizer", "tokenization_qwen", model_max_length=256),
    )


def qwen_vl_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """Qwen-VL's chat format: a query in list form (``from_list_format``: an image, then text) put in ChatML by
    ``make_context``, and its list form read back."""
    query = tokenizer.from_list_format([{"image": "picture.png"}, {"text": "what is this?"}])
    result = qwen_chat(tokenizer, path, query=query)
    result["list_format"] = tokenizer.to_list_format(query)
    return result


def load_tiny_qwen_vl(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_qwen_vl` the way users load Qwen-VL (remote code)."""
    return load_remote_model(path, **kwargs)


def qwen_vl_image_span(image_path: str, n_queries: int = 64) -> List[int]:
    """The ids of one image in a Qwen-VL text: ``<img>``, the path's UTF-8 bytes, padding, ``</img>``.

    Args:
        image_path (`str`): a local path (or an ``http(s)://`` URL) of at most ``n_queries`` bytes.
        n_queries (`int`, *optional*, defaults to 64): the model's ``visual["n_queries"]``.

    Returns:
        `list[int]`: ``n_queries + 2`` ids.
    """
    data = list(image_path.encode("utf-8"))
    if len(data) > n_queries:
        raise ValueError(f"the image path has {len(data)} bytes, more than the {n_queries} an image span holds")
    return [IMAGE_START_ID, *data, *([IMAGE_START_ID + 2] * (n_queries - len(data))), IMAGE_START_ID + 1]
