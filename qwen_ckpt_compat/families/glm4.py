"""GLM-4-9B and GLM-4-9B-chat (``model_type`` "chatglm", as ChatGLM2/3: told apart by their code).

Facts (``docs/facts/glm4.md``, "Classes and blocks", "How the forward checkpoints", "Revisions"): the ChatGLM
lineage's classes and names (``ChatGLMForConditionalGeneration``, owner ``GLMTransformer``, blocks ``GLMBlock``
called positionally), but batch-first hidden states and an attention picked from ``CORE_ATTENTION_CLASSES`` by
``config._attn_implementation``. The code has no old ``_set_gradient_checkpointing(module, value)``: its June 2024
revision overrides ``gradient_checkpointing_enable`` with a method that enables nothing (as ChatGLM3's revision
37fe000), a later one dropped that override (its discussion 60); both hard-code ``use_reentrant=False`` in the
owner's own checkpoint call. ``ChatGLMForConditionalGeneration.__init__`` reads ``config.max_length`` and no
model class calls ``post_init()``, as in ChatGLM2/3. The tokenizer (``ChatGLM4Tokenizer``) is tiktoken's, with
ChatGLM3's ``_pad`` of before transformers 4.45 and ``build_chat_input``.

Nothing of its own: the enable override is routed by the class patch (the call is watched, the blocks routed in
the mode asked for), the config and ``post_init`` repairs are ChatGLM's generic ones, and the tokenizer's are the
generic ones of :mod:`qwen_ckpt_compat._repairs.tokenizers`. This module says how GLM-4 is recognised.
"""

from __future__ import annotations

import sys
from typing import Mapping

from .._family_registry import Family

#: The vocabulary of GLM-4-9B's tokenizer (151,329 ranks and its special tokens), which ChatGLM2/3's (65,024)
#: never reach: what tells a GLM-4 ``config.json`` from theirs.
GLM4_PADDED_VOCAB_SIZE = 151552


def _has_attention_table(cls: type) -> bool:
    """GLM-4's modeling file picks its attention from ``CORE_ATTENTION_CLASSES`` (ChatGLM2/3's has one class)."""
    module = sys.modules.get(getattr(cls, "__module__", ""))
    return module is not None and isinstance(getattr(module, "CORE_ATTENTION_CLASSES", None), dict)


def _config_is_glm4(config: Mapping) -> bool:
    return config.get("padded_vocab_size") == GLM4_PADDED_VOCAB_SIZE


FAMILY = Family(
    name="glm4",
    title="GLM-4-9B, GLM-4-9B-chat",
    model_types=("chatglm",),
    checkpointed="each GLMBlock (batch-first hidden states, called positionally by GLMTransformer)",
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    fixtures=("glm4",),
    identify=_has_attention_table,
    identify_config=_config_is_glm4,
    caveats=(
        "Its remote tokenizer imports tiktoken: install it.",
        "The code of June 2024 overrides `gradient_checkpointing_enable` with a method that enables nothing; with "
        "the library the blocks are checkpointed all the same, in the mode asked for.",
        "The latest code has no override and no old API: transformers enables it, and its own checkpoint call "
        "hard-codes `use_reentrant=False` (a requested `use_reentrant=True` is not honoured there: a warning says so).",
    ),
    tokenizer=(
        "`ChatGLM4Tokenizer` (tiktoken, `tokenization_chatglm.py`; tokens are bytes), `build_chat_input` (role "
        "tokens) and the chat template of `tokenizer_config.json`; it no longer encodes from 4.45 (`_pad` without "
        "`padding_side`), and on 5.x `build_chat_input` calls the removed `batch_encode_plus`: both repaired. It "
        "pads on the left only (an assert)."
    ),
)
