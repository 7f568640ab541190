"""The checks: each looks at the model's facts and the installation, and adds the problems it finds.

What a problem says must be what the installed release really does: ``tests/test_doctor_release.py`` runs both
sides on every matrix row. Capabilities come from :func:`qwen_ckpt_compat._versions.capabilities`; the stream
package's state from :mod:`qwen_ckpt_compat._repairs.streaming`; what the library repairs from
:mod:`qwen_ckpt_compat._repairs`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from typing import Any, Optional

from .._family_registry import families, family_for_config
from .._loading import NO_IMPORT_HOOK_ENV
from .._remote_code import ModuleFacts
from .._repairs.config import PRE_5_CONFIG_DEFAULTS
from .._repairs.streaming import STREAM_PACKAGE, is_qwen_style_module
from .._repairs.tokenizers import REMOVED_METHODS as REMOVED_TOKENIZER_METHODS
from .context import CheckContext
from .environment import Runtime, import_hook_enabled, quiet, stream_generator_status
from .model import ModelFacts, ModelFiles, class_constant
from .tokenizer import IMPORT_TOKENIZER_FIRST, check_tokenizer

__all__ = ["run_checks"]

_GENERATING_METHODS = ("prepare_inputs_for_generation", "generate")
_INSTALL_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn", "yaml": "pyyaml"}


_PREPARE = (
    "`model = prepare_for_lora(model)` after loading, before or after get_peft_model (or `patch(model)` before "
    "enabling checkpointing yourself)"
)
_IMPORT_FIRST = (
    "`import qwen_ckpt_compat` before `from_pretrained(..., trust_remote_code=True)` (the import installs the "
    "fix; it does not act on a model loaded before it)"
)


def _old_api_fix() -> tuple[str, str]:
    """(fix, fixed_by) of the old API's problems: the import patches the class as transformers loads it (unless
    the loading hook is switched off); ``prepare_for_lora`` patches a model loaded without it."""
    if import_hook_enabled():
        return (
            "Fixed by `import qwen_ckpt_compat` before `from_pretrained(..., trust_remote_code=True)`: the class is "
            "patched as it loads. For a model loaded before the import: `model = prepare_for_lora(model)`.",
            "import",
        )
    return f"Fixed by {_PREPARE}.", "prepare_for_lora"


def _check_model_type(ctx: CheckContext) -> None:
    model = ctx.model
    if model.remote or model.model_type is None:
        if model.model_type is None and not model.remote:
            ctx.add(
                "no-model-type",
                "config.json has neither model_type nor an auto_map model class: transformers cannot load it",
                "Use the config.json of the original checkpoint.",
                needs_action=True,
            )
        return
    known = ctx.runtime.knows_model_type(model.model_type)
    if known is False:
        code = sorted(p.name for p in model.directory.glob("*.py"))
        hint = (
            f"; the directory holds {', '.join(code)}: restore config.json's auto_map that names them and load "
            "with trust_remote_code=True"
            if code
            else ""
        )
        ctx.add(
            "unknown-model-type",
            f"transformers {ctx.transformers} has no model type {model.model_type!r} and config.json has no "
            f"auto_map naming remote code",
            f"Use a transformers release that has {model.model_type!r}, or the original config.json{hint}.",
            needs_action=True,
            subject=model.model_type,
        )


def _check_checkpointing_api(ctx: CheckContext) -> None:
    facts, caps = ctx.facts, ctx.caps
    if facts.supports_gradient_checkpointing is False:
        ctx.add(
            "checkpointing-not-supported",
            "the model's supports_gradient_checkpointing is False: transformers and prepare_for_lora refuse to "
            "checkpoint it",
            "Train without checkpointing (`prepare_for_lora(model, use_gradient_checkpointing=False)`), or use a "
            "revision of the model that supports it.",
            needs_action=True,
        )
        return
    if not facts.old_api or caps is None:
        return
    klass = facts.checkpointing_class.name if facts.checkpointing_class else "the model"
    if not caps.new_set_gradient_checkpointing_call:
        ctx.add(
            "old-gc-api-reentrant-only",
            f"transformers {ctx.transformers} takes no checkpointing kwargs, and {klass}'s own checkpointing is "
            "reentrant, always: use_reentrant=False, every_n_layers and offload cannot be asked for",
            f"Fixed by {_PREPARE}: its options are honoured on this release.",
            fixed_by="prepare_for_lora",
        )
    elif not caps.old_format_fallback:
        ctx.add(
            "old-gc-api-enable-typeerror",
            f"gradient_checkpointing_enable() raises TypeError on transformers {ctx.transformers}: "
            f"{klass}._set_gradient_checkpointing() got an unexpected keyword argument 'enable'",
            *_old_api_fix(),
        )
    else:
        ignored = ["gradient_checkpointing_kwargs (use_reentrant=False)"]
        ignored += [name for name, present in (("every_n_layers", caps.every_n_layers), ("offload", caps.offload)) if present]
        ctx.add(
            "old-gc-api-kwargs-ignored",
            f"transformers {ctx.transformers} takes {klass}'s old _set_gradient_checkpointing(module, value) path "
            f"and silently ignores {', '.join(ignored)}: checkpointing is always reentrant",
            *_old_api_fix(),
        )
    if caps.old_format_fallback or not caps.new_set_gradient_checkpointing_call:
        if not caps.enable_adds_input_grads:
            ctx.add(
                "lora-no-input-grads",
                "checkpointing enabled after get_peft_model (or by Trainer) with a frozen base fails: RuntimeError: "
                "element 0 of tensors does not require grad and does not have a grad_fn",
                *_old_api_fix(),
            )


_NO_BLOCKS = ("gradient_checkpointing_kwargs", "every_n_layers", "offload", "memory_budget", "selective")


def _options_not_honoured(ctx: CheckContext) -> tuple:
    """(options of prepare_for_lora it cannot honour for this model here, why), from what the library does."""
    facts, caps, model = ctx.facts, ctx.caps, ctx.model
    names: list = []
    reasons: list = []
    if facts.old_api:
        if facts.decoder_blocks == []:
            names += _NO_BLOCKS
            reasons.append(
                "the model class sets no (or an empty) _no_split_modules, where the library finds the decoder "
                "blocks, so its remote code checkpoints itself, reentrantly and every layer"
            )
        known = ctx.runtime.attention_class_names
        classes = {name for module in model.model_modules for name in module.classes}
        if known is not None and not classes & set(known):
            names.append("fused_attention")
            reasons.append(f"fused_attention knows {', '.join(known)} only")
    else:
        lacking = [
            name
            for name, present in (
                ("gradient_checkpointing_kwargs", caps.checkpointing_kwargs),
                ("every_n_layers", caps.every_n_layers),
                ("offload", caps.offload),
            )
            if not present
        ]
        if lacking:
            reasons.append(f"transformers {ctx.transformers}'s enable method does not take {', '.join(lacking)}")
        if not caps.checkpointing_kwargs:
            lacking.append("selective")
            reasons.append("selective recompute travels in those kwargs")
        names += lacking + ["memory_budget", "fused_attention"]
        reasons.append("memory_budget and fused_attention are for old remote-code models only")
    if "selective" not in names and ctx.runtime.selective_available is False:
        names.append("selective")
        reasons.append(f"selective recompute needs torch >= 2.5 (installed: {ctx.runtime.versions.get('torch')})")
    return names, reasons


def _check_options(ctx: CheckContext) -> None:
    if ctx.caps is None or ctx.facts.supports_gradient_checkpointing is False:
        return
    names, reasons = _options_not_honoured(ctx)
    if names:
        ctx.add(
            "options-not-honoured",
            f"prepare_for_lora cannot honour {', '.join(names)} for this model here: {'; '.join(reasons)}",
            "Nothing to do unless you need them: prepare_for_lora warns (CompatWarning) when asked and does "
            "without them. transformers >= 5.17 takes every_n_layers and offload for native models.",
            subject=", ".join(names),
        )


def _modules_importing(model: ModelFiles, package: str) -> list:
    return [
        (module, item)
        for module in model.code.modules
        for item in module.imports
        if item.package == package and not item.guarded
    ]


def _check_stream_generator(ctx: CheckContext) -> None:
    imports = _modules_importing(ctx.model, STREAM_PACKAGE)
    if not imports:
        return
    status, detail = stream_generator_status()
    if status in ("ok", "unknown"):
        return
    files = sorted({module.path.name for module, _ in imports})
    excused = all(is_qwen_style_module(str(module.path)) for module, _ in imports)
    functions = sorted({f for module, item in imports if item.lazy for f in _enclosing_functions(module, item.line)})
    streaming = ", ".join(f"{f}()" for f in functions) or "the code that imports it"
    if status in ("missing", "broken"):
        if excused:
            ctx.add(
                "import-before-loading",
                f"transformers {ctx.transformers} cannot load this remote code by itself: its import check demands "
                f"{STREAM_PACKAGE} ({', '.join(files)}), and {detail}",
                f"Fixed by {_IMPORT_FIRST}.",
                fixed_by="import",
                subject=STREAM_PACKAGE,
            )
        else:
            fix = (
                f"pip install {STREAM_PACKAGE}"
                if status == "missing"
                else f"{STREAM_PACKAGE} cannot import on transformers >= 4.57: use transformers <= 4.56 with it"
            )
            ctx.add(
                "stream-generator-missing" if status == "missing" else "stream-generator-broken",
                f"loading fails: {', '.join(files)} import{'s' if len(files) == 1 else ''} {STREAM_PACKAGE} at "
                f"module level, and {detail}",
                fix + " (the library only excuses the package where it is imported inside a function, as Qwen does).",
                needs_action=True,
                subject=STREAM_PACKAGE,
            )
    if functions:
        ctx.add(
            "chat-stream-unavailable",
            f"{streaming} cannot stream: {detail}",
            "Use model.chat(...), or stream with model.generate(..., streamer=transformers.TextIteratorStreamer("
            "tokenizer)); with qwen-ckpt-compat imported, chat_stream() raises StreamingUnavailableError saying so.",
            subject=STREAM_PACKAGE,
        )


def _enclosing_functions(module: ModuleFacts, line: int) -> list:
    names = []
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            end = getattr(node, "end_lineno", None) or node.lineno
            if node.lineno <= line <= end:
                names.append(node.name)
    return names[-1:]  # the innermost


def _check_packages(ctx: CheckContext) -> None:
    demanded: dict = {}
    for module in ctx.model.code.modules:
        packages = ctx.runtime.get_imports(module.path)
        if packages is None:
            packages = [i.package for i in module.imports if i.level == 0 and not i.guarded]
        for package in packages:
            if package and package != STREAM_PACKAGE:
                demanded.setdefault(package, module.path.name)
    for package, file in demanded.items():
        try:
            missing = importlib.util.find_spec(package) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            ctx.add(
                "missing-package",
                f"loading fails: {file} imports {package}, which is not installed (transformers checks every "
                "import of the remote code when it loads)",
                f"pip install {_INSTALL_NAMES.get(package, package)}",
                needs_action=True,
                subject=package,
            )


def _check_transformers_imports(ctx: CheckContext) -> None:
    if ctx.caps is None:
        return
    for module in ctx.model.code.modules:
        for item in module.imports:
            if item.level != 0 or item.package != "transformers" or item.guarded:
                continue
            for name in item.names or (None,):
                reason = ctx.runtime.has_name(item.module, name)
                if reason is None:
                    continue
                what = f"{item.module}.{name}" if name else item.module
                where = f"{module.path.name} line {item.line}"
                consequence = (
                    f"calling {', '.join(f'{f}()' for f in _enclosing_functions(module, item.line))} fails"
                    if item.lazy
                    else "loading fails"
                )
                ctx.add(
                    "removed-transformers-import",
                    f"{consequence}: {where} imports {what}, which transformers {ctx.transformers} does not have "
                    f"({reason})",
                    "The remote code needs a transformers release that still has it (or an updated revision of "
                    "the model's code); qwen-ckpt-compat does not replace it.",
                    needs_action=not item.lazy,
                    subject=what,
                )


def _methods_missing(ctx: CheckContext, base: type) -> dict:
    """``{name: (class, line)}``: the ``self.<name>()`` calls of the remote subclasses of ``base`` that neither the
    remote classes nor their installed bases answer."""
    runtime, model = ctx.runtime, ctx.model
    mixin = runtime.generation_mixin
    missing: dict = {}
    for module in model.model_modules:
        for klass in module.classes.values():
            externals = [runtime.external_class(name) for name in model.external_bases(klass)]
            if not any(e is not None and issubclass(e, base) for e in externals) or None in externals:
                continue  # not a class of that kind, or a base the doctor cannot inspect
            remote = model.remote_mro(klass)
            generates = any(k.defines(name) for k in remote for name in _GENERATING_METHODS)
            for name, line in klass.self_calls.items():
                if any(k.defines(name) for k in remote) or any(hasattr(e, name) for e in externals):
                    continue
                if generates and mixin is not None and hasattr(mixin, name):
                    continue  # transformers adds GenerationMixin to generating remote classes when loading them
                missing.setdefault(name, (klass, line))
    return missing


def _check_removed_methods(ctx: CheckContext) -> None:
    runtime, model = ctx.runtime, ctx.model
    base = runtime.pretrained_model
    if base is None or not model.remote:
        return
    try:
        from .._repairs.model_api import REPLACEMENTS
    except Exception:  # noqa: BLE001 - torch broken: already reported
        REPLACEMENTS = {}
    for name, (klass, line) in _methods_missing(ctx, base).items():
        fixed_by = ctx.fixed_by_loading_hook() if name in REPLACEMENTS else None
        how = f"Fixed by {_IMPORT_FIRST}; `patch(model)` also adds it to a model loaded before."
        _report_missing(ctx, base, name, klass, line, fixed_by, how)
    tokenizer_base = runtime.tokenizer_base
    if tokenizer_base is None or model.tokenizer_class is None:
        return
    for name, (klass, line) in _methods_missing(ctx, tokenizer_base).items():
        # the import hook gives every remote tokenizer class the methods it carries
        fixed_by = "import" if name in REMOVED_TOKENIZER_METHODS else None
        how = f"Fixed by {IMPORT_TOKENIZER_FIRST}."
        _report_missing(ctx, tokenizer_base, name, klass, line, fixed_by, how)


def _report_missing(
    ctx: CheckContext, base: type, name: str, klass: Any, line: int, fixed_by: Optional[str], how: str
) -> None:
    ctx.add(
        "removed-api-called",
        f"{klass.name} calls self.{name}() ({klass.module.path.name} line {line}), which transformers "
        f"{ctx.transformers}'s {base.__name__} does not have: AttributeError when that code runs",
        how if fixed_by else "qwen-ckpt-compat does not replace it: use a transformers release that still has it.",
        fixed_by=fixed_by,
        needs_action=fixed_by is None,
        subject=name,
    )


def _check_config_attributes(ctx: CheckContext) -> None:
    defaults = ctx.runtime.config_attributes
    model = ctx.model
    if defaults is None or not model.remote:
        return
    known = set(defaults)
    if model.config_class is not None:
        for klass in model.remote_mro(model.config_class):
            known |= klass.self_assigned | set(klass.attributes) | set(klass.methods)
            if "__init__" in klass.methods:
                known |= {p.lstrip("*") for p in klass.parameters("__init__")}
            attribute_map = class_constant(klass, "attribute_map") if "attribute_map" in klass.attributes else None
            if isinstance(attribute_map, dict):
                known |= set(attribute_map)
    for module in model.model_modules:
        for name, line in module.config_reads.items():
            if name in known or name.startswith("__"):
                continue
            known.add(name)
            # config.json's keys become attributes, except those this release drops (5.x: generation parameters)
            kept = ctx.runtime.config_keeps(name, model.config.get(name, 20))
            if name in model.config and kept is not False:
                continue
            where = f"{module.path.name} line {line} reads config.{name}"
            if _answered_by_the_import(model, name):
                ctx.add(
                    "config-attribute-missing",
                    f"{where}, which transformers {ctx.transformers}'s PretrainedConfig no longer provides (nor keeps "
                    "from config.json): the library's import answers it on this family's configuration class with "
                    "its value before 5.0 (use_cache: config.json's)",
                    f"Fixed by {_IMPORT_FIRST}.",
                    fixed_by="import",
                    subject=name,
                )
                continue
            if kept is False:
                ctx.add(
                    "config-attribute-missing",
                    f"{where}, which transformers {ctx.transformers} does not load from config.json (it drops "
                    f"{name} as a generation parameter) and neither the configuration class nor PretrainedConfig "
                    "provides: AttributeError when that code runs",
                    "Adding it to config.json does not help on this release: use transformers < 5.0, or a revision "
                    "of the model's code that does not read it.",
                    needs_action=True,
                    subject=name,
                )
                continue
            ctx.add(
                "config-attribute-missing",
                f"{where}, which neither config.json, the configuration class nor transformers "
                f"{ctx.transformers}'s PretrainedConfig provides: AttributeError when that code runs",
                f'Add "{name}" to config.json with the value the model expects, or use a transformers release whose '
                "PretrainedConfig still has it.",
                needs_action=True,
                subject=name,
            )


def _answered_by_the_import(model: ModelFiles, name: str) -> bool:
    """A config attribute of ``PretrainedConfig`` before 5.0 that the import hook answers for this family's config."""
    registered = {model_type for family in families() for model_type in family.model_types}
    return model.model_type in registered and name in PRE_5_CONFIG_DEFAULTS


def _auto_enabled_checkpointing(model: ModelFiles) -> Optional[str]:
    """Why the config carries a truthy ``gradient_checkpointing`` on every load, or ``None``."""
    value = model.config.get("gradient_checkpointing")
    if model.config_class is not None:
        for klass in model.remote_mro(model.config_class):
            init = klass.methods.get("__init__")
            if init is None:
                continue
            for node in ast.walk(init):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "gradient_checkpointing" for t in node.targets
                ):
                    if isinstance(node.value, (ast.Tuple, ast.List)) and node.value.elts:
                        return (
                            f"{klass.name}.__init__ stores config.gradient_checkpointing as a "
                            f"{type(node.value).__name__.lower()} (line {node.lineno}), which is always true"
                        )
    if value:
        return f"config.json sets gradient_checkpointing to {json.dumps(value)}"
    return None


def _check_auto_enable(ctx: CheckContext) -> None:
    model, caps, base = ctx.model, ctx.caps, ctx.runtime.pretrained_model
    if model.model_class is None or caps is None or base is None or not ctx.facts.supports_gradient_checkpointing:
        return
    if not hasattr(base, "_backward_compatibility_gradient_checkpointing"):
        return
    calls_post_init = any("post_init" in k.self_calls for k in model.remote_mro(model.model_class))
    why = _auto_enabled_checkpointing(model) if calls_post_init else None
    if why is None:
        return
    if ctx.facts.old_api and caps.new_set_gradient_checkpointing_call and not caps.old_format_fallback:
        ctx.add(
            "load-raises-enable-typeerror",
            f"from_pretrained raises TypeError on transformers {ctx.transformers} without the library: {why}, so "
            "post_init() enables checkpointing while the model is built, through the new call the old "
            "_set_gradient_checkpointing does not take; the import patches the class as it loads, before that call",
            f"Fixed by {_IMPORT_FIRST}; then `prepare_for_lora(model, use_gradient_checkpointing=False)` turns the "
            "checkpointing off if you do not want it.",
            fixed_by="import",
        )
        return
    ctx.add(
        "checkpointing-enabled-on-load",
        f"every from_pretrained turns gradient checkpointing on: {why}, and post_init() enables it",
        f"Fixed by {_PREPARE}; `prepare_for_lora(model, use_gradient_checkpointing=False)` turns it off.",
        fixed_by="prepare_for_lora",
    )


#: Calls and attributes by which an enable method turns checkpointing on (itself, or through the base method).
_ENABLING_CALLS = frozenset({"_set_gradient_checkpointing", "gradient_checkpointing_enable", "apply"})
_ENABLING_ATTRIBUTES = frozenset({"gradient_checkpointing", "_gradient_checkpointing_func"})


def _enables_something(function: ast.FunctionDef) -> bool:
    """Whether an enable method's body can turn checkpointing on: it calls the base's or the old method (or
    ``apply``), or sets a ``gradient_checkpointing`` flag. ChatGLM3's revision 37fe000 only raises or returns."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _ENABLING_CALLS:
                return True
            if name == "setattr" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                if node.args[1].value in _ENABLING_ATTRIBUTES:
                    return True
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr in _ENABLING_ATTRIBUTES:
            return True
    return False


def _check_enable_override(ctx: CheckContext) -> None:
    model, caps = ctx.model, ctx.caps
    if model.model_class is None or caps is None or ctx.facts.supports_gradient_checkpointing is False:
        return
    klass = model.first_defining("gradient_checkpointing_enable", method=True)
    if klass is None or _enables_something(klass.methods["gradient_checkpointing_enable"]):
        return
    where = f"{klass.module.path.name} line {klass.methods['gradient_checkpointing_enable'].lineno}"
    summary = (
        f"{klass.name} overrides gradient_checkpointing_enable ({where}) with code that turns no checkpointing on: "
        "gradient_checkpointing_enable(), peft's prepare_model_for_kbit_training and Trainer(gradient_checkpointing="
        "True) train without recomputing any block, whatever gradient_checkpointing_kwargs say"
    )
    parameters = klass.parameters("gradient_checkpointing_enable")
    takes_all = any(p.startswith("**") for p in parameters)
    lacking = [n for n in ("every_n_layers", "offload") if n not in parameters and not takes_all]
    if caps.activation_checkpointing_api and lacking:
        summary += (
            f"; on transformers {ctx.transformers} Trainer(gradient_checkpointing=True) passes {' and '.join(lacking)}, "
            "which it does not take: TypeError"
        )
    if import_hook_enabled():
        fix, fixed_by = (
            f"Fixed by {_IMPORT_FIRST}: the class is patched as it loads, and every enable call then checkpoints each "
            "block in the mode asked for. For a model loaded before the import: `model = prepare_for_lora(model)`.",
            "import",
        )
    else:
        fix, fixed_by = f"Fixed by {_PREPARE}.", "prepare_for_lora"
    ctx.add(
        "enable-override-enables-nothing",
        summary,
        fix,
        fixed_by=fixed_by,
        subject=f"{klass.name}.gradient_checkpointing_enable",
    )


def _check_import_hook(ctx: CheckContext) -> None:
    if import_hook_enabled():
        return
    if any(p.fixed_by == "import" for p in ctx.problems):
        ctx.add(
            "import-hook-disabled",
            f"{NO_IMPORT_HOOK_ENV} is set, so `import qwen_ckpt_compat` does not install the loading fix that "
            "this model needs on this release",
            f"Unset {NO_IMPORT_HOOK_ENV}, or call qwen_ckpt_compat.enable_remote_code_loading() before "
            "from_pretrained.",
            needs_action=True,
            subject=NO_IMPORT_HOOK_ENV,
        )


def _check_family(ctx: CheckContext) -> None:
    family = family_for_config(ctx.model.config)
    if ctx.caps is None or family is None:
        return
    for fact in family.doctor_facts:
        if fact.applies(ctx.caps):
            ctx.add(
                fact.id, fact.summary, fact.fix, needs_action=fact.needs_action, subject=family.name,
                fixed_by=fact.fixed_by,
            )


_CHECKS = (
    _check_model_type,
    _check_checkpointing_api,
    _check_options,
    _check_stream_generator,
    _check_packages,
    _check_transformers_imports,
    _check_removed_methods,
    _check_config_attributes,
    _check_auto_enable,
    _check_enable_override,
    check_tokenizer,
    _check_family,
    _check_import_hook,  # last: it looks at what the others found
)


def run_checks(model: ModelFiles, facts: ModelFacts, runtime: Runtime) -> list:
    """Every problem of ``model`` on this installation, in the order of :data:`_CHECKS`."""
    context = CheckContext(model=model, facts=facts, runtime=runtime)
    for check in _CHECKS:
        with quiet():
            check(context)
    return context.problems
