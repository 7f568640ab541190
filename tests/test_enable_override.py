"""Remote code whose own enable method enables nothing is checkpointed all the same, on every path (issue 19, item 2).

ChatGLM3-6B's revision 37fe000 gives ``ChatGLMPreTrainedModel`` a ``gradient_checkpointing_enable(self,
gradient_checkpointing_kwargs=None)`` of its own that only refuses a model without checkpointing support, and
hard-codes ``use_reentrant=False`` in ``GLMTransformer``'s checkpoint call: through ``Trainer`` or a plain enable
call it trained with no checkpointing at all (docs/facts/chatglm.md#revision-37fe000). Two variants: the fixture
``chatglm_37fe000`` (the override beside the old ``_set_gradient_checkpointing``) and the same file without that old
method (the override alone, new-API otherwise). On each path every block is recomputed and the ``use_reentrant``
asked for is what reaches torch: ``use_reentrant=True`` arriving proves the remote code's own (hard-coded
non-reentrant) branch stayed off.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    count_calls,
    family_batch,
    family_lora,
    fresh_dir,
    load_family,
    spy_checkpoint,
    step_grads,
)

from qwen_ckpt_compat import describe, prepare_for_lora, unpatch
from qwen_ckpt_compat.testing import TINY_FAMILIES

OLD_METHOD = (
    "    def _set_gradient_checkpointing(self, module, value=False):\n"
    "        if isinstance(module, GLMTransformer):\n"
    "            module.gradient_checkpointing = value\n"
)
VARIANTS = ("with_old_method", "override_alone")


def _write(tmp_path, variant: str):
    family = TINY_FAMILIES["chatglm_37fe000"]
    path = fresh_dir(tmp_path, family.write, f"glm37_{variant}")
    if variant == "override_alone":
        modeling = path / "modeling_chatglm.py"
        text = modeling.read_text()
        assert text.count(OLD_METHOD) == 1
        modeling.write_text(text.replace(OLD_METHOD, ""))
    return family, path


@pytest.fixture(params=VARIANTS)
def glm(request, tmp_path):
    family, path = _write(tmp_path, request.param)
    model = load_family(family, path)
    yield family, model, family_batch(family)
    unpatch(model)


def _enable(model, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)


def _owner(model):
    return next(m for m in model.modules() if type(m).__name__ == "GLMTransformer")


def _checkpointed_step(model, family, batch, monkeypatch, peft_model=None):
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        grads = step_grads(peft_model if peft_model is not None else model, batch)
    return calls, counts, grads


@pytest.mark.behaviour("enables")
@pytest.mark.parametrize("use_reentrant", [True, None])
def test_a_plain_enable_call_checkpoints_every_block_as_asked(glm, monkeypatch, use_reentrant):
    """The import alone: the model's own enable method, called as users and peft call it (``True`` reaching torch
    proves the remote code's own, hard-coded non-reentrant branch stayed off; ``None``: the library default)."""
    family, model, batch = glm
    kwargs = {} if use_reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    _enable(model, **kwargs)
    assert _owner(model).gradient_checkpointing is False, "the remote code's own checkpoint branch stays off"
    peft_model = family_lora(model, family)
    calls, counts, grads = _checkpointed_step(model, family, batch, monkeypatch, peft_model)
    expected = False if use_reentrant is None else use_reentrant  # the library default: non-reentrant
    assert set(counts.values()) == {2}, "every block once forward, once more in the backward pass"
    assert calls and [c.get("use_reentrant") for c in calls] == [expected] * len(calls)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.behaviour("kwargs")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_prepare_for_lora_honours_the_mode(tmp_path, monkeypatch, use_reentrant):
    """The override alone (the fixture with the old method runs tests/test_families.py's own tests)."""
    family, path = _write(tmp_path, "override_alone")
    model, batch = load_family(family, path), family_batch(family)
    peft_model = family_lora(prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}), family)
    calls, counts, grads = _checkpointed_step(model, family, batch, monkeypatch, peft_model)
    assert set(counts.values()) == {2}
    assert calls and {c.get("use_reentrant") for c in calls} == {use_reentrant}
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert describe(model).decoder_blocks == ("GLMBlock",)
    unpatch(model)


@pytest.mark.behaviour("trainer")
def test_trainer_alone_checkpoints_every_block(glm, tmp_path, monkeypatch):
    """``Trainer(gradient_checkpointing=True)`` with no call of the library (on 5.23+ it hands the override
    ``every_n_layers`` and ``offload``, which the override cannot take: a TypeError without the library)."""
    from test_trainer import _training_arguments

    family, model, batch = glm
    peft_model = family_lora(model, family)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    requested = {"use_reentrant": True} if HAS_CHECKPOINTING_KWARGS else None
    arguments = _training_arguments(tmp_path / "out", checkpointing_kwargs=requested)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, family.block) as counts:
        transformers.Trainer(model=peft_model, args=arguments, train_dataset=rows).train()
    assert set(counts.values()) == {4}, "2 steps, each block forward and recomputed in the backward pass"
    # Before 4.35 Trainer passes no kwargs: the library default (non-reentrant) applies.
    assert calls and {c.get("use_reentrant") for c in calls} == {bool(requested)}
    assert all(not torch.equal(p.detach(), before[n]) for n, p in peft_model.named_parameters() if n in before)


@pytest.mark.behaviour("enables")
def test_disable_turns_the_routed_blocks_off(glm, monkeypatch):
    family, model, batch = glm
    _enable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    calls, counts, _ = _checkpointed_step(model, family, batch, monkeypatch)
    assert set(counts.values()) == {1} and not calls


def test_every_n_layers_reaches_the_blocks_through_the_override(tmp_path, monkeypatch):
    """5.23+'s ``activation_checkpointing_enable(every_n_layers=2)`` calls the override, which cannot take it."""
    family = TINY_FAMILIES["chatglm_37fe000"]
    path = fresh_dir(tmp_path, family.write, "glm37_every_n", num_layers=4)
    model = load_family(family, path)
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip(f"transformers {transformers.__version__} has no activation_checkpointing_enable")
    model.activation_checkpointing_enable(every_n_layers=2)
    _, counts, _ = _checkpointed_step(model, family, family_batch(family), monkeypatch, family_lora(model, family))
    assert [counts[i] for i in range(4)] == [2, 1, 2, 1]
    unpatch(model)
