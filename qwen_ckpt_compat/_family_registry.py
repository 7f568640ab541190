"""The registry of remote-code families: what the core, the doctor, the testing package and the docs know of each.

The generic mechanism (the class patch, the checkpoint layer, the repairs) works on any remote class with the old
``_set_gradient_checkpointing(self, module, value=False)``; every repair is detected on the classes. A family
(one module of the families wing, :mod:`qwen_ckpt_compat.families`) adds what only that family needs, and owns
every fact about it: how it is recognised, its extra blocks, its LoRA targets, its repairs, what the doctor says
about it and the names of its tiny fixtures. Everything else reads them here: :func:`families`, :func:`family_of`
(a loaded model or class), :func:`family_for_config` (a ``config.json``, for the doctor).

Adding a family: a module with a ``FAMILY`` in the families wing, one line in its registry list, a fixture in
:mod:`qwen_ckpt_compat.testing` and a test file (docs/families.md).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ._detection import unwrap_model
from ._hooks import load_wing

__all__ = ["Family", "FamilyFact", "families", "family_for_config", "family_named", "family_of", "register"]


@dataclass(frozen=True)
class FamilyFact:
    """A measured problem of one family that its code does not show, for the doctor.

    Attributes:
        id (`str`): the problem's id in the doctor's report.
        applies (`Callable`): ``capabilities -> bool``, whether it applies to the installed releases.
        summary (`str`): what happens.
        fix (`str`): what to do.
        needs_action (`bool`): whether the user must act (else the library handles it).
        fixed_by (`str`, *optional*): ``"import"`` where ``import qwen_ckpt_compat`` repairs it.
    """

    id: str
    applies: Callable[[Any], bool]
    summary: str
    fix: str
    needs_action: bool
    fixed_by: Optional[str] = None


@dataclass(frozen=True)
class Family:
    """One remote-code family with the old checkpointing API.

    Attributes:
        name (`str`): short name (its module's), e.g. ``"chatglm"``.
        title (`str`): the models, as the docs name them.
        model_types (`tuple[str, ...]`): ``config.model_type`` values of this family.
        checkpointed (`str`): what is checkpointed, and why, for the docs.
        lora_targets (`tuple[str, ...]`): the LoRA ``target_modules`` of its language model.
        fixtures (`tuple[str, ...]`): the names of its tiny fixtures in :mod:`qwen_ckpt_compat.testing`.
        caveats (`tuple[str, ...]`): what users should know (one sentence each).
        identify (`Callable[[type], bool]`, *optional*): a further test on a model class, for families sharing a
            ``model_type``.
        identify_config (`Callable[[Mapping], bool]`, *optional*): the same test on a ``config.json``'s contents.
        extra_blocks (`tuple[str, ...]`): class names of blocks to route besides those of ``_no_split_modules``.
        prepare_class (`Callable[[type], list[str]]`, *optional*): family repairs on a loaded model class.
        prepare_model (`Callable[[Any], list[str]]`, *optional*): family repairs on a loaded model.
        doctor_facts (`tuple[FamilyFact, ...]`): what the doctor reports about this family.
        tokenizer (`str`): its remote tokenizer, its chat format and what later releases broke in it, for the
            docs (the repairs themselves are generic: :mod:`qwen_ckpt_compat._repairs.tokenizers`).
    """

    name: str
    title: str
    model_types: tuple
    checkpointed: str
    lora_targets: tuple
    fixtures: tuple = ()
    caveats: tuple = ()
    identify: Optional[Callable[[type], bool]] = None
    identify_config: Optional[Callable[[Mapping], bool]] = None
    extra_blocks: tuple = ()
    prepare_class: Optional[Callable[[type], list]] = None
    prepare_model: Optional[Callable[[Any], list]] = None
    doctor_facts: tuple = ()
    tokenizer: str = ""


_registered: list = []
_lock = threading.Lock()


def register(family: Family) -> None:
    """Adds ``family`` (after those registered before it: register the most specific first). Idempotent by name."""
    with _lock:
        if all(f.name != family.name for f in _registered):
            _registered.append(family)


def families() -> tuple:
    """Every registered :class:`Family`, most specific first."""
    load_wing("families")
    return tuple(_registered)


def family_named(name: str) -> Family:
    """The registered family called ``name`` (`KeyError` if none)."""
    for family in families():
        if family.name == name:
            return family
    raise KeyError(name)


def _model_type(cls: type) -> Optional[str]:
    from transformers import PretrainedConfig

    if issubclass(cls, PretrainedConfig):
        return getattr(cls, "model_type", None)
    return getattr(getattr(cls, "config_class", None), "model_type", None)


def family_of(model_or_class: Any) -> Optional[Family]:
    """The registered family of a model, a model class or a config class; ``None`` when none matches."""
    from transformers import PretrainedConfig

    if isinstance(model_or_class, type):
        cls = model_or_class
    elif isinstance(model_or_class, PretrainedConfig):
        cls = type(model_or_class)
    else:
        cls = type(unwrap_model(model_or_class))
    model_type = _model_type(cls)
    is_config = issubclass(cls, PretrainedConfig)
    for family in families():
        if model_type not in family.model_types:
            continue
        if is_config or family.identify is None or family.identify(cls):
            return family
    return None


def family_for_config(config: Mapping) -> Optional[Family]:
    """The registered family of a model from its ``config.json`` contents alone (nothing is imported)."""
    model_type = config.get("model_type")
    for family in families():
        if model_type in family.model_types and (family.identify_config is None or family.identify_config(config)):
            return family
    return None
