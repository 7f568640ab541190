"""The families wing: one module per remote-code family, each owning every fact about its family.

Each module defines a ``FAMILY`` (:class:`qwen_ckpt_compat._family_registry.Family`): how its classes are
recognised, its extra blocks, its LoRA targets, its repairs, what the doctor says about it and its fixture's name.
Importing this package registers them, most specific first (Qwen-VL before Qwen: both are ``model_type``
"qwen"). The core, the doctor, the testing package, the tests and the docs' tables read the registry.

Adding a family: a module here with a ``FAMILY``, its name in :data:`MODULES`, a fixture in
:mod:`qwen_ckpt_compat.testing` and a test file (docs/families.md).
"""

from __future__ import annotations

import importlib

from .._family_registry import register

__all__ = ["MODULES"]

#: The family modules, most specific first.
MODULES = ("qwen_audio", "qwen_vl", "qwen", "glm4", "chatglm", "baichuan", "internlm")

for _name in MODULES:
    register(importlib.import_module(f"{__name__}.{_name}").FAMILY)
