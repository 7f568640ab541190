"""Four patterns of 2023 remote code, each in a small model of its own (issue 19, item 4).

``qwen_ckpt_compat.testing.write_pattern_model(path, pattern)`` (docs/facts/old-remote-code.md): a renamed block
in ``_no_split_modules``, a head tied by default only, a ``forward`` that rejects keywords it does not know, and
``rope_scaling: null`` tested with ``is None``. On every row, with the library: eval logits and loss, and the LoRA
gradients of one checkpointed step, equal what transformers 4.55.4 computed (``tests/reference/patterns_reference.pt``,
written by ``tools/make_reference.py --family patterns``; relative difference <= 1e-5), plus what each pattern
needs. The faithful tests at the end pin down what the fixtures do without the library.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import count_calls, fresh_dir, spy_checkpoint
from packaging import version

from qwen_ckpt_compat import CompatWarning, describe, prepare_for_lora, unpatch
from qwen_ckpt_compat.testing import PATTERNS, load_pattern_model, write_pattern_model
from qwen_ckpt_compat.testing._patterns import BLOCK, TARGET_MODULES

REFERENCE = Path(__file__).resolve().parent / "reference" / "patterns_reference.pt"
TOLERANCE = 1e-5
TF = version.parse(version.parse(transformers.__version__).base_version)
V5 = TF >= version.parse("5.0")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _lora_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default.", ".")


@pytest.fixture(scope="module")
def reference():
    loaded = torch.load(REFERENCE, weights_only=True)
    assert loaded["versions"]["transformers"] == "4.55.4"
    return loaded


def _load(tmp_path, pattern: str):
    model = load_pattern_model(fresh_dir(tmp_path, write_pattern_model, pattern, pattern=pattern)).float()
    return model


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_logits_loss_and_lora_grads_equal_the_4_55_reference(tmp_path, pattern, reference):
    from peft import LoraConfig, get_peft_model

    expected, ids = reference[pattern], reference["inputs"]["input_ids"]
    model = _load(tmp_path, pattern).eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert _relative(out.logits, expected["logits"]) <= TOLERANCE
    assert _relative(out.loss, expected["loss"]) <= TOLERANCE

    prepare_for_lora(model)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGET_MODULES), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(expected["lora_init"][_lora_key(name)])
    peft_model.train()
    with count_calls(model, BLOCK) as counts:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert set(counts.values()) == {2}, "every block recomputed"
    grads = {_lora_key(n): p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert grads.keys() == expected["lora_grads"].keys()
    assert _relative(loss.detach(), expected["lora_loss"]) <= TOLERANCE
    assert max(_relative(grads[k], expected["lora_grads"][k]) for k in grads) <= TOLERANCE
    unpatch(model)


@pytest.mark.behaviour("kwargs")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_renamed_block_is_found_from_the_owner_layer_list(tmp_path, monkeypatch, use_reentrant):
    """``_no_split_modules`` names a class the code lacks: the blocks are the owner's layer list, routed as asked."""
    model = _load(tmp_path, "renamed_block").train()
    assert set(model._no_split_modules) == {"PatternDecoderLayer"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatWarning)  # no "names no decoder blocks" fallback
        prepare_for_lora(model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert describe(model).decoder_blocks == (BLOCK,)
    assert model.model.gradient_checkpointing is False, "the remote code's own (reentrant) call stays off"
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with spy_checkpoint(monkeypatch) as calls, count_calls(model, BLOCK) as counts:
        model(input_ids=ids, labels=ids).loss.backward()
    assert set(counts.values()) == {2}
    assert [c.get("use_reentrant") for c in calls] == [use_reentrant] * 2
    unpatch(model)


@pytest.mark.behaviour("loads")
def test_head_tied_by_default_is_tied_on_every_release(tmp_path):
    model = _load(tmp_path, "tied_head")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unpatch(model)


@pytest.mark.behaviour("loads")
def test_a_checkpoint_head_that_differs_is_tied_with_a_warning(tmp_path):
    """The head is in the checkpoint and differs; the config does not say: tied as before 5.0 (a warning on 5.x,
    where transformers no longer tied it)."""
    path = fresh_dir(tmp_path, write_pattern_model, "tied_head_with_head", pattern="plain")
    config = path / "config.json"
    config.write_text(config.read_text().replace('"tie_word_embeddings": false,', ""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pattern_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ours = [w for w in caught if issubclass(w.category, CompatWarning) and "tie_word_embeddings" in str(w.message)]
    assert bool(ours) is V5, "warned where the library tied it (before 5.0 transformers tied it itself)"
    unpatch(model)


@pytest.mark.behaviour("trainer")
def test_trainer_does_not_hand_loss_kwargs_to_a_strict_forward(tmp_path):
    from test_trainer import _training_arguments

    model = _load(tmp_path, "strict_forward").train()
    assert type(model).accepts_loss_kwargs is False
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(prepare_for_lora(model), LoraConfig(r=4, target_modules=list(TARGET_MODULES)))
    ids = torch.randint(3, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(4)]
    with count_calls(model, BLOCK) as counts:
        transformers.Trainer(model=peft_model, args=_training_arguments(tmp_path / "out"), train_dataset=rows).train()
    assert set(counts.values()) == {4}
    unpatch(model)


@pytest.mark.behaviour("loads")
def test_rope_scaling_null_stays_none(tmp_path):
    model = _load(tmp_path, "rope_scaling_null")
    assert model.config.rope_scaling is None
    assert model.config.to_dict()["rope_scaling"] is None
    unpatch(model)


# ------------------------------------------------------------------------------ faithful: without the library


@pytest.mark.usefixtures("transformers_own_loader")
def test_faithful_rope_scaling_null_fails_on_5x(tmp_path):
    path = fresh_dir(tmp_path, write_pattern_model, "faithful_rope", pattern="rope_scaling_null")
    if not V5:
        assert load_pattern_model(path).config.rope_scaling is None
        return
    with pytest.raises(KeyError, match="type"):
        load_pattern_model(path)


@pytest.mark.usefixtures("transformers_own_loader")
def test_faithful_tied_head_is_random_on_5x(tmp_path):
    model = load_pattern_model(fresh_dir(tmp_path, write_pattern_model, "faithful_tied", pattern="tied_head"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is not V5


@pytest.mark.usefixtures("transformers_own_loader")
def test_faithful_strict_forward_rejects_loss_kwargs(tmp_path):
    model = load_pattern_model(fresh_dir(tmp_path, write_pattern_model, "faithful_strict", pattern="strict_forward"))
    assert "accepts_loss_kwargs" not in vars(type(model))
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="Got unexpected arguments"):
        model(input_ids=ids, labels=ids, num_items_in_batch=4)
