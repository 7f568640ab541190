"""Qwen v1: Qwen-7B/14B/72B(-Chat) (``model_type`` "qwen"), the family this library was written for.

Facts (``docs/facts/qwen-v1.md``, "Classes and blocks", "How the forward checkpoints", "Loading and
streaming"): ``QWenPreTrainedModel`` holds the old API, its owner is ``QWenModel`` (``transformer``), the
blocks are ``QWenBlock`` (in ``_no_split_modules``), hidden states are batch-first and the owner checkpoints
them through a ``custom_forward(*inputs)`` closure (which returns ``block(*inputs, use_cache,
output_attentions)``). ``modeling_qwen.py`` imports ``transformers_stream_generator`` inside ``chat_stream()``
only, which transformers' load-time import check demands and which no longer imports on transformers >= 4.57.
5.x removed ``get_head_mask``, which its forward calls (:mod:`qwen_ckpt_compat._repairs.model_api`).

Nothing of its own: the repairs it needs are detected on its code (the lazily imported streaming package makes
``chat_stream()`` raise :class:`~qwen_ckpt_compat.StreamingUnavailableError` while streaming cannot work, for
Qwen-VL's code too).
"""

from __future__ import annotations

from .._family_registry import Family

FAMILY = Family(
    name="qwen",
    title="Qwen v1 (Qwen-7B, Qwen-14B, Qwen-72B and their -Chat models)",
    model_types=("qwen",),
    checkpointed="each QWenBlock, through the requested checkpoint function",
    # `c_proj` matches both the attention's and the MLP's output projection.
    lora_targets=("c_attn", "c_proj", "w1", "w2"),
    fixtures=("qwen",),
    caveats=(
        "`chat_stream()` needs transformers_stream_generator, which works up to transformers 4.40 only; "
        "elsewhere it raises StreamingUnavailableError (use `chat()` or a TextIteratorStreamer).",
    ),
    tokenizer=(
        '`QWenTokenizer` (tiktoken, `tokenization_qwen.py`), ChatML built by `make_context` in '
        '`qwen_generation_utils.py`; sets everything before `super().__init__` and finds its special tokens '
        'itself: works unmodified on every row.'
    ),
)
