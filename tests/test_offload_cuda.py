"""offload=True on CUDA: block inputs wait in pinned host memory, copied on a side stream, and come back exactly.

These run only where there is a CUDA device (not in CI); their results on the GPU machine are in
docs/testing.md.
"""

from __future__ import annotations

import pytest
import torch
from helpers import batch, lora, step_grads

from qwen_ckpt_compat import _settings, prepare_for_lora
from qwen_ckpt_compat._offload import AsyncOffload, Offloaded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_cuda(inputs: dict) -> dict:
    return {name: value.cuda() for name, value in inputs.items()}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_offloaded_inputs_come_back_exactly(tiny_qwen_dir, monkeypatch, use_reentrant):
    from helpers import load_qwen

    inputs = _on_cuda(batch())
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    reference_model = lora(load_qwen(tiny_qwen_dir).cuda())
    prepare_for_lora(reference_model, **kwargs)
    reference = step_grads(reference_model, inputs)

    packed: list = []
    real_init = Offloaded.__init__

    def spy(self, tensor):
        real_init(self, tensor)
        packed.append(self)

    monkeypatch.setattr(Offloaded, "__init__", spy)
    model = lora(load_qwen(tiny_qwen_dir).cuda())
    prepare_for_lora(model, offload=True, **kwargs)
    assert isinstance(_settings._offload_context(), AsyncOffload)
    grads = step_grads(model, inputs)
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[name], reference[name]) for name in grads), "bit for bit"
    assert len(packed) >= 2, "each checkpointed block's input went to the host"
    assert all(saved.host.is_pinned() and saved.host.device.type == "cpu" for saved in packed)


def test_the_copy_to_the_host_does_not_wait_on_the_compute_stream():
    """A copy queued behind a long product returns at once; the values are right once the side stream has run."""
    a = torch.randn(8192, 8192, device="cuda")
    hooks = AsyncOffload()
    torch.cuda.synchronize()
    product = a @ a
    saved = hooks._pack(product)
    queued = not saved.copied.query()  # the product (and the copy after it) still running: nothing waited
    back = hooks._unpack(saved)
    torch.cuda.synchronize()
    assert torch.equal(back, product)
    assert queued, "the host did not wait for the product and the copy"


def test_a_long_chain_backpropagates_equal_to_no_offload():
    torch.manual_seed(0)
    x = torch.randn(64, 1024, device="cuda")
    weight = torch.randn(1024, 1024, device="cuda", requires_grad=True)

    def run(offload: bool) -> torch.Tensor:
        hidden = x
        for _ in range(8):
            if offload:
                with AsyncOffload():
                    hidden = torch.tanh(hidden @ weight / 32)
            else:
                hidden = torch.tanh(hidden @ weight / 32)
        hidden.sum().backward()
        grad, weight.grad = weight.grad.clone(), None
        return grad

    assert torch.equal(run(True), run(False))
