"""The torch range of pyproject.toml (torch >= 2.0): what differs between torch releases is detected, not assumed.

The era rows of the matrix (``nox -s tests-era``) run the whole suite on torch 2.0.0, 2.1.1, 2.5.1 and the
newest torch; these tests pin down the differences the library has to bridge, on whichever torch is installed:

* ``torch.autograd.graph.save_on_cpu`` takes ``device_type`` from torch 2.1 on (2.0: ``pin_memory`` only);
* ``torch.utils.checkpoint.checkpoint`` takes ``context_fn``, ``determinism_check`` and ``debug`` from 2.1 on,
  ``early_stop`` from 2.9, ``respect_saved_tensors_hooks`` from 2.14 (before that, torch 2.0 rejects them and
  later releases hand unknown keywords to the checkpointed function);
* ``import torch`` imports ``torch.utils.checkpoint`` from 2.1 on only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.utils.checkpoint
from helpers import step_grads

from qwen_ckpt_compat import (
    CompatWarning,
    UnsupportedTorchError,
    _settings,
    checkpoint_settings,
    prepare_for_lora,
)
from qwen_ckpt_compat._versions import CHECKPOINT_KEYWORD_RELEASES, checkpoint_keywords, installed_version

SAVE_ON_CPU_PARAMETERS = set(inspect.signature(torch.autograd.graph.save_on_cpu).parameters)
CHECKPOINT_PARAMETERS = set(inspect.signature(torch.utils.checkpoint.checkpoint).parameters)


def _spy_on_save_on_cpu(monkeypatch) -> list:
    """Records the keyword arguments of every ``save_on_cpu`` the library enters (the real one still runs)."""
    entered: list = []
    real = torch.autograd.graph.save_on_cpu

    @functools.wraps(real)  # keeps the real signature visible, as the library inspects it
    def spy(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    return entered


@pytest.mark.behaviour("offload")
def test_offload_on_a_gpu_host_passes_only_what_this_torch_takes(qwen, monkeypatch):
    """On a CUDA host offload pins host memory; ``device_type`` is passed only where save_on_cpu takes it.

    torch 2.0's ``save_on_cpu(pin_memory=...)`` raised ``TypeError`` on the ``device_type`` the library passed.
    On this CPU machine the tensors stay on the host either way; the options are what is checked.
    """
    entered = _spy_on_save_on_cpu(monkeypatch)
    monkeypatch.setattr(_settings, "_offload_device_type", lambda: "cuda")
    prepare_for_lora(qwen, offload=True)
    step_grads(qwen)
    assert len(entered) == 2, "one save_on_cpu context per checkpointed block"
    expected = {"pin_memory": True, "device_type": "cuda"} if "device_type" in SAVE_ON_CPU_PARAMETERS else {"pin_memory": True}
    assert all(options == expected for options in entered), entered
    assert checkpoint_settings(qwen).offload is True


@pytest.mark.behaviour("offload")
def test_offload_to_another_accelerator_pins_for_it_where_torch_can(qwen, monkeypatch):
    """Pinned memory for a non-CUDA accelerator needs ``save_on_cpu(device_type=)``, i.e. torch >= 2.1; before
    that the inputs go to unpinned host memory, with a warning naming the release."""
    entered = _spy_on_save_on_cpu(monkeypatch)
    monkeypatch.setattr(_settings, "_offload_device_type", lambda: "xpu")
    prepare_for_lora(qwen, offload=True)
    if "device_type" in SAVE_ON_CPU_PARAMETERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompatWarning)
            step_grads(qwen)
        expected = {"pin_memory": True, "device_type": "xpu"}
    else:
        with pytest.warns(CompatWarning, match=r"torch >= 2\.1.*device_type"):
            step_grads(qwen)
        expected = {"pin_memory": False}
    assert entered and all(options == expected for options in entered), entered


def test_checkpoint_keywords_are_read_off_the_installed_torch():
    keywords = checkpoint_keywords()
    assert {"use_reentrant", "preserve_rng_state"} <= keywords
    for keyword in CHECKPOINT_KEYWORD_RELEASES:
        assert (keyword in keywords) is (keyword in CHECKPOINT_PARAMETERS), keyword


def test_the_release_table_matches_the_installed_torch():
    """Each keyword exists exactly from the release the table names (torch's own version, local tag dropped)."""
    from packaging.version import Version

    installed = Version(Version(torch.__version__).base_version)
    for keyword, release in CHECKPOINT_KEYWORD_RELEASES.items():
        assert (keyword in CHECKPOINT_PARAMETERS) is (installed >= Version(release)), (keyword, release)


@pytest.mark.behaviour("kwargs")
@pytest.mark.parametrize("keyword", sorted(CHECKPOINT_KEYWORD_RELEASES))
def test_a_checkpoint_keyword_is_refused_exactly_where_torch_lacks_it(qwen, keyword):
    # A value of the type torch expects (the library checks types: a truthy string is no `debug=True`).
    value = {"context_fn": lambda: (contextlib.nullcontext(), contextlib.nullcontext()), "determinism_check": "none"}
    value = value.get(keyword, True)
    if keyword in checkpoint_keywords():
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False, keyword: value})
        assert checkpoint_settings(qwen).kwargs[keyword] is value
        return
    release = CHECKPOINT_KEYWORD_RELEASES[keyword]
    pattern = rf"torch {re.escape(str(installed_version('torch')))}.*{keyword}.*torch >= {re.escape(release)}"
    with pytest.raises(UnsupportedTorchError, match=pattern):  # refused before any training step
        prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False, keyword: value})


@pytest.mark.behaviour("kwargs")
def test_a_checkpoint_keyword_this_torch_takes_reaches_torch(qwen, monkeypatch):
    if "determinism_check" not in checkpoint_keywords():
        pytest.skip(f"torch {torch.__version__} has no determinism_check (2.1+)")
    seen: list = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda f, *a, **k: seen.append(k) or real(f, *a, **k))
    prepare_for_lora(qwen, gradient_checkpointing_kwargs={"use_reentrant": False, "determinism_check": "none"})
    step_grads(qwen)
    assert seen and all(k == {"use_reentrant": False, "determinism_check": "none"} for k in seen), seen


@pytest.mark.release_independent
def test_checkpoint_function_imports_what_it_calls():
    """torch 2.0's ``import torch`` leaves ``torch.utils.checkpoint`` unimported; the settings must not rely on others."""
    code = (
        "import torch\n"
        "from qwen_ckpt_compat import _settings\n"
        "x = torch.ones(3, requires_grad=True)\n"
        "for offload in (False, True):\n"
        "    run = _settings.build_checkpoint_function({'use_reentrant': False}, offload)\n"
        "    run(lambda t: (t * t).sum(), x).backward()\n"
        "print(x.grad.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[4.0,", "4.0,", "4.0]"]
