"""ChatGLM2-6B and ChatGLM3-6B (``model_type`` "chatglm").

Facts (``docs/facts/chatglm.md``, "Classes and blocks", "How the forward checkpoints", "Configuration and
construction"): ``ChatGLMPreTrainedModel`` holds the old API; its owner is ``GLMTransformer``
(``ChatGLMModel.encoder``), whose ``forward(hidden_states, attention_mask, rotary_pos_emb, kv_caches=None,
use_cache=True, output_hidden_states=False)`` calls each ``GLMBlock`` positionally, with sequence-first hidden
states ``[seq, batch, hidden]``, and, when checkpointing, ``checkpoint(layer, ...)`` with every argument
positional. ``ChatGLMForConditionalGeneration.__init__`` reads ``config.max_length``, which the config class
never sets: it relied on the generation defaults ``PretrainedConfig`` carried before 5.0, so on 5.x the model
does not even load.

Repairs (generic, detected, in :mod:`qwen_ckpt_compat._repairs.config` and
:mod:`qwen_ckpt_compat._repairs.model_api`): the config attributes of
``PretrainedConfig`` before 5.0 (``max_length`` and the other generation defaults, and ``use_cache`` from
``config.json``, which 5.x drops), and ``post_init()``, which ChatGLM's model classes never call and 5.x's
``from_pretrained`` depends on.
"""

from __future__ import annotations

from .._family_registry import Family

FAMILY = Family(
    name="chatglm",
    title="ChatGLM2-6B, ChatGLM3-6B",
    model_types=("chatglm",),
    checkpointed="each GLMBlock (sequence-first hidden states, called positionally by GLMTransformer)",
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    fixtures=("chatglm", "chatglm_37fe000"),
    caveats=(
        "On transformers 5.x the config answers `max_length` and the other generation defaults of "
        "`PretrainedConfig` before 5.0 (never saved to config.json), and `use_cache` from config.json is kept.",
    ),
    tokenizer=(
        '`ChatGLMTokenizer` (SentencePiece, `tokenization_chatglm.py`), ChatGLM2\'s `build_prompt` ("[Round '
        'n]\\n\\n问：...\\n\\n答：") and ChatGLM3\'s `build_chat_input` (role tokens); a saved tokenizer no longer '
        'loads from 4.34 (its special tokens are read-only properties), it no longer encodes from 4.45 '
        '(`_pad` without `padding_side`), and on 5.x `build_chat_input` calls the removed '
        '`batch_encode_plus`: all repaired. It pads on the left only (an assert), as it always did.'
    ),
)
