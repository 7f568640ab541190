"""Qwen-VL and Qwen-VL-Chat (``model_type`` "qwen", with a vision tower).

Facts (``docs/facts/qwen-vl.md``, "Classes and blocks", "Images in the text", "LoRA targets"): the text part
is Qwen v1's (``QWenPreTrainedModel``, owner ``QWenModel``, ``_no_split_modules = ["QWenBlock"]``).
``QWenModel.visual`` is a vision transformer (``VisionTransformer``: a patch convolution,
``transformer.resblocks`` of ``VisualAttentionBlock``, then a one-layer cross-attention resampler) whose
output replaces the hidden states between the image tokens. Images enter as their path (or URL) written as
bytes between ``<img>`` and ``</img>`` in the text; ``visual.py`` imports ``requests``, ``PIL`` and
``torchvision`` at import time. In training, a batch without images still runs the vision tower on a blank
image (so that every parameter takes part).

What is checkpointed, and why:

* the ``QWenBlock`` s, as for Qwen v1;
* the vision transformer's ``VisualAttentionBlock`` s, which the remote code never checkpoints (they are not
  in ``_no_split_modules`` and its ``_set_gradient_checkpointing`` only flags ``QWenModel``): they are routed
  too, with the same settings, and their ``every_n_layers`` count starts again at 0. A block checkpoints only
  when a gradient can flow through it (:mod:`qwen_ckpt_compat._checkpoint_layer`): with LoRA on the language
  model and the vision tower frozen (peft freezes it; use :data:`TARGET_MODULES`), the tower holds no
  activations for the backward pass and runs once, so checkpointing it would save nothing. It pays off when
  the tower is trained (LoRA targets inside it, or unfrozen parameters): then its blocks run again in the
  backward pass instead of keeping their activations.
* the resampler is not checkpointed: a single cross-attention over the patch features.
"""

from __future__ import annotations

import sys
from typing import Mapping

from .._family_registry import Family, FamilyFact

#: LoRA targets of the language model alone (``attn.c_proj`` rather than ``c_proj``, which would also match the
#: MLPs of the vision transformer's blocks).
TARGET_MODULES = ("c_attn", "attn.c_proj", "w1", "w2")


def _has_vision_tower(cls: type) -> bool:
    module = sys.modules.get(getattr(cls, "__module__", ""))
    return module is not None and isinstance(getattr(module, "VisionTransformer", None), type)


def _config_has_vision_tower(config: Mapping) -> bool:
    return isinstance(config.get("visual"), dict)


FAMILY = Family(
    name="qwen_vl",
    title="Qwen-VL, Qwen-VL-Chat",
    model_types=("qwen",),
    lora_targets=TARGET_MODULES,
    fixtures=("qwen_vl",),
    identify=_has_vision_tower,
    identify_config=_config_has_vision_tower,
    checkpointed=(
        "each QWenBlock; each VisualAttentionBlock of the vision transformer too, when a gradient flows through "
        "it (a frozen tower holds no activations, so it runs once)"
    ),
    caveats=(
        "Use LoRA targets of the language model only (`c_attn`, `attn.c_proj`, `w1`, `w2`): `c_proj` alone also "
        "matches the vision transformer's MLPs.",
        "Its remote `visual.py` needs requests, Pillow and torchvision at import time.",
    ),
    extra_blocks=("VisualAttentionBlock",),
    doctor_facts=(
        FamilyFact(
            "qwen-vl-vision-tower",
            lambda caps: True,
            "Qwen-VL: the vision transformer's blocks are not in _no_split_modules and the remote code never "
            "checkpoints them; the library checkpoints them when a gradient flows through them (a frozen tower keeps "
            "no activations, so it runs once)",
            "Use LoRA targets of the language model (c_attn, attn.c_proj, w1, w2): c_proj alone also matches the "
            "vision transformer's MLPs.",
            False,
        ),
    ),
    tokenizer=(
        "Qwen v1's `QWenTokenizer` with image spans (`<img>path</img>`, padded to a fixed span) and "
        '`from_list_format`; ChatML as Qwen v1: works unmodified on every row.'
    ),
)
