"""Baichuan2-7B/13B(-Chat) (``model_type`` "baichuan").

Facts (``shared/FAMILIES_FACTS.md``): ``BaichuanPreTrainedModel`` holds the old API; its owner is
``BaichuanModel``, which holds ``layers`` and checkpoints them through a ``create_custom_forward`` closure with
positional tensors. ``BaichuanConfig.__init__`` stores ``self.gradient_checkpointing = (gradient_checkpointing,)``,
a one-element tuple and so always truthy: transformers' ``post_init`` turns it into an enable call while the
model is being built, on every release. On 4.35.x that call raises the ``enable`` TypeError inside
``from_pretrained``, before anything could patch the model afterwards.

Nothing of its own: the import hook patches its classes when they are loaded (so it loads on 4.35.x), and an
enable call made by ``post_init`` with nobody asking warns once, saying how to turn it off
(:mod:`qwen_ckpt_compat.patching`).
"""

from __future__ import annotations

from . import Family

FAMILY = Family(
    name="baichuan",
    title="Baichuan2-7B, Baichuan2-13B (Base and Chat)",
    model_types=("baichuan",),
    checkpointed="each decoder layer (BaichuanLayer / DecoderLayer)",
    caveats=(
        "Every load turns checkpointing on (its config's `gradient_checkpointing` is a truthy tuple); the library "
        "routes it and warns; `prepare_for_lora(model, use_gradient_checkpointing=False)` turns it off.",
        "Load it after `import qwen_ckpt_compat`: on transformers 4.35.x the load itself fails otherwise.",
    ),
)
