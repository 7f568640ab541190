"""Copies of a model (``copy.deepcopy``, ``pickle``) and ``torch.compile``: nothing silently wrong.

Reference models (DPO), EMA copies and TRL deep-copy the model; a copy must train and checkpoint like the original
and share no state with it. Under ``torch.compile`` the blocks must still be recomputed, not silently kept.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import (
    TARGET_MODULES,
    batch,
    checkpointing_on,
    count_block_calls,
    disable,
    has_our_input_grads_hook,
    load_qwen,
    max_relative_difference,
    step_grads,
)
from packaging.version import Version

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat._model_state import state_of
from qwen_ckpt_compat._patches import PatchRegistry

COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda model: pickle.loads(pickle.dumps(model))}


def causal_lora(model):
    """LoRA for causal LM: peft then keeps the model's bound ``prepare_inputs_for_generation`` (wrapped on 5.24+)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _skip_if_transformers_subclassed(model) -> None:
    """transformers 4.45-4.5x give a remote model a subclass of the same name, which no pickle can find."""
    cls = type(model)
    import sys

    if getattr(sys.modules[cls.__module__], cls.__qualname__, None) is not cls:
        pytest.skip(f"transformers' auto class made {cls.__qualname__} a subclass pickle cannot find (not the library's)")


# --------------------------------------------------------------------------------- the registry's wrappers


class Greeter:
    """A class of this module (pickle finds it) whose method the registry wraps."""

    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self) -> str:
        return f"hello {self.name}"


def _loud(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs).upper()


@pytest.fixture
def wrapped_greeter():
    registry = PatchRegistry()
    registry.wrap(Greeter, "greet", _loud, group="test", what="loud")
    yield
    registry.undo("test")


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_wrapped_bound_method_copies_like_a_plain_one(wrapped_greeter, how):
    """A bound wrapped method is re-bound to the copy of its instance, as a plain bound method is."""
    original = Greeter("ada")
    holder = {"owner": original, "greet": original.greet}
    twin = COPIES[how](holder)
    twin["owner"].name = "bob"
    assert twin["greet"]() == "HELLO BOB"
    assert original.greet() == "HELLO ADA"
    assert copy.copy(original.greet)() == "HELLO ADA"


# --------------------------------------------------------------------------------------------- copies


@pytest.mark.behaviour("grads_equal")
@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("prepared", ["not", "before_peft", "after_peft"])
def test_a_copy_trains_and_checkpoints_like_the_original(qwen, how, prepared):
    if how == "pickle":
        _skip_if_transformers_subclassed(qwen)
    model = prepare_for_lora(qwen) if prepared == "before_peft" else qwen
    peft_model = causal_lora(model)
    if prepared == "after_peft":
        prepare_for_lora(peft_model)

    twin = COPIES[how](peft_model)

    twin_model = twin.base_model.model
    assert twin_model is not qwen
    assert twin.base_model_prepare_inputs_for_generation.__self__ is twin_model
    runs = 1 if prepared == "not" else 2  # a checkpointed block runs again in the backward pass
    with count_block_calls(twin) as twin_runs, count_block_calls(peft_model) as original_runs:
        twin_grads = step_grads(twin)
    assert dict(twin_runs) == {0: runs, 1: runs} and not original_runs
    assert len(twin_grads) == 20 and all(g.abs().sum() > 0 for g in twin_grads.values())
    assert max_relative_difference(twin_grads, step_grads(peft_model)) <= 1e-6


@pytest.mark.behaviour("lora_grads")
@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_of_a_reentrant_model_has_its_own_input_grads_hook(qwen, how):
    if how == "pickle":
        _skip_if_transformers_subclassed(qwen)
    peft_model = causal_lora(qwen)
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert has_our_input_grads_hook(qwen)

    twin = COPIES[how](peft_model)

    twin_model = twin.base_model.model
    assert has_our_input_grads_hook(twin_model)
    handle = state_of(twin_model).input_grads_hook
    assert handle.hooks_dict_ref() is twin_model.get_input_embeddings()._forward_hooks
    twin_grads = step_grads(twin)
    assert len(twin_grads) == 20 and all(g.abs().sum() > 0 for g in twin_grads.values())
    assert max_relative_difference(twin_grads, step_grads(peft_model)) <= 1e-6

    disable(twin_model)  # turning checkpointing off on the copy leaves the original as it was
    assert not checkpointing_on(twin_model) and not has_our_input_grads_hook(twin_model)
    assert not twin_model.get_input_embeddings()._forward_hooks
    assert checkpointing_on(qwen) and has_our_input_grads_hook(qwen)
    assert len(qwen.get_input_embeddings()._forward_hooks) == 1
    with count_block_calls(peft_model) as runs:
        grads = step_grads(peft_model)
    assert dict(runs) == {0: 2, 1: 2} and len(grads) == 20


def test_a_copy_has_its_own_settings_and_state(qwen):
    model = prepare_for_lora(qwen, selective=False)
    twin = copy.deepcopy(model)
    assert state_of(twin) is not state_of(qwen)
    settings, twin_settings = state_of(qwen).settings, state_of(twin).settings
    assert twin_settings is not settings and twin_settings.kwargs == settings.kwargs == {"use_reentrant": False}
    assert twin.transformer.h[0]._gradient_checkpointing_func is twin_settings.function
    block, twin_block = qwen.transformer.h[0], twin.transformer.h[0]
    assert state_of(twin_block) is not state_of(block)
    state_of(twin_block).warn_once("only the copy")
    assert "only the copy" not in state_of(block).warned


# -------------------------------------------------------------------------------------- torch.compile


def _compile_works() -> bool:
    dynamo = getattr(torch, "_dynamo", None)
    return hasattr(torch, "compile") and dynamo is not None and dynamo.is_dynamo_supported()


def saved_bytes(model, inputs: dict) -> tuple:
    """Bytes autograd saves for the backward pass during one forward (the second: the first compiles), and grads."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.untyped_storage().nbytes()
        return tensor

    for _ in range(2):
        total[0] = 0
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs).loss
        loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return total[0], grads


CHECKPOINT_OPERATOR = "tag_activation_checkpoint"  # what dynamo makes of torch.utils.checkpoint in its graph
# torch 2.5.1's dynamo inlines a checkpoint without its recompute while saved-tensor hooks are active (the byte
# measure below uses them), although the same model compiled in training keeps it (seen on the 4.48.3 era row,
# 2026-12-03); torch 2.1.1 and 2.13 keep it under the measure too. Where it is undone, the graph is checked instead.
SAVED_TENSOR_HOOKS_UNDO_COMPILED_CHECKPOINTS = (2, 5) <= Version(torch.__version__).release[:2] < (2, 6)


def lookup_backend(name: str):
    from torch._dynamo.backends.registry import lookup_backend as lookup

    return lookup(name)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no cache limit reached across tests, nothing compiled for another model
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(not _compile_works(), reason="torch.compile does not run on this Python/torch")
@pytest.mark.skipif(
    Version(torch.__version__).release[:2] < (2, 2),
    reason="torch 2.1: these compilations pass (checked on 2.1.1), but the interpreter then crashes in torch's garbage "
    "collection at exit (segfault, 2026-12-03), which fails the whole test session",
)
@pytest.mark.heavy  # compiling takes seconds; torch decides what it traces (each era row has its own)
@pytest.mark.behaviour("engines")
@pytest.mark.parametrize("order", ["prepare_then_compile", "compile_then_prepare"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_really_recomputes(tiny_qwen_dir, fresh_dynamo, backend, order):
    """Compiled, a prepared model saves far less than without checkpointing (the blocks are recomputed)."""
    inputs = batch(length=64)
    graphs: list = []

    def recorded(gm, example_inputs):  # the backend asked for, with each graph it compiles kept as text
        graphs.append(str(gm.graph))
        return lookup_backend(backend)(gm, example_inputs)

    def build(checkpointed: bool, compiled: bool):
        peft_model = causal_lora(load_qwen(tiny_qwen_dir))
        if checkpointed and (order == "prepare_then_compile" or not compiled):
            prepare_for_lora(peft_model)
        model = torch.compile(peft_model, backend=recorded) if compiled else peft_model
        if checkpointed and compiled and order == "compile_then_prepare":
            assert prepare_for_lora(model) is model
        return model

    plain, plain_grads = saved_bytes(build(False, compiled=False), inputs)
    eager, _ = saved_bytes(build(True, compiled=False), inputs)
    compiled_plain, _ = saved_bytes(build(False, compiled=True), inputs)
    assert not any(CHECKPOINT_OPERATOR in graph for graph in graphs)
    del graphs[:]
    model = build(True, compiled=True)
    model(**inputs).loss.backward()  # compiled as in training, without the saved-tensor hooks of the measure
    compiled_checkpointed, grads = saved_bytes(model, inputs)

    assert eager < 0.5 * plain  # the library's checkpointing, uncompiled
    if SAVED_TENSOR_HOOKS_UNDO_COMPILED_CHECKPOINTS:  # the measure cannot tell: each block's checkpoint is in a graph
        assert sum(graph.count(CHECKPOINT_OPERATOR) for graph in graphs) >= 2, graphs
    else:  # (torch 2.1's dynamo breaks the graph around the blocks, which then checkpoint uncompiled)
        assert compiled_checkpointed < 0.6 * compiled_plain, (compiled_checkpointed, compiled_plain)
    assert max_relative_difference(grads, plain_grads) <= 1e-5
    assert len(grads) == 20
