"""Family-specific knowledge the doctor cannot see in the code: measured facts, in one table.

What can be seen in the code is checked generically in :mod:`.checks` (ChatGLM's ``config.max_length`` on 5.x
is ``config-attribute-missing``; Baichuan's always-true ``gradient_checkpointing`` is
``checkpointing-enabled-on-load`` / ``load-raises-enable-typeerror``).

Integration point for the families registry (``qwen_ckpt_compat/families/``, issue 8): each family module can
contribute its :class:`FamilyFact` entries here (``FAMILY_FACTS`` becomes the registry's collection), and
:func:`qwen_ckpt_compat.doctor.model.family_of` can ask the registry for the family name; where a family
module repairs something, the matching fact goes (or its problem gets a ``fixed_by``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


#: The measured facts, by family name (see :func:`qwen_ckpt_compat.doctor.model.family_of`).
FAMILY_FACTS: tuple = (
    FamilyFact(
        "internlm",
        "internlm-nan-loss",
        lambda caps: caps.transformers >= Version("5.0"),
        "InternLM v1 gives loss = nan on transformers 5.x even in a plain forward, without checkpointing "
        "(measured on 5.0.0 and 5.23.0; the cause is not established)",
        "Use transformers 4.55.4 (the newest release measured to work with InternLM v1).",
        True,
    ),
    FamilyFact(
        "qwen-vl",
        "qwen-vl-vision-not-checkpointed",
        lambda caps: True,
        "Qwen-VL: only the text blocks (QWenBlock) are checkpointed; the vision tower's blocks are not in "
        "_no_split_modules, and its behaviour under checkpointing is not established",
        "Nothing to do for text-only batches (measured on 4.34.1-4.55.4); with images, check memory yourself.",
        False,
    ),
    FamilyFact(
        "qwen-vl",
        "qwen-vl-untested-release",
        lambda caps: caps.transformers >= Version("5.0"),
        "Qwen-VL on transformers 5.x is not established (measured on 4.34.1-4.55.4 only)",
        "Prefer transformers 4.55.4 for Qwen-VL until 5.x is measured.",
        False,
    ),
)
