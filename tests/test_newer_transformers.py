"""Qwen v1 remote code loads, trains, saves and generates on every release (4.57 and 5.x too) as on 4.55.4.

* Equivalence with ``tests/reference/qwen_v1_reference.pt``, written once under transformers 4.55.4 by
  ``tools/make_reference.py``: logits, loss and LoRA gradients (relative difference <= 1e-5) and greedy
  ``generate`` ids (identical).
* Loading whether ``transformers_stream_generator`` is absent, installed but broken, or working (what this
  environment has, and the other two simulated), without hiding anything else and without touching the model
  directory or the Hugging Face cache; ``chat_stream()``; switching the import hook off.
* ``save_pretrained`` / reload, peft adapter save / load, ``merge_and_unload``, ``chat``, head masks.
* transformers 5.23+: ``activation_checkpointing_enable``, ``TrainingArguments(activation_checkpointing=...)``
  and the deprecated ``gradient_checkpointing_enable`` all reach the routed checkpointing; no instance-level
  override of an enable method is ever left behind.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import (
    HAS_CHECKPOINTING_KWARGS,
    TARGET_MODULES,
    TRANSFORMERS,
    blocks,
    count_block_calls,
    load_qwen,
)

from qwen_ckpt_compat import (
    StreamingUnavailableError,
    checkpoint_settings,
    disable_remote_code_loading,
    enable_remote_code_loading,
    patch,
    prepare_for_lora,
    unpatch,
)
from qwen_ckpt_compat._repairs import streaming
from qwen_ckpt_compat.testing import load_tiny_qwen, write_tiny_qwen

REFERENCE = Path(__file__).resolve().parent / "reference" / "qwen_v1_reference.pt"
TOLERANCE = 1e-5
STREAM_PACKAGE = "transformers_stream_generator"
ENABLE_NAMES = (
    "gradient_checkpointing_enable",
    "activation_checkpointing_enable",
    "gradient_checkpointing_disable",
    "activation_checkpointing_disable",
    "_set_gradient_checkpointing",
)
HAS_ACTIVATION_API = hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
needs_activation_api = pytest.mark.skipif(
    not HAS_ACTIVATION_API,
    reason=f"transformers {TRANSFORMERS} has no activation_checkpointing_enable (5.23+)",
)


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def plain(tiny_qwen_dir):
    """One loaded model for the tests that only run it (eval mode, never patched or trained)."""
    return load_qwen(tiny_qwen_dir).eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _lora_key(name: str) -> str:
    """As in tools/make_reference.py: no peft wrapper prefix, no adapter name."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def _lora_from_reference(model, reference: dict):
    """The reference's LoRA adapter (r=4, c_attn/c_proj/w1/w2, dropout 0), with its initial tensors."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES, init_lora_weights=False
    )
    model = get_peft_model(model, config)
    initial = reference["inputs"]["lora_init"]
    loaded = set()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(initial[_lora_key(name)])
                loaded.add(_lora_key(name))
    assert loaded == set(initial) and len(loaded) == 20
    return model


def _lora_step(model, input_ids: torch.Tensor) -> tuple:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {_lora_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _eval_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def _greedy(model, prompt: torch.Tensor, with_mask: bool = True) -> torch.Tensor:
    model.eval()
    mask = {"attention_mask": torch.ones_like(prompt)} if with_mask else {}
    return model.generate(prompt, max_new_tokens=8, do_sample=False, **mask)


def _stream_case() -> str:
    """What this environment's transformers_stream_generator does when imported: absent, broken or working."""
    problem = streaming.stream_generator_problem()
    if problem is None:
        return "working"
    return "absent" if "not installed" in problem else "broken"


STREAM_CASE = _stream_case()  # what this environment has, before any test simulates anything


def _fresh_dir(tmp_path: Path, name: str = "model", **kwargs) -> Path:
    """A folder name of its own, hence its own `transformers_modules.*` modules and classes (nothing patched).

    transformers names the dynamic module after the folder's name (plus, from 5.x on, a hash of the code) and
    reuses a model class registered for an identical config class: tests sharing a name would share both.
    """
    return write_tiny_qwen(tmp_path / re.sub(r"\W", "_", f"{tmp_path.name}_{name}"), **kwargs)


def _hashes(root: Path) -> dict:
    if not root.exists():
        return {}
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


# ------------------------------------------------------------------------- equivalence with 4.55.4


def test_reference_comes_from_4_55_4(reference):
    assert reference["versions"]["transformers"] == "4.55.4"
    assert reference["inputs"]["input_ids"].shape == (2, 10)


@pytest.mark.behaviour("loads")
def test_logits_and_loss_equal_the_4_55_reference(plain, reference):
    ids = reference["inputs"]["input_ids"]
    with torch.no_grad():
        out = plain(input_ids=ids, labels=ids)
    assert _relative(out.logits, reference["logits"]) <= TOLERANCE
    assert _relative(out.loss, reference["loss"]) <= TOLERANCE


@pytest.mark.behaviour("loads")
def test_head_mask_logits_equal_the_4_55_reference(plain, reference):
    """A real 2-D head mask (0, 0.5 and 1 entries) goes through get_head_mask as transformers 4.55.4's did."""
    ids = reference["inputs"]["input_ids"]
    with torch.no_grad():
        out = plain(input_ids=ids, labels=ids, head_mask=reference["inputs"]["head_mask"])
    assert _relative(out.logits, reference["head_mask_logits"]) <= TOLERANCE
    assert _relative(out.loss, reference["head_mask_loss"]) <= TOLERANCE


@pytest.mark.behaviour("grads_equal")
@pytest.mark.parametrize(
    "order, use_reentrant",
    [("prepare_then_peft", False), ("peft_then_prepare", False), ("prepare_then_peft", True)],
)
def test_lora_grads_with_checkpointing_equal_the_4_55_reference(
    tiny_qwen_dir, reference, order, use_reentrant
):
    model = load_qwen(tiny_qwen_dir)
    try:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
        if order == "prepare_then_peft":
            peft_model = _lora_from_reference(prepare_for_lora(model, **kwargs), reference)
        else:
            peft_model = prepare_for_lora(_lora_from_reference(model, reference), **kwargs)
        with count_block_calls(peft_model) as counts:
            loss, grads = _lora_step(peft_model, reference["inputs"]["input_ids"])
        assert set(counts.values()) == {2}, "every block is recomputed in the backward pass"
        assert _relative(loss, reference["lora_loss"]) <= TOLERANCE
        assert grads.keys() == reference["lora_grads"].keys()
        worst = max(_relative(grads[k], reference["lora_grads"][k]) for k in grads)
        assert worst <= TOLERANCE, f"LoRA gradients differ from 4.55.4's by {worst:.2e}"
    finally:
        unpatch(model)


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize(
    "case", ["generate_one_with_mask", "generate_one_without_mask", "generate_two_with_mask"]
)
def test_greedy_generate_equals_the_4_55_reference(plain, reference, case):
    prompt = reference["inputs"]["prompt"]
    prompt = prompt if "_two_" in case else prompt[:1]
    generated = _greedy(plain, prompt, with_mask="with_mask" in case)
    assert torch.equal(generated, reference[case])


def test_generate_hands_the_remote_code_legacy_caches(plain, reference, monkeypatch):
    """First step: no cache object (the remote code would cut the prompt); later steps: its own tuples.

    With the reference ids above, this shows the kv cache is used, and used right, on every release.
    """
    seen = []
    cls = type(plain)
    original = cls.prepare_inputs_for_generation

    def spy(self, input_ids, *args, **kwargs):
        inputs = original(self, input_ids, *args, **kwargs)
        seen.append((input_ids.shape[1], inputs["input_ids"].shape[1], type(inputs.get("past_key_values"))))
        return inputs

    monkeypatch.setattr(cls, "prepare_inputs_for_generation", spy)
    prompt = reference["inputs"]["prompt"][:1]
    _greedy(plain, prompt)
    assert seen[0] == (prompt.shape[1], prompt.shape[1], type(None))
    assert all(fed == 1 and past is tuple for _, fed, past in seen[1:]), seen


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.behaviour("loads")
def test_loads_with_the_stream_package_this_environment_has(tmp_path):
    case = _stream_case()
    if os.environ.get("QCC_WITHOUT_STREAM_GENERATOR") == "1":  # the matrix's no-tsg rows
        assert case == "absent"
    model = load_qwen(_fresh_dir(tmp_path))
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def _stream_modules() -> dict:
    return {n: m for n, m in sys.modules.items() if n == STREAM_PACKAGE or n.startswith(STREAM_PACKAGE + ".")}


@pytest.fixture
def shadow_stream_package(monkeypatch, tmp_path):
    """Makes `import transformers_stream_generator` absent, broken or working, whatever is installed.

    The package's entries in `sys.modules` are put back as they were afterwards (a shadow must not leak).
    """
    saved = _stream_modules()

    def shadow(case: str) -> None:
        for name in _stream_modules():
            del sys.modules[name]
        if case == "absent":
            sys.modules[STREAM_PACKAGE] = None  # import raises ModuleNotFoundError
            return
        package = tmp_path / "shadow" / STREAM_PACKAGE
        package.mkdir(parents=True)
        if case == "broken":  # what the real package does on transformers >= 4.57
            broken = "from transformers import DisjunctiveConstraint_gone_for_the_test\n"
            (package / "__init__.py").write_text(broken)
        else:
            (package / "__init__.py").write_text("")
            main = "class NewGenerationMixin:\n    pass\n\n\nclass StreamGenerationConfig:\n    pass\n"
            (package / "main.py").write_text(main)
        monkeypatch.syspath_prepend(str(package.parent))

    yield shadow
    for name in _stream_modules():
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize("case", ["absent", "broken", "working"])
def test_loads_whatever_the_stream_package_does(tmp_path, shadow_stream_package, case):
    shadow_stream_package(case)
    assert _stream_case() == case
    model = load_qwen(_fresh_dir(tmp_path))
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.behaviour("loads")
@pytest.mark.parametrize("where", ["top_level", "lazy"])
@pytest.mark.parametrize("case", ["absent", "broken", "working"])
def test_other_missing_packages_are_not_hidden(tmp_path, shadow_stream_package, case, where):
    """Only the lazily imported streaming package is excused; others are checked as transformers does."""
    shadow_stream_package(case)
    path = _fresh_dir(tmp_path)
    modeling = path / "modeling_qwen.py"
    missing = "qcc_no_such_package_for_the_test"
    if where == "top_level":
        modeling.write_text(f"import {missing}\n" + modeling.read_text())
    else:
        modeling.write_text(
            modeling.read_text() + f"\n\ndef _uses_it():\n    import {missing}\n\n    return {missing}\n"
        )
    with pytest.raises(ImportError, match=f"not found in your environment: {missing}") as error:
        load_tiny_qwen(path)
    assert STREAM_PACKAGE not in str(error.value)


@pytest.mark.behaviour("loads")
def test_chat_stream_says_why_it_cannot_stream(tiny_qwen_dir, qwen):
    problem = streaming.stream_generator_problem() or streaming.stream_generator_incompatibility()
    tokenizer = _tokenizer(tiny_qwen_dir)
    qwen.eval()
    if problem is None:  # transformers <= 4.40 with the package installed: it streams
        pieces = list(qwen.chat_stream(tokenizer, "hi", max_new_tokens=4))
        assert pieces and all(isinstance(p, str) for p in pieces)
        return
    with pytest.raises(StreamingUnavailableError) as error:
        qwen.chat_stream(tokenizer, "hi")
    message = str(error.value)
    assert problem in message and STREAM_PACKAGE in message and "model.chat(" in message
    assert isinstance(error.value, ImportError)


@pytest.mark.parametrize("case", ["absent", "broken"])
def test_chat_stream_names_a_simulated_reason(qwen, tiny_qwen_dir, monkeypatch, case):
    reason = {
        "absent": f"{STREAM_PACKAGE} is not installed",
        "broken": f"{STREAM_PACKAGE} does not import: simulated",
    }
    monkeypatch.setattr(streaming, "stream_generator_problem", lambda: reason[case])
    with pytest.raises(StreamingUnavailableError, match=reason[case]):
        qwen.chat_stream(_tokenizer(tiny_qwen_dir), "hi")


@pytest.mark.behaviour("unpatch")
def test_disabling_the_hook_restores_transformers_functions(tmp_path):
    from transformers import dynamic_module_utils

    enable_remote_code_loading()
    case = _stream_case()
    assert case == STREAM_CASE, "a simulated transformers_stream_generator leaked out of another test"
    names = ("check_imports", "get_class_in_module", "get_cached_module_file")
    originals = {name: inspect.unwrap(getattr(dynamic_module_utils, name)) for name in names}
    for name, original in originals.items():
        assert getattr(dynamic_module_utils, name) is not original, f"{name} is not wrapped while enabled"
        assert original.__module__ == "transformers.dynamic_module_utils"
    try:
        disable_remote_code_loading()
        for name, original in originals.items():
            assert getattr(dynamic_module_utils, name) is original
        path = _fresh_dir(tmp_path)
        if case != "working":  # absent or broken: transformers' own failure is back
            with pytest.raises(ImportError, match=f"{STREAM_PACKAGE}|BeamSearchScorer|DisjunctiveConstraint"):
                load_tiny_qwen(path)
        else:
            model = load_tiny_qwen(path)
            assert not hasattr(type(model).chat_stream, "__wrapped__"), (
                "a class loaded while off is untouched"
            )
    finally:
        enable_remote_code_loading()
    for name, original in originals.items():
        assert inspect.unwrap(getattr(dynamic_module_utils, name)) is original
    load_tiny_qwen(_fresh_dir(tmp_path, "again"))


@pytest.mark.behaviour("loads")
def test_model_directory_and_hf_cache_are_untouched(tmp_path, reference):
    from huggingface_hub import constants

    path = _fresh_dir(tmp_path)
    hub = Path(getattr(constants, "HF_HUB_CACHE", None) or constants.HUGGINGFACE_HUB_CACHE)
    before, hub_before = _hashes(path), _hashes(hub)
    model = load_qwen(path)
    modules_dir = Path(sys.modules[type(model).__module__].__file__).parent
    cached_before = _hashes(modules_dir)
    for name in ("modeling_qwen.py", "configuration_qwen.py", "qwen_generation_utils.py"):
        assert (modules_dir / name).read_bytes() == (path / name).read_bytes(), f"cached {name} differs"
    try:
        prepare_for_lora(model)
        ids = reference["inputs"]["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        _greedy(model, reference["inputs"]["prompt"][:1])
        model.save_pretrained(tmp_path / "saved")
    finally:
        unpatch(model)
    load_qwen(path)
    assert _hashes(path) == before
    assert _hashes(modules_dir) == cached_before
    assert _hashes(hub) == hub_before


# ------------------------------------------------------------------------------ save / peft / merge


@pytest.mark.behaviour("loads")
def test_save_pretrained_and_reload_give_equal_logits_and_generate(qwen, tmp_path, reference):
    ids, prompt = reference["inputs"]["input_ids"], reference["inputs"]["prompt"][:1]
    prepare_for_lora(qwen)  # records the auto class where transformers forgot it (4.45-4.52)
    assert type(qwen)._auto_class == "AutoModelForCausalLM"
    expected = _eval_logits(qwen, ids)
    expected_ids = _greedy(qwen, prompt)
    qwen.save_pretrained(tmp_path / "saved")
    reloaded = load_qwen(tmp_path / "saved")
    assert torch.equal(_eval_logits(reloaded, ids), expected)
    assert torch.equal(_greedy(reloaded, prompt), expected_ids)


@pytest.mark.behaviour("loads")
def test_a_second_load_still_generates_with_its_generation_config(tmp_path):
    """5.x adds GenerationMixin on the first load only (a subclass); the second load used to lack generate."""
    path = _fresh_dir(tmp_path)
    for _ in range(2):
        model = load_tiny_qwen(path)
        assert callable(getattr(model, "generate", None)) and model.can_generate()
        assert getattr(model.generation_config, "chat_format", None) == "chatml"


@pytest.mark.behaviour("lora_grads")
def test_peft_adapter_save_and_load_give_equal_logits(tiny_qwen_dir, tmp_path, reference):
    from peft import PeftModel

    ids = reference["inputs"]["input_ids"]
    model = load_qwen(tiny_qwen_dir)
    try:
        trained = _lora_from_reference(prepare_for_lora(model), reference)
        _, grads = _lora_step(trained, ids)
        assert len(grads) == 20 and all(g.abs().sum() > 0 for g in grads.values())
        expected = _eval_logits(trained, ids)
        trained.save_pretrained(str(tmp_path / "adapter"))
    finally:
        unpatch(model)
    reloaded = PeftModel.from_pretrained(load_qwen(tiny_qwen_dir), str(tmp_path / "adapter"))
    assert torch.equal(_eval_logits(reloaded, ids), expected)
    prompt = reference["inputs"]["prompt"][:1]
    assert _greedy(reloaded, prompt).shape == (1, prompt.shape[1] + 8)  # generate through peft


@pytest.mark.behaviour("loads")
def test_merge_and_unload_gives_equal_logits(tiny_qwen_dir, reference):
    ids, prompt = reference["inputs"]["input_ids"], reference["inputs"]["prompt"][:1]
    peft_model = _lora_from_reference(load_qwen(tiny_qwen_dir), reference)
    expected = _eval_logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_eval_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert _greedy(merged, prompt).shape == (1, prompt.shape[1] + 8)


@pytest.mark.behaviour("loads")
def test_chat_replies(plain, tiny_qwen_dir):
    tokenizer = _tokenizer(tiny_qwen_dir)
    try:
        tokenizer.encode("hi")
    except ValueError as error:  # e.g. transformers 5.0's slow-tokenizer default adds a missing [CLS] id
        pytest.skip(f"the remote tokenizer cannot encode on transformers {TRANSFORMERS}: {error}")
    response, history = plain.chat(tokenizer, "hi", history=None, max_new_tokens=4)
    assert isinstance(response, str) and history == [("hi", response)]


# ---------------------------------------------------------------------------------------- head mask


@pytest.mark.behaviour("loads")
def test_head_mask_old_semantics(plain, reference):
    ids = reference["inputs"]["input_ids"][:1]
    layers, heads = plain.config.num_hidden_layers, plain.config.num_attention_heads
    unmasked = _eval_logits(plain, ids)
    # All ones masks nothing (another attention path, hence a tolerance).
    ones = _eval_logits(plain, ids, head_mask=torch.ones(heads))
    torch.testing.assert_close(ones, unmasked, rtol=1e-5, atol=1e-6)
    # A 1-D mask applies to every layer, like the equivalent 2-D mask.
    one_d = torch.tensor([1.0, 0.0, 1.0, 1.0])
    both_layers = _eval_logits(plain, ids, head_mask=one_d)
    assert torch.equal(both_layers, _eval_logits(plain, ids, head_mask=one_d.expand(layers, -1)))
    # Masking a head changes the output, differently per layer.
    first, second = torch.ones(layers, heads), torch.ones(layers, heads)
    first[0, 1], second[1, 1] = 0.0, 0.0
    first_only = _eval_logits(plain, ids, head_mask=first)
    assert not torch.allclose(first_only, unmasked)
    assert not torch.allclose(first_only, _eval_logits(plain, ids, head_mask=second))
    assert not torch.allclose(first_only, both_layers)
    # What the remote forward gets.
    transformer = plain.transformer
    assert transformer.get_head_mask(None, layers) == [None] * layers
    assert transformer.get_head_mask(one_d, layers).shape == (layers, 1, heads, 1, 1)
    chunked = transformer.get_head_mask(first, layers, is_attention_chunked=True)
    assert chunked.shape == (layers, 1, heads, 1, 1, 1)


# ----------------------------------------------------------------------- 5.23+ entry points (item 4)


@pytest.fixture
def four_layers(tmp_path):
    model = load_qwen(_fresh_dir(tmp_path, "four", num_hidden_layers=4))
    yield model
    unpatch(model)


def _spy_checkpoint(monkeypatch) -> list:
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def _assert_routed(model, monkeypatch, *, use_reentrant: bool, offload: bool) -> None:
    settings = checkpoint_settings(model)
    assert settings is not None and settings.use_reentrant is use_reentrant
    assert settings.every_n_layers == 2 and settings.offload is offload
    offloaded = []
    real = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(
        torch.autograd.graph, "save_on_cpu", lambda *a, **k: offloaded.append(k) or real(*a, **k)
    )
    calls = _spy_checkpoint(monkeypatch)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with count_block_calls(model) as counts:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert [counts[i] for i in range(4)] == [2, 1, 2, 1]
    assert [c.get("use_reentrant") for c in calls] == [use_reentrant] * 2
    assert len(offloaded) == (2 if offload else 0)


@pytest.mark.behaviour("offload")
@needs_activation_api
def test_activation_checkpointing_enable_reaches_the_routed_blocks(four_layers, monkeypatch):
    patch(four_layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        four_layers.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=2, offload=True
        )
    assert not [w for w in caught if "gradient_checkpointing_enable` is deprecated" in str(w.message)]
    assert checkpoint_settings(four_layers).kwargs == {"use_reentrant": True}
    _assert_routed(four_layers, monkeypatch, use_reentrant=True, offload=True)


@pytest.mark.behaviour("every_n_layers")
@needs_activation_api
def test_deprecated_gradient_checkpointing_enable_reaches_the_routed_blocks(four_layers, monkeypatch):
    prepare_for_lora(four_layers, use_gradient_checkpointing=False)
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
        four_layers.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=2
        )
    _assert_routed(four_layers, monkeypatch, use_reentrant=True, offload=False)


@pytest.mark.behaviour("trainer")
@needs_activation_api
@pytest.mark.parametrize("prepared", ["patch", "prepare_for_lora"])
def test_trainer_activation_checkpointing_kwargs_reach_the_routed_blocks(four_layers, tmp_path, prepared):
    from helpers import lora

    if prepared == "patch":
        patch(four_layers)
    else:
        prepare_for_lora(four_layers, use_gradient_checkpointing=False)
    model = lora(four_layers)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        seed=0,
        use_cpu=True,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True, "every_n_layers": 2},
    )
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = [
        {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(2)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with count_block_calls(model) as counts:
        transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert [counts[i] for i in range(4)] == [2, 1, 2, 1]
    settings = checkpoint_settings(model)
    assert settings.use_reentrant is True and settings.every_n_layers == 2 and settings.offload is False
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    _assert_no_instance_overrides(model)


def _assert_no_instance_overrides(model) -> None:
    for module in model.modules():
        left = set(ENABLE_NAMES) & set(vars(module))
        assert not left, f"instance-level {sorted(left)} on {type(module).__qualname__}"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ENABLE_NAMES:
        ours, theirs = getattr(type(base), name, None), getattr(transformers.PreTrainedModel, name, None)
        if theirs is not None and name != "_set_gradient_checkpointing":
            assert inspect.signature(ours) == inspect.signature(theirs), f"{name} narrower than transformers'"


@pytest.mark.behaviour("enables")
@pytest.mark.parametrize("how", ["prepare_then_peft", "peft_then_prepare", "patch_then_enable"])
def test_no_instance_level_override_of_an_enable_method(tiny_qwen_dir, how):
    from helpers import enable, lora

    model = load_qwen(tiny_qwen_dir)
    try:
        if how == "prepare_then_peft":
            wrapped = lora(prepare_for_lora(model))
        elif how == "peft_then_prepare":
            wrapped = prepare_for_lora(lora(model))
        else:
            patch(model)
            enable(
                model,
                **(
                    {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
                    if HAS_CHECKPOINTING_KWARGS
                    else {}
                ),
            )
            wrapped = lora(model)
        _assert_no_instance_overrides(wrapped)
        prepare_for_lora(wrapped)  # again: still nothing on the instances
        _assert_no_instance_overrides(wrapped)
        assert blocks(model)[0].gradient_checkpointing is True
    finally:
        unpatch(model)


# ------------------------------------------------------------------------------- removed APIs themselves


def test_removed_apis_never_touch_transformers_classes(native_llama):
    from qwen_ckpt_compat._preparation import restore_removed_apis

    before = {cls: dict(vars(cls)) for cls in (transformers.PreTrainedModel, type(native_llama))}
    assert restore_removed_apis(type(native_llama)) == []
    assert restore_removed_apis(transformers.PreTrainedModel) == []
    for cls, attributes in before.items():
        assert dict(vars(cls)) == attributes


def test_removed_apis_are_installed_where_missing_only_and_once(plain):
    from transformers.generation import GenerationMixin

    from qwen_ckpt_compat._preparation import restore_removed_apis
    from qwen_ckpt_compat._repairs.model_api import get_head_mask

    assert restore_removed_apis(type(plain)) == []  # all done when the class was loaded
    remote = [k for k in type(plain).__mro__ if k.__module__.startswith("transformers_modules.")]
    base = remote[-1]
    assert base.__name__ == "QWenPreTrainedModel"
    # transformers' own get_head_mask where it still has one, the replacement where it does not.
    ours = getattr(plain.transformer.get_head_mask, "__func__", None) is get_head_mask
    assert ours is not hasattr(transformers.PreTrainedModel, "get_head_mask")
    assert ("get_head_mask" in vars(base)) is ours
    # Every release: a model that generates is a GenerationMixin (5.x only through the library).
    assert isinstance(plain, GenerationMixin) and callable(plain.generate)
    # The cache keyword is translated only where generate passes `cache=` (5.24+).
    renamed = hasattr(vars(type(plain)).get("prepare_inputs_for_generation"), "__wrapped__")
    generic = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert renamed is ("cache" in generic and "past_key_values" not in generic)
    # Replacements sit on the remote base class, never on a transformers class.
    for klass in type(plain).__mro__:
        for value in vars(klass).values():
            if getattr(getattr(value, "__func__", value), "__dict__", {}).get("_qcc_replacement"):
                assert klass is base, f"a replacement on {klass.__module__}.{klass.__qualname__}"
