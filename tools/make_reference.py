r"""Write ``tests/reference/<family>_reference.pt``: what transformers 4.55.4 computes for a tiny fixture.

``--family qwen`` (the default) writes ``qwen_v1_reference.pt``, described below; ``--family chatglm`` (and
``baichuan``, ``internlm``, ``qwen_vl``) writes ``<family>_reference.pt`` with the same recipe for that family's
fixture: eval-mode logits and loss, greedy ``generate`` ids (one row with and without a mask), and the LoRA
gradients of one checkpointed step (the family's usual targets, seeded LoRA tensors), checked against the same
step without checkpointing. Qwen-VL's inputs hold an image (its pixels are recorded; the tests write it again
under the same relative file name, so that the ids, which spell the path, are the same). All of them:

    python tools/make_reference.py --family all   # the other families (not Qwen v1's)
    python tools/make_reference.py --family patterns   # the four patterns of old remote code (issue 19)

4.55.4 is the newest release on which the Qwen v1 remote code loads unmodified, so its results are the
reference that ``tests/test_newer_transformers.py`` holds every other release to (logits, loss, LoRA
gradients: relative difference <= 1e-5; greedy ``generate``: identical ids). Run it once, in the matrix row's
environment, from the repository root:

    uv pip install torch==2.13.0 -c constraints/4.55.4-last-loading.txt transformers peft accelerate \
        transformers_stream_generator safetensors pytest -e .
    python tools/make_reference.py            # --output PATH to write elsewhere

What is recorded, for the model ``write_tiny_qwen(dir)`` writes with its defaults (fp32):

* the inputs themselves (seeded), so that the tests need not re-derive them;
* eval-mode logits and loss (labels = input ids), without and with a 2-D head mask; these come from
  transformers alone: the library's import hook is off (``QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1``) and nothing of
  it touches the model;
* greedy ``generate(input_ids, max_new_tokens=8, do_sample=False)`` ids (use_cache default), with and
  without an attention mask, for a one-row and a two-row prompt; transformers alone as well (4.55.4 hands
  the model an empty ``DynamicCache`` on the first step, which the fixture's forward accepts; with the
  library's legacy-cache fix it gets ``None`` instead, and the ids are the same);
* the LoRA gradients of one training step (``r=4``, targets ``c_attn, c_proj, w1, w2``, dropout 0,
  ``init_lora_weights=False`` and then every LoRA tensor drawn from a seeded generator in name order, so that
  no peft release's initialisation matters; the initial LoRA tensors are recorded too) with checkpointing on
  through ``prepare_for_lora``. They are checked here against the same step without checkpointing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# Transformers' own behaviour for the forward/generate reference: no import hook (set before the import).
os.environ["QWEN_CKPT_COMPAT_NO_IMPORT_HOOK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qcc-reference-hf-home-"))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qwen_ckpt_compat.testing import TINY_FAMILIES  # noqa: E402  (after the environment above)

REFERENCE_TRANSFORMERS = "4.55.4"
REFERENCE_DIR = ROOT / "tests" / "reference"
DEFAULT_OUTPUT = REFERENCE_DIR / "qwen_v1_reference.pt"
# The old-API fixtures besides Qwen v1 (the family registry's fixtures).
FAMILIES = tuple(name for name in TINY_FAMILIES if name != "qwen")
PATTERNS_OUTPUT = REFERENCE_DIR / "patterns_reference.pt"
IMAGE_NAME = "qcc_reference.png"  # relative to the working directory: its bytes are part of Qwen-VL's ids
TINY_IMAGE_SIZE = 28  # write_tiny_qwen_vl's default image_size
PEFT_PREFIX = "base_model.model."


def lora_key(name: str) -> str:
    """A LoRA parameter's name without peft's wrapper prefix and adapter name (stable across peft)."""
    return name.removeprefix(PEFT_PREFIX).replace(".default.", ".")


def inputs() -> dict:
    """The seeded inputs every reference value is computed from."""
    generator = torch.Generator().manual_seed(2024)
    input_ids = torch.randint(3, 256, (2, 10), generator=generator)
    prompt = torch.randint(3, 256, (2, 6), generator=generator)
    return {
        "input_ids": input_ids,
        "head_mask": torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.5]]),
        "prompt": prompt,
        "lora_generator_seed": 7,
    }


def forward_reference(model, data: dict) -> dict:
    model.eval()
    ids = data["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        masked = model(input_ids=ids, labels=ids, head_mask=data["head_mask"])
    return {
        "logits": out.logits.detach().clone(),
        "loss": out.loss.detach().clone(),
        "head_mask_logits": masked.logits.detach().clone(),
        "head_mask_loss": masked.loss.detach().clone(),
    }


def generate_reference(model, data: dict) -> dict:
    model.eval()
    one, two = data["prompt"][:1], data["prompt"]
    options = {"max_new_tokens": 8, "do_sample": False}
    return {
        "generate_one_with_mask": model.generate(one, attention_mask=torch.ones_like(one), **options),
        "generate_one_without_mask": model.generate(one, **options),
        "generate_two_with_mask": model.generate(two, attention_mask=torch.ones_like(two), **options),
    }


def init_lora(model, seed: int) -> dict:
    """Draws every LoRA tensor from a seeded generator, in name order; returns them by `lora_key`."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
                values[lora_key(name)] = parameter.detach().clone()
    return values


def lora_step(model, data: dict) -> dict:
    model.train()
    model.zero_grad(set_to_none=True)
    ids = data["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {lora_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    return {"lora_loss": loss.detach().clone(), "lora_grads": grads}


def lora_model(path, seed: int, *, checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    from qwen_ckpt_compat import prepare_for_lora
    from qwen_ckpt_compat.testing import TARGET_MODULES, load_tiny_qwen

    model = load_tiny_qwen(path).float()
    if checkpointing:
        prepare_for_lora(model)  # routed, non-reentrant checkpointing (the default)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGET_MODULES), init_lora_weights=False
    )
    model = get_peft_model(model, config)
    return model, init_lora(model, seed)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def family_inputs(name: str) -> dict:
    """The seeded inputs of a family's reference (Qwen-VL's hold an image, spelled by its relative path)."""
    generator = torch.Generator().manual_seed(2024)
    vocab = 256
    data = {
        "input_ids": torch.randint(3, vocab, (2, 10), generator=generator),
        "prompt": torch.randint(3, vocab, (2, 6), generator=generator),
        "lora_generator_seed": 7,
    }
    if name == "qwen_vl":
        from qwen_ckpt_compat.testing import qwen_vl_image_span

        # At the model's image size: Pillow then returns the pixels as they are instead of resampling them, which
        # its releases do differently (the reference must hold whichever Pillow a row installs).
        size = TINY_IMAGE_SIZE
        data["image"] = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        span = torch.tensor(qwen_vl_image_span(IMAGE_NAME))
        data["input_ids"] = torch.cat([data["input_ids"][:, :3], span.expand(2, -1), data["input_ids"][:, 3:]], dim=1)
        data["prompt"] = torch.cat([data["prompt"][:, :2], span.expand(2, -1), data["prompt"][:, 2:]], dim=1)
    return data


def write_image(pixels: torch.Tensor, folder: Path) -> Path:
    """Writes the reference image (lossless PNG) as ``folder / IMAGE_NAME``."""
    from PIL import Image

    path = folder / IMAGE_NAME
    Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), bytes(pixels.flatten().tolist())).save(path)
    return path


def family_forward_reference(model, data: dict) -> dict:
    model.eval()
    ids = data["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return {"logits": out.logits.detach().clone(), "loss": out.loss.detach().clone()}


def family_generate_reference(model, data: dict) -> dict:
    model.eval()
    one = data["prompt"][:1]
    options = {"max_new_tokens": 8, "do_sample": False}
    return {
        "generate_one_with_mask": model.generate(one, attention_mask=torch.ones_like(one), **options),
        "generate_one_without_mask": model.generate(one, **options),
    }


def family_lora_model(name: str, path, seed: int, *, checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    from qwen_ckpt_compat import prepare_for_lora

    family = TINY_FAMILIES[name]
    model = family.load(path).float()
    # With checkpointing: routed, non-reentrant (the default). Without: off, also where the model enabled it
    # itself while it was being built (Baichuan2).
    prepare_for_lora(model, use_gradient_checkpointing=checkpointing)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(family.target_modules), init_lora_weights=False
    )
    model = get_peft_model(model, config)
    return model, init_lora(model, seed)


def make_family_reference(name: str, output: Path) -> Path:
    """The reference of one family's fixture (see the module doc); returns the file written."""
    family = TINY_FAMILIES[name]
    folder = Path(tempfile.mkdtemp(prefix=f"qcc-reference-{name}-"))
    path = family.write(folder / "model")
    data = family_inputs(name)
    if "image" in data:
        write_image(data["image"], folder)
        os.chdir(folder)  # the ids spell the image's relative path
    plain = family.load(path).float()
    record = {**family_forward_reference(plain, data), **family_generate_reference(plain, data)}
    del plain

    seed = data["lora_generator_seed"]
    checkpointed, data["lora_init"] = family_lora_model(name, path, seed, checkpointing=True)
    record.update(lora_step(checkpointed, data))
    uncheckpointed, _ = family_lora_model(name, path, seed, checkpointing=False)
    check = lora_step(uncheckpointed, data)
    assert record["lora_grads"].keys() == check["lora_grads"].keys() and check["lora_grads"]
    worst = max(relative_difference(record["lora_grads"][k], check["lora_grads"][k]) for k in check["lora_grads"])
    assert worst <= 1e-6, f"{name}: checkpointed LoRA gradients differ from plain ones by {worst:.2e}"
    assert torch.allclose(record["lora_loss"], check["lora_loss"], rtol=0, atol=0)
    return save(output, {"family": name, "inputs": data, **record})


def make_patterns_reference(output: Path) -> Path:
    """``patterns_reference.pt``: per pattern of old remote code (``write_pattern_model``), eval logits and loss
    (transformers alone) and the LoRA gradients of one checkpointed step (checked against the same step without)."""
    from peft import LoraConfig, get_peft_model

    from qwen_ckpt_compat import prepare_for_lora
    from qwen_ckpt_compat.testing import PATTERNS, load_pattern_model, write_pattern_model
    from qwen_ckpt_compat.testing._patterns import TARGET_MODULES

    data = family_inputs("patterns")
    record: dict = {"inputs": data}
    for pattern in PATTERNS:
        path = write_pattern_model(Path(tempfile.mkdtemp(prefix=f"qcc-reference-{pattern}-")) / "model", pattern)
        entry = family_forward_reference(load_pattern_model(path).float(), data)
        steps = []
        for checkpointing in (True, False):
            model = load_pattern_model(path).float()
            prepare_for_lora(model, use_gradient_checkpointing=checkpointing)
            config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGET_MODULES), init_lora_weights=False)
            model = get_peft_model(model, config)
            entry["lora_init"] = init_lora(model, data["lora_generator_seed"])
            steps.append(lora_step(model, data))
        worst = max(relative_difference(steps[0]["lora_grads"][k], steps[1]["lora_grads"][k]) for k in steps[1]["lora_grads"])
        assert worst <= 1e-6, f"{pattern}: checkpointed LoRA gradients differ from plain ones by {worst:.2e}"
        entry.update(steps[0])
        record[pattern] = entry
    return save(output, record)


def save(output: Path, reference: dict) -> Path:
    import peft
    import transformers

    reference["versions"] = {
        "transformers": str(transformers.__version__),
        "peft": str(peft.__version__),
        "torch": str(torch.__version__),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, output)
    size = output.stat().st_size
    print(f"wrote {output} ({size / 1024:.1f} KiB) with transformers {transformers.__version__}")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="(one family) where to write it")
    parser.add_argument("--family", default="qwen", choices=("qwen", *FAMILIES, "all", "patterns"))
    parser.add_argument(
        "--force", action="store_true", help=f"run on a transformers other than {REFERENCE_TRANSFORMERS}"
    )
    args = parser.parse_args(argv)

    import transformers

    if transformers.__version__ != REFERENCE_TRANSFORMERS and not args.force:
        parser.error(
            f"the reference comes from transformers {REFERENCE_TRANSFORMERS}, "
            f"found {transformers.__version__}"
        )
    from qwen_ckpt_compat._loading import is_remote_code_loading_enabled

    assert not is_remote_code_loading_enabled(), "QWEN_CKPT_COMPAT_NO_IMPORT_HOOK=1 must keep the import hook off"
    if args.family == "patterns":
        make_patterns_reference(args.output or PATTERNS_OUTPUT)
        return 0
    if args.family != "qwen":
        names = FAMILIES if args.family == "all" else (args.family,)
        cwd = os.getcwd()
        for name in names:
            make_family_reference(name, (args.output if args.family != "all" else None) or REFERENCE_DIR / f"{name}_reference.pt")
            os.chdir(cwd)
        return 0
    args.output = args.output or DEFAULT_OUTPUT

    from qwen_ckpt_compat.testing import load_tiny_qwen, write_tiny_qwen

    path = write_tiny_qwen(tempfile.mkdtemp(prefix="qcc-reference-model-"))
    data = inputs()

    plain = load_tiny_qwen(path).float()
    record = {**forward_reference(plain, data), **generate_reference(plain, data)}
    del plain

    checkpointed, data["lora_init"] = lora_model(path, data["lora_generator_seed"], checkpointing=True)
    record.update(lora_step(checkpointed, data))
    uncheckpointed, _ = lora_model(path, data["lora_generator_seed"], checkpointing=False)
    check = lora_step(uncheckpointed, data)
    assert record["lora_grads"].keys() == check["lora_grads"].keys() and len(check["lora_grads"]) == 20
    worst = max(
        relative_difference(record["lora_grads"][k], check["lora_grads"][k]) for k in check["lora_grads"]
    )
    assert worst <= 1e-6, f"checkpointed LoRA gradients differ from plain ones by {worst:.2e}"
    assert torch.equal(record["lora_loss"], check["lora_loss"])

    save(args.output, {"inputs": data, **record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
