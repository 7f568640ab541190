"""Family-specific knowledge the doctor cannot see in the code: measured facts, in one table.

What can be seen in the code is checked generically in :mod:`.checks` (ChatGLM's ``config.max_length`` on 5.x
is ``config-attribute-missing``; Baichuan's always-true ``gradient_checkpointing`` is
``checkpointing-enabled-on-load`` / ``load-raises-enable-typeerror``).

Integration point for the families registry (``qwen_ckpt_compat/families/``, issue 8): each family module can
contribute its :class:`FamilyFact` entries here (``FAMILY_FACTS`` becomes the registry's collection), and
:func:`qwen_ckpt_compat.doctor.model.family_of` can ask the registry for the family name; where a family
module repairs something, the matching fact goes (or its problem gets a ``fixed_by``: InternLM's NaN, issue 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from packaging.version import Version

__all__ = ["FAMILY_FACTS", "FamilyFact"]


@dataclass(frozen=True)
class FamilyFact:
    """A measured problem of one family that its code does not show (see shared/FAMILIES_FACTS.md)."""

    family: str
    id: str
    applies: Callable[[Any], bool]  # capabilities -> bool
    summary: str
    fix: str
    needs_action: bool
    fixed_by: Optional[str] = None  # "import" where the library's import repairs it


#: The measured facts, by family name (see :func:`qwen_ckpt_compat.doctor.model.family_of`).
FAMILY_FACTS: tuple = (
    FamilyFact(
        "internlm",
        "internlm-nan-loss",
        lambda caps: caps.transformers >= Version("5.0"),
        "InternLM v1 gives loss = nan on transformers 5.x without the library, even in a plain forward: 5.x builds "
        "the model on the meta device and leaves its rotary tables (non-persistent buffers computed in "
        "InternLMRotaryEmbedding.__init__) as uninitialised memory; the import recomputes them after loading",
        "Fixed by `import qwen_ckpt_compat` before `from_pretrained(..., trust_remote_code=True)` (a model loaded "
        "before the import keeps the uninitialised tables).",
        False,
        "import",
    ),
    FamilyFact(
        "qwen-vl",
        "qwen-vl-vision-tower",
        lambda caps: True,
        "Qwen-VL: the vision transformer's blocks are not in _no_split_modules and the remote code never "
        "checkpoints them; the library checkpoints them when a gradient flows through them (a frozen tower keeps "
        "no activations, so it runs once)",
        "Use LoRA targets of the language model (c_attn, attn.c_proj, w1, w2): c_proj alone also matches the "
        "vision transformer's MLPs.",
        False,
    ),
)
