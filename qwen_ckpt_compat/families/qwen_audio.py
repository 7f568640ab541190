"""Qwen-Audio and Qwen-Audio-Chat (``model_type`` "qwen", with an audio encoder).

Facts (``docs/facts/qwen-audio.md``, "Classes and blocks", "Audio in the text", "What is checkpointed"): the text
part is Qwen v1's (``QWenPreTrainedModel``, owner ``QWenModel``, ``_no_split_modules = ["QWenBlock"]``, the old
``_set_gradient_checkpointing`` flagging ``QWenModel`` only). ``QWenModel.audio`` is a Whisper-style encoder
(``audio.py``'s ``AudioEncoder``: two convolutions, ``blocks`` of ``ResidualAttentionBlock``, an average pool, a
projection) whose output replaces the hidden states of each ``<audio>...</audio>`` span. The audio reaches the
model as ``audio_info`` (from the tokenizer's ``process_audio``), a keyword of ``forward`` and ``generate``;
a batch without audio does not run the encoder.

What is checkpointed: the ``QWenBlock`` s, as for Qwen v1; the encoder's ``ResidualAttentionBlock`` s, which the
remote code never checkpoints (its forward loops over them), are routed too, like Qwen-VL's vision blocks, and
checkpoint only when a gradient flows through them (encoder parameters trained or LoRA inside it): a frozen
encoder keeps no activations.
"""

from __future__ import annotations

import sys
from typing import Mapping

from .._family_registry import Family


def _has_audio_encoder(cls: type) -> bool:
    module = sys.modules.get(getattr(cls, "__module__", ""))
    return module is not None and isinstance(getattr(module, "AudioEncoder", None), type)


def _config_has_audio_encoder(config: Mapping) -> bool:
    return isinstance(config.get("audio"), dict)


FAMILY = Family(
    name="qwen_audio",
    title="Qwen-Audio, Qwen-Audio-Chat",
    model_types=("qwen",),
    # Qwen v1's: the audio encoder's modules are named query/key/value/out and mlp.0/mlp.2, so `c_proj` stays
    # inside the language model.
    lora_targets=("c_attn", "c_proj", "w1", "w2"),
    fixtures=("qwen_audio",),
    identify=_has_audio_encoder,
    identify_config=_config_has_audio_encoder,
    checkpointed=(
        "each QWenBlock; each ResidualAttentionBlock of the audio encoder too, when a gradient flows through it (a "
        "frozen encoder holds no activations, so it runs once)"
    ),
    caveats=(
        "Pass the tokenizer's `audio_info` to the model (`model(**batch, audio_info=...)`, `generate(..., "
        "audio_info=...)`): the audio spans of the ids are only placeholders.",
        "Its remote `audio.py` decodes audio with the `ffmpeg` command.",
    ),
    extra_blocks=("ResidualAttentionBlock",),
    tokenizer=(
        "Qwen v1's `QWenTokenizer` with audio spans (`<audio>path</audio>`, as long as `process_audio` says) and "
        "the task tokens of its speech prompts; ChatML as Qwen v1: works unmodified on every row."
    ),
)
