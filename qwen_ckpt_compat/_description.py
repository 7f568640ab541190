"""``describe(model)``: what this library sees in a model and what it has put in effect on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ._detection import (
    find_checkpointing_class,
    found_block_names,
    is_decoder_block,
    is_peft_model,
    is_remote_code,
    own_class,
    unwrap_engines,
    unwrap_model,
)
from ._family_registry import family_of
from ._patches import registry

__all__ = ["ModelInfo", "describe"]


@dataclass(frozen=True)
class ModelInfo:
    """A description of a model, as far as checkpointing is concerned.

    Attributes:
        model_class (`str`): qualified name of the transformers model class.
        module (`str`): the module the class comes from (``transformers_modules.*`` for remote code).
        family (`str`, *optional*): ``config.model_type`` (``"qwen"`` for Qwen v1).
        is_remote_code (`bool`): the class was loaded with ``trust_remote_code=True``.
        is_peft_model (`bool`): a peft model was passed; the rest describes the model inside it.
        old_checkpointing_api (`bool`): the old ``_set_gradient_checkpointing(module, value)`` form is used.
        checkpointing_class (`str`, *optional*): the class that defines that old method.
        decoder_blocks (`tuple[str, ...]`): class names of the decoder blocks (from ``_no_split_modules``; else the class of the layer list its code checkpoints).
        num_decoder_blocks (`int`): how many decoder blocks the model has.
        supports_gradient_checkpointing (`bool`): the model's own ``supports_gradient_checkpointing``.
        registered_family (`str`, *optional*): the name of its family in the registry (``"qwen_vl"``), if any.
        patches (`tuple[str, ...]`): every patch of this library in effect on the classes of the model and its
            config, one line each (the class patch, the checkpoint layer, the repairs), from the patch registry.
    """

    model_class: str
    module: str
    family: Optional[str]
    is_remote_code: bool
    is_peft_model: bool
    old_checkpointing_api: bool
    checkpointing_class: Optional[str]
    decoder_blocks: tuple[str, ...]
    num_decoder_blocks: int
    supports_gradient_checkpointing: bool
    registered_family: Optional[str] = None
    patches: tuple = ()


def describe(model: Any) -> ModelInfo:
    """Describes ``model`` (a ``PreTrainedModel`` or a peft model around one); see :class:`ModelInfo`."""
    inner = unwrap_model(model)
    cls = own_class(inner)
    checkpointing_class = find_checkpointing_class(cls)
    blocks = found_block_names(inner)
    family = family_of(inner)
    classes = {klass for module in inner.modules() for klass in own_class(module).__mro__}
    classes.update(type(getattr(inner, "config", None)).__mro__)
    return ModelInfo(
        model_class=cls.__qualname__,
        module=cls.__module__,
        family=getattr(getattr(inner, "config", None), "model_type", None),
        is_remote_code=is_remote_code(cls),
        is_peft_model=is_peft_model(unwrap_engines(model)),
        old_checkpointing_api=checkpointing_class is not None,
        checkpointing_class=checkpointing_class.__qualname__ if checkpointing_class else None,
        decoder_blocks=blocks,
        num_decoder_blocks=sum(is_decoder_block(m, blocks) for m in inner.modules()),
        supports_gradient_checkpointing=bool(getattr(inner, "supports_gradient_checkpointing", False)),
        registered_family=family.name if family is not None else None,
        patches=tuple(str(install) for install in registry.installed() if install.owner in classes),
    )
