"""ChatGLM2/3, Baichuan2, InternLM v1 and Qwen-VL behave on every release, 5.x included, as on 4.55.4.

``tests/reference/<family>_reference.pt`` were written under 4.55.4 by ``tools/make_reference.py --family all``
(forward and generate with transformers alone). On every row, with the library imported: eval logits and loss,
the LoRA gradients of one checkpointed step (relative difference <= 1e-5) and greedy ``generate`` ids (equal).
That is where the 5.x repairs are proven: ChatGLM's config attributes and ``post_init``, InternLM's rotary
tables, and the generic ones (legacy caches, position ids, weights left loaded).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from helpers import count_calls, family_of_fixture, fresh_dir, load_family

from qwen_ckpt_compat import prepare_for_lora, unpatch

REFERENCES = Path(__file__).resolve().parent / "reference"
TOLERANCE = 1e-5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _lora_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default.", ".")


@pytest.fixture(params=FAMILIES)
def setup(request, tmp_path, monkeypatch):
    """(family, model directory, reference) with the working directory holding Qwen-VL's reference image."""
    family = family_of_fixture(request.param)
    reference = torch.load(REFERENCES / f"{family.name}_reference.pt", weights_only=True)
    assert reference["family"] == family.name and reference["versions"]["transformers"] == "4.55.4"
    if "image" in reference["inputs"]:
        # The reference tool turns the import hook off for its own process when imported: not for this one's
        # later subprocesses (the examples). setenv first, so that the context puts back the variable's absence.
        with monkeypatch.context() as environment:
            environment.setenv("QWEN_CKPT_COMPAT_NO_IMPORT_HOOK", os.environ.get("QWEN_CKPT_COMPAT_NO_IMPORT_HOOK", ""))
            environment.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
            from make_reference import write_image
        write_image(reference["inputs"]["image"], tmp_path)
        monkeypatch.chdir(tmp_path)  # the ids spell the image's relative path
    return family, fresh_dir(tmp_path, family.write), reference


@pytest.mark.behaviour("loads")
def test_logits_loss_and_greedy_generate_equal_the_4_55_reference(setup):
    family, path, reference = setup
    model = load_family(family, path).eval()
    ids = reference["inputs"]["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert _relative(out.logits, reference["logits"]) <= TOLERANCE
    assert _relative(out.loss, reference["loss"]) <= TOLERANCE
    prompt = reference["inputs"]["prompt"][:1]
    options = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(model.generate(prompt, attention_mask=torch.ones_like(prompt), **options), reference["generate_one_with_mask"])
    assert torch.equal(model.generate(prompt, **options), reference["generate_one_without_mask"])
    unpatch(model)


@pytest.mark.behaviour("grads_equal")
def test_lora_grads_with_checkpointing_equal_the_4_55_reference(setup):
    from peft import LoraConfig, get_peft_model

    family, path, reference = setup
    model = load_family(family, path)
    prepare_for_lora(model)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(family.target_modules), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    initial = reference["inputs"]["lora_init"]
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(initial[_lora_key(name)])
    ids = reference["inputs"]["input_ids"]
    peft_model.train()
    with count_calls(model, family.block) as counts:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert set(counts.values()) == {2}
    grads = {_lora_key(n): p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert grads.keys() == reference["lora_grads"].keys()
    assert _relative(loss.detach(), reference["lora_loss"]) <= TOLERANCE
    worst = max(_relative(grads[k], reference["lora_grads"][k]) for k in grads)
    assert worst <= TOLERANCE, f"{family.name}: LoRA gradients differ from 4.55.4's by {worst:.2e}"
    unpatch(model)
