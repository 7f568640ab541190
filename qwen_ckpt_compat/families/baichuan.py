"""Baichuan2-7B/13B(-Chat) (``model_type`` "baichuan").

Facts (``docs/facts/baichuan2.md``, "Classes and blocks", "The config that enables checkpointing", "The 7B
rotary tables on 5.x"): ``BaichuanPreTrainedModel`` holds the old API; its owner is ``BaichuanModel``, which
holds ``layers`` and checkpoints them through a ``create_custom_forward`` closure with positional tensors.
``BaichuanConfig.__init__`` stores ``self.gradient_checkpointing = (gradient_checkpointing,)``, a one-element
tuple and so always truthy: transformers' ``post_init`` turns it into an enable call while the model is being
built, on every release. On 4.35.x that call raises the ``enable`` TypeError inside ``from_pretrained``,
before anything could patch the model afterwards.

Baichuan2-7B (rotary, ``DecoderLayer``) also computes its rotary tables in ``RotaryEmbedding.__init__`` as plain
tensor attributes: 5.x's meta-device construction leaves them on the meta device and the first forward fails
(``Cannot copy out of meta tensor``).

Nothing of its own: the import hook patches its classes when they are loaded (so it loads on 4.35.x), an
enable call made by ``post_init`` with nobody asking warns once, saying how to turn it off
(:mod:`qwen_ckpt_compat._class_patch`), and the 7B tables get their ``__init__`` values after loading
(:func:`qwen_ckpt_compat._repairs.weights.recompute_non_persistent_buffers`).
"""

from __future__ import annotations

from .._family_registry import Family

FAMILY = Family(
    name="baichuan",
    title="Baichuan2-7B, Baichuan2-13B (Base and Chat)",
    model_types=("baichuan",),
    checkpointed="each decoder layer (BaichuanLayer / DecoderLayer)",
    lora_targets=("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"),
    fixtures=("baichuan", "baichuan_7b"),
    caveats=(
        "Load it after `import qwen_ckpt_compat` on 5.x: Baichuan2-7B's rotary tables are recomputed after loading.",
        "Every load turns checkpointing on (its config's `gradient_checkpointing` is a truthy tuple); the library "
        "routes it and warns; `prepare_for_lora(model, use_gradient_checkpointing=False)` turns it off.",
        "Load it after `import qwen_ckpt_compat`: on transformers 4.35.x the load itself fails otherwise.",
    ),
    tokenizer=(
        '`BaichuanTokenizer` (SentencePiece, `tokenization_baichuan.py`), chat as reserved role ids '
        '(`user_token_id`, `assistant_token_id` of `generation_config.json`) and encoded messages; it no '
        'longer loads from 4.34 (`sp_model` set after `super().__init__`), and on 5.x a saved tokenizer came '
        'back adding a BOS (`add_bos_token` not saved): both repaired.'
    ),
)
