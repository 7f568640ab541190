"""offload=True's saved-tensor hooks (AsyncOffload): the same gradients, the tensor saved before fetched next,
an in-place write after the save refused, torch's save_on_cpu where there is no CUDA device.

The hooks' bookkeeping runs here on the CPU (``offload_cpu_tensors=True``: plain copies instead of side-stream
ones); the CUDA copies themselves are checked in tests/test_offload_cuda.py, on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from helpers import batch, lora, step_grads

from qwen_ckpt_compat import _offload, _settings, prepare_for_lora
from qwen_ckpt_compat._offload import AsyncOffload, Offloaded


def _chain(inputs: list, weight: torch.Tensor) -> torch.Tensor:
    """Three 'blocks', each saving its input under its own hooks context, as each checkpointed block does."""
    hidden = inputs[0]
    for _ in range(3):
        with AsyncOffload(offload_cpu_tensors=True):
            hidden = torch.tanh(hidden @ weight)
    return hidden.sum()


@pytest.mark.behaviour("offload")
def test_offloaded_step_gives_the_same_gradients():
    torch.manual_seed(0)
    x, weight = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)
    _chain([x], weight).backward()
    reference, weight.grad = weight.grad.clone(), None
    _chain([x], weight).backward()
    assert torch.equal(weight.grad, reference)


def test_unpacking_one_tensor_fetches_the_one_saved_before_it(monkeypatch):
    fetched: list = []
    real = Offloaded.prefetch

    def spy(self):
        if self.fetched is None:
            fetched.append(self)
        return real(self)

    monkeypatch.setattr(Offloaded, "prefetch", spy)
    saved: list = []
    hooks = AsyncOffload(offload_cpu_tensors=True)
    for index in range(3):
        saved.append(hooks._pack(torch.full((2,), float(index))))
    assert [s.previous() for s in saved[1:]] == saved[:2], "each one knows the one saved before it"
    assert torch.equal(hooks._unpack(saved[2]), torch.full((2,), 2.0))
    assert fetched == [saved[2], saved[1]], "taking the last one started fetching the one before it"
    assert torch.equal(hooks._unpack(saved[1]), torch.full((2,), 1.0))
    assert fetched[2:] == [saved[0]], "the prefetched one was not fetched again"
    assert torch.equal(hooks._unpack(saved[1]), torch.full((2,), 1.0)), (
        "unpacked twice (retain_graph): same values"
    )


def test_a_saved_tensor_written_in_place_afterwards_is_an_error():
    hooks = AsyncOffload(offload_cpu_tensors=True)
    tensor = torch.ones(3)
    saved = hooks._pack(tensor)
    tensor.add_(1)
    with pytest.raises(RuntimeError, match="written in place after it was saved"):
        hooks._unpack(saved)


def test_host_tensors_and_non_strided_ones_are_saved_as_they_are():
    hooks = AsyncOffload()
    tensor = torch.ones(3)
    assert hooks._pack(tensor) is tensor, "without CUDA a host tensor is already where offloading puts it"
    sparse = torch.eye(3).to_sparse()
    assert AsyncOffload(offload_cpu_tensors=True)._pack(sparse) is sparse


def test_without_cuda_offload_enters_torchs_save_on_cpu(monkeypatch):
    assert isinstance(_settings._offload_context(), torch.autograd.graph.save_on_cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_settings, "_offload_device_type", lambda: "cuda")
    assert isinstance(_settings._offload_context(), AsyncOffload), "on CUDA: the side-stream hooks"


@pytest.mark.behaviour("offload")
def test_a_model_trained_with_the_hooks_gets_the_same_lora_gradients(qwen, monkeypatch):
    """The checkpoint layer's offload path with AsyncOffload in place (host copies of host tensors, here): the
    same gradients, bit for bit, as the same checkpointing without offload (the same kernels: torch 2.1's fused
    attention differs from its masked path in the last bits, so the reference is not an unprepared model)."""
    inputs = batch()
    model = prepare_for_lora(lora(qwen), offload=False)
    reference = step_grads(model, inputs)
    entered: list = []

    def hooks():
        entered.append(AsyncOffload(offload_cpu_tensors=True))
        return entered[-1]

    monkeypatch.setattr(_settings, "_offload_context", hooks)
    prepare_for_lora(model, offload=True)
    grads = step_grads(model, inputs)
    assert len(entered) == 2, "one hooks context per checkpointed block"
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[name], reference[name]) for name in grads)
    assert _offload._LAST_SAVED, "the block inputs went through the hooks"
