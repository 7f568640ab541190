"""The tiny Qwen-Audio fixture: `write_tiny_qwen_audio` / `load_tiny_qwen_audio` (see ``qwen_audio/``).

The text model is the tiny Qwen v1 (its configuration and generation utilities are shared with that fixture); the
audio encoder is ``qwen_audio/audio.py`` (docs/facts/qwen-audio.md). The directory also holds ``sample.wav``, a
short 16-bit mono tone written here in code, for chat and training examples.
"""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path
from typing import Any, Dict, Tuple

from ._qwen import _config_dict, _state_dict, qwen_chat
from ._writer import PathLike, SeededWeights, load_remote_model, remote_tokenizer_config, write_model_dir

CODE_DIR: Path = Path(__file__).resolve().parent / "qwen_audio"
_QWEN_V1_DIR: Path = Path(__file__).resolve().parent / "qwen_v1"
CODE_FILES: Tuple[str, ...] = (
    str(_QWEN_V1_DIR / "configuration_qwen.py"),
    "modeling_qwen.py",
    str(_QWEN_V1_DIR / "qwen_generation_utils.py"),
    "audio.py",
    "tokenization_qwen.py",
)
AUDIO_START_ID = 300  # <audio>; </audio> is 301, the padding inside a span 302
AUDIO_TARGET_MODULES: Tuple[str, ...] = ("attn.query", "attn.value", "attn.out")
"""Targets inside the audio encoder's blocks, for tests that train the encoder too."""
SAMPLE = "sample.wav"
"""The audio file each fixture directory holds (0.2 s: a span of 10 ids)."""


def _audio_tensors(config: Dict[str, Any], weights: SeededWeights) -> Dict[str, Any]:
    import torch

    audio = config["audio"]
    mels, width, out = audio["n_mels"], audio["n_state"], audio["output_dim"]
    prefix = "transformer.audio."
    tensors = {
        prefix + "conv1.weight": weights.normal(width, mels, 3),
        prefix + "conv1.bias": torch.zeros(width),
        prefix + "conv2.weight": weights.normal(width, width, 3),
        prefix + "conv2.bias": torch.zeros(width),
        prefix + "ln_post.weight": weights.ones(width),
        prefix + "ln_post.bias": torch.zeros(width),
        prefix + "proj.weight": weights.normal(out, width),
        prefix + "proj.bias": torch.zeros(out),
        prefix + "audio_bos_eos_token.weight": weights.normal(2, out),
        # a persistent buffer, saved with the weights as in the real checkpoints (audio.py's `sinusoids`)
        prefix + "positional_embedding": _sinusoids(audio["n_ctx"], width),
    }
    for i in range(audio["n_layer"]):
        block = f"{prefix}blocks.{i}."
        for name in ("query", "key", "value", "out"):
            tensors[f"{block}attn.{name}.weight"] = weights.normal(width, width)
            if name != "key":
                tensors[f"{block}attn.{name}.bias"] = weights.normal(width)
        for norm in ("attn_ln", "mlp_ln"):
            tensors[f"{block}{norm}.weight"] = weights.ones(width)
            tensors[f"{block}{norm}.bias"] = torch.zeros(width)
        tensors[f"{block}mlp.0.weight"] = weights.normal(4 * width, width)
        tensors[f"{block}mlp.0.bias"] = weights.normal(4 * width)
        tensors[f"{block}mlp.2.weight"] = weights.normal(width, 4 * width)
        tensors[f"{block}mlp.2.bias"] = weights.normal(width)
    return tensors


def _sinusoids(length: int, channels: int) -> Any:
    import torch

    increment = math.log(10000.0) / (channels // 2 - 1)
    inverse = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def tone_wav(seconds: float = 0.2, frequency: float = 200.0, rate: int = 1600) -> bytes:
    """A 16-bit mono WAV of a sine tone, built with the standard library."""
    import io

    count = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * frequency * i / rate))) for i in range(count)
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples)
    return buffer.getvalue()


def write_tiny_qwen_audio(
    path: PathLike,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    audio_width: int = 16,
    audio_layers: int = 2,
    audio_heads: int = 2,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Writes a local Qwen-Audio remote-code model directory with tiny random weights, and ``sample.wav``.

    The text model is the tiny Qwen v1 of :func:`~qwen_ckpt_compat.testing.write_tiny_qwen` (vocabulary of 320:
    byte ids, then ``<audio>`` = 300, ``</audio>`` = 301, the span padding 302 and four task tokens); ``audio``
    configures a Whisper-style encoder of ``audio_layers`` blocks on 8 mel bands (16 positions after its
    convolutions, 8 vectors after its pool). Audio enters as the ``audio_info`` of the tokenizer's
    ``process_audio``, passed to the model's ``forward`` / ``generate``.

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
    config["audio"] = {
        "n_mels": 8,
        "n_ctx": 16,
        "n_state": audio_width,
        "n_head": audio_heads,
        "n_layer": audio_layers,
        "output_dim": hidden_size,
        "avg_pool": True,
        "add_audio_bos_eos_token": True,
        "audio_start_id": AUDIO_START_ID,
    }
    config.update(config_overrides)

    def tensors(c: Dict[str, Any]) -> Dict[str, Any]:
        result = _state_dict(c, seed)
        result.update(_audio_tensors(c, SeededWeights(seed + 1)))
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
        files={SAMPLE: tone_wav()},
    )


def qwen_audio_chat(tokenizer: Any, path: PathLike) -> Dict[str, Any]:
    """Qwen-Audio-Chat's format: an audio span and a question in ChatML (``make_context``), the ``audio_info`` of
    ``process_audio``, the ids with it, and the decoded text (the directory written as ``<dir>``)."""
    audio = str(Path(path) / SAMPLE)
    query = f"<audio>{audio}</audio>what does the person say?"
    info = tokenizer.process_audio(query)
    result = qwen_chat(tokenizer, path, query=query)
    result["prompt"] = result["prompt"].replace(str(path), "<dir>")
    ids = tokenizer(query, audio_info=info)["input_ids"]
    result["query_ids"] = ids
    result["audio_span_tokens"] = info["audio_span_tokens"]
    result["input_audio_lengths"] = info["input_audio_lengths"].tolist()
    result["decoded"] = tokenizer.decode(ids, audio_info=info).replace(str(path), "<dir>")
    return result


def load_tiny_qwen_audio(path: PathLike, **kwargs: Any) -> Any:
    """Loads a directory written by :func:`write_tiny_qwen_audio` the way users load Qwen-Audio (remote code)."""
    return load_remote_model(path, **kwargs)
