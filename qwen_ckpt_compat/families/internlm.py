"""InternLM v1: internlm-chat-7b, internlm-20b (``model_type`` "internlm").

Facts (``docs/facts/internlm.md``, "Classes and blocks", "The rotary tables", "Behaviour per release"):
``InternLMPreTrainedModel`` holds the old API; its owner is ``InternLMModel``; the forward is LLaMA-like and
checkpoints ``InternLMDecoderLayer`` through a ``create_custom_forward`` closure.
``InternLMRotaryEmbedding.__init__`` computes ``inv_freq``, ``cos_cached`` and ``sin_cached`` and registers
them with ``persistent=False``; the forward rebuilds the caches only for a longer sequence.

On 5.x a plain forward gives a NaN loss. Cause (reproduced by the fixture, see
``tests/test_families.py::test_internlm_nan_comes_from_uninitialised_rotary_buffers``): 5.x builds the model on
the meta device and then gives each non-persistent buffer, which no checkpoint holds, uninitialised memory
(``torch.empty_like``); native models recompute theirs in ``_init_weights``, this remote code does not. Repair
(generic, in :mod:`qwen_ckpt_compat._repairs.weights`): those buffers get again what ``__init__`` computes.
"""

from __future__ import annotations

from packaging.version import Version

from .._family_registry import Family, FamilyFact

FAMILY = Family(
    name="internlm",
    title="InternLM v1 (internlm-7b, internlm-chat-7b, internlm-20b)",
    model_types=("internlm",),
    checkpointed="each InternLMDecoderLayer",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    fixtures=("internlm",),
    caveats=(
        "Load it after `import qwen_ckpt_compat` on transformers 5.x: the rotary tables are recomputed after "
        "loading; a model loaded before the import keeps the uninitialised ones (NaN loss).",
    ),
    doctor_facts=(
        FamilyFact(
            "internlm-nan-loss",
            lambda caps: caps.transformers >= Version("5.0"),
            "InternLM v1 gives loss = nan on transformers 5.x without the library, even in a plain forward: 5.x "
            "builds the model on the meta device and leaves its rotary tables (non-persistent buffers computed in "
            "InternLMRotaryEmbedding.__init__) as uninitialised memory; the import recomputes them after loading",
            "Fixed by `import qwen_ckpt_compat` before `from_pretrained(..., trust_remote_code=True)` (a model "
            "loaded before the import keeps the uninitialised tables).",
            False,
            "import",
        ),
    ),
    tokenizer=(
        '`InternLMTokenizer` (SentencePiece, `tokenization_internlm.py`), chat as '
        '`<s><|User|>:...<eoh>\\n<|Bot|>:`; it no longer loads from 4.34 (`sp_model` set after '
        '`super().__init__`; fixed upstream in November 2023, the repair does the same for older copies).'
    ),
)
