"""prepare_for_lora: both orders with peft, idempotence, config, native delegation, bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    batch,
    blocks,
    checkpointing_on,
    count_block_calls,
    enable,
    lora,
    reentrant_in_effect,
    step_grads,
)

from qwen_ckpt_compat import (
    CheckpointingNotSupportedError,
    UnsupportedModelError,
    describe,
    is_patched,
    prepare_for_lora,
)


def _input_hooks(model) -> int:
    embeddings = model.get_input_embeddings()
    return len(embeddings._forward_hooks)


@pytest.mark.behaviour("lora_grads")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_prepare_then_peft_trains_lora(qwen, use_reentrant):
    model = prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model is qwen
    peft_model = lora(model)
    grads = step_grads(peft_model)
    assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.behaviour("lora_grads")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_peft_then_prepare_trains_lora(qwen, use_reentrant):
    peft_model = lora(qwen)
    assert prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}) is peft_model
    assert is_patched(peft_model)
    grads = step_grads(peft_model)
    assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.behaviour("lora_grads")
def test_peft_then_enable_after_patch_alone(qwen):
    """The failing order of the tutorials: checkpointing enabled after get_peft_model, asking for reentrant."""
    from qwen_ckpt_compat import patch

    peft_model = lora(qwen)
    patch(peft_model)
    if HAS_CHECKPOINTING_KWARGS:
        enable(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
        assert reentrant_in_effect(peft_model) is True
    else:
        enable(peft_model)
    grads = step_grads(peft_model)
    assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())


def test_calling_it_again_is_harmless(qwen):
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert _input_hooks(qwen) == 1
    block_call = inspect.getattr_static(type(blocks(qwen)[0]), "__call__")
    set_gc = inspect.getattr_static(qwen, "_set_gradient_checkpointing")
    peft_model = lora(qwen)  # peft adds transformers' input hook here, and ours goes at the next prepare
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert _input_hooks(qwen) == 1, "one hook on the input embeddings: peft's, or ours, not both"
    assert inspect.getattr_static(type(blocks(qwen)[0]), "__call__") is block_call
    assert inspect.getattr_static(qwen, "_set_gradient_checkpointing") is set_gc
    with count_block_calls(qwen) as counts:
        grads = step_grads(peft_model)
    assert set(counts.values()) == {2}, "blocks are checkpointed once, not twice"
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_non_reentrant_adds_no_input_hook_and_switching_removes_ours(qwen):
    before = _input_hooks(qwen)
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert _input_hooks(qwen) == before + 1
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert _input_hooks(qwen) == before


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prepared_trained_saved_model_keeps_its_use_cache(tmp_path, use_cache):
    """Once, the saved config said `use_cache: false`, and the reloaded model generated without cache.

    Training checkpointed runs without the cache all the same (the block owner turns it off, see
    test_checkpointing.py); the config keeps what the user had.
    """
    from helpers import fresh_dir, load_qwen

    from qwen_ckpt_compat import unpatch
    from qwen_ckpt_compat.testing import write_tiny_qwen

    model = load_qwen(fresh_dir(tmp_path, write_tiny_qwen, "model", use_cache=use_cache))
    peft_model = lora(prepare_for_lora(model))
    assert peft_model.config.use_cache is use_cache
    with count_block_calls(model) as counts:
        step_grads(peft_model)
    assert set(counts.values()) == {2}, "trained checkpointed"
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "saved")
    unpatch(model)
    reloaded = load_qwen(tmp_path / "saved")
    try:
        assert reloaded.config.use_cache is use_cache
        lengths: list = []  # the tokens each forward runs on
        reloaded.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append(kwargs.get("input_ids", args[0] if args else None).shape[-1]),
            with_kwargs=True,
        )
        reloaded.eval()
        prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
        if use_cache:  # each new token runs alone (whether `False` is honoured by generate depends on the release)
            assert lengths == [6, 1, 1, 1], lengths
    finally:
        unpatch(reloaded)


def test_without_checkpointing_it_only_prepares(qwen):
    prepare_for_lora(qwen, use_gradient_checkpointing=False)
    assert is_patched(qwen)
    assert not checkpointing_on(qwen)
    with count_block_calls(qwen) as counts:
        step_grads(qwen)
    assert set(counts.values()) == {1}


def test_describe_names_the_remote_model(qwen):
    info = describe(lora(qwen))
    assert info.is_remote_code and info.module.startswith("transformers_modules.")
    assert info.is_peft_model and info.family == "qwen"
    assert info.old_checkpointing_api and info.checkpointing_class == "QWenPreTrainedModel"
    assert info.decoder_blocks == ("QWenBlock",) and info.num_decoder_blocks == 2


# ---------------------------------------------------------------------------------------- native models


@pytest.mark.behaviour("lora_grads")
def test_a_removed_input_grads_hook_is_not_taken_for_a_live_one(qwen):
    """4.x's disable_input_require_grads() removes transformers' hook but leaves the attribute that names it."""
    peft_model = lora(qwen)
    qwen.enable_input_require_grads()
    qwen.disable_input_require_grads()
    prepare_for_lora(peft_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    grads = step_grads(peft_model)
    assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())


def test_native_models_get_input_grads_after_a_removed_hook(native_model_factory):
    """The same for native models: reentrant checkpointing of a frozen base needs a live input hook. (On 5.x the
    enable method adds the hook itself, so only the 4.x rows of the matrix can catch a regression here.)"""
    model = native_model_factory()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)  # something to train above the checkpointed blocks, and below: the first block
    first = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    first.mlp.down_proj.weight.requires_grad_(True)
    model.enable_input_require_grads()
    model.disable_input_require_grads()
    prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    grads = _grads_of(model, batch())
    assert first.mlp.down_proj.weight.grad is not None and first.mlp.down_proj.weight.grad.abs().sum() > 0, grads.keys()


def _grads_of(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_native_models_get_exactly_transformers_behaviour(native_model_factory, use_reentrant):
    inputs = batch()
    ours, theirs = native_model_factory(), native_model_factory()
    kwargs = {"use_reentrant": use_reentrant}
    prepare_for_lora(ours, gradient_checkpointing_kwargs=kwargs)
    if HAS_CHECKPOINTING_KWARGS:
        enable(theirs, gradient_checkpointing_kwargs=kwargs)
    else:
        enable(theirs)
    if use_reentrant and getattr(theirs, "_require_grads_hook", None) is None:
        theirs.enable_input_require_grads()
    assert not is_patched(ours) and not describe(ours).old_checkpointing_api
    assert checkpointing_on(ours) and checkpointing_on(theirs)
    assert ours.config.use_cache is theirs.config.use_cache is True, "the user's use_cache is theirs to keep"
    grads_ours, grads_theirs = _grads_of(ours, inputs), _grads_of(theirs, inputs)
    assert grads_ours.keys() == grads_theirs.keys()
    for name in grads_ours:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=0, atol=0)
    assert [type(m).__dict__.get("__call__") for m in ours.modules()] == [
        type(m).__dict__.get("__call__") for m in theirs.modules()
    ]


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, shown",
    [(None, "None"), ("Qwen/Qwen-7B-Chat", "str"), (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear")],
)
def test_bad_models_get_a_type_error_naming_them(bad, shown):
    with pytest.raises(UnsupportedModelError, match=shown) as info:
        prepare_for_lora(bad)
    assert isinstance(info.value, TypeError)


def _library_state(model) -> tuple:
    """What prepare_for_lora may change: the class patch, the library's attributes, hooks, use_cache."""
    attributes = sorted((name, a) for name, m in model.named_modules() for a in vars(m) if a.startswith("_qcc"))
    return is_patched(model), attributes, _input_hooks(model), checkpointing_on(model), model.config.use_cache


def test_a_model_that_cannot_checkpoint_gets_a_value_error(qwen):
    qwen.supports_gradient_checkpointing = False
    before = _library_state(qwen)
    with pytest.raises(CheckpointingNotSupportedError, match="QWenLMHeadModel.*does not support") as info:
        prepare_for_lora(qwen)
    assert isinstance(info.value, ValueError)
    assert _library_state(qwen) == before, "nothing half-prepared"
    prepare_for_lora(qwen, use_gradient_checkpointing=False)
    assert is_patched(qwen) and not checkpointing_on(qwen)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"gradient_checkpointing_kwargs": "use_reentrant=False"}, TypeError),
        ({"gradient_checkpointing_kwargs": [("use_reentrant", False)]}, TypeError),
        ({"every_n_layers": 0}, ValueError),
        ({"every_n_layers": 1.5}, ValueError),
        ({"offload": "yes"}, TypeError),
    ],
)
def test_bad_options_are_rejected_before_anything_changes(qwen, options, error):
    before = _library_state(qwen)
    with pytest.raises(error):
        prepare_for_lora(qwen, **options)
    assert _library_state(qwen) == before
    assert qwen.config.use_cache is True
