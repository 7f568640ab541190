"""selective=True on CUDA: kept outputs go to pinned host memory and come back for the recompute, exactly.

These run only where there is a CUDA device (not in CI); their results on the GPU machine are in
docs/performance.md.
"""

from __future__ import annotations

import pytest
import torch
from helpers import batch, lora, max_relative_difference, needs_selective, step_grads

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat.speed import selective as selective_module

pytestmark = [needs_selective, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _on_cuda(inputs: dict) -> dict:
    return {name: value.cuda() for name, value in inputs.items()}


def test_host_copies_come_back_exactly(tiny_qwen_dir, monkeypatch):
    from helpers import load_qwen

    inputs = _on_cuda(batch())
    reference = step_grads(lora(load_qwen(tiny_qwen_dir).cuda()), inputs)

    copies = {"to_host": 0, "to_device": 0}
    to_host, to_device = selective_module.SelectiveRecompute.copy_to_host, selective_module.SelectiveRecompute.copy_to_device

    def count_to_host(self, tensor):
        copies["to_host"] += 1
        return to_host(self, tensor)

    def count_to_device(self, device, pending):
        copies["to_device"] += 1
        return to_device(self, device, pending)

    monkeypatch.setattr(selective_module, "HOST_COPY_MIN_BYTES", 0)  # the tiny model's outputs are all small
    monkeypatch.setattr(selective_module.SelectiveRecompute, "copy_to_host", count_to_host)
    monkeypatch.setattr(selective_module.SelectiveRecompute, "copy_to_device", count_to_device)
    model = lora(load_qwen(tiny_qwen_dir).cuda())
    prepare_for_lora(model, selective=True)
    grads = step_grads(model, inputs)

    assert max_relative_difference(grads, reference) <= 1e-5
    assert copies["to_host"] >= 2 * 4, "each block copied its attention output and its projections to the host"
    assert copies["to_device"] == 2, "each block's copies came back once, in one batch"


def test_small_outputs_stay_on_the_gpu_and_large_ones_go_to_the_host():
    small = torch.ones(1024, device="cuda")
    large = torch.ones(selective_module.HOST_COPY_MIN_BYTES // 2, dtype=torch.float16, device="cuda")
    assert selective_module.stays_on_device(small)
    assert not selective_module.stays_on_device(large)
    assert selective_module.stays_on_device(large[1:]), "not the whole storage: kept on the device, not copied"


def test_without_pinned_host_memory_outputs_are_recomputed_with_one_warning(tiny_qwen_dir, monkeypatch):
    from helpers import load_qwen

    from qwen_ckpt_compat import CompatWarning

    inputs = _on_cuda(batch())
    reference = step_grads(lora(load_qwen(tiny_qwen_dir).cuda()), inputs)

    def no_pinned_memory(self, tensor):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(selective_module, "HOST_COPY_MIN_BYTES", 0)
    monkeypatch.setattr(selective_module.SelectiveRecompute, "copy_to_host", no_pinned_memory)
    model = lora(load_qwen(tiny_qwen_dir).cuda())
    prepare_for_lora(model, selective=True)
    with pytest.warns(CompatWarning, match="pinned host memory") as caught:
        grads = step_grads(model, inputs)
    assert len([w for w in caught if "pinned host memory" in str(w.message)]) == 1
    assert max_relative_difference(grads, reference) <= 1e-5
