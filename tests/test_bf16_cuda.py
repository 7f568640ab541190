"""bf16 on CUDA: the fused attention kernel and Liger-Kernel's fused linear cross-entropy against the paths they
replace, within a stated tolerance (each run records the measured difference in the JUnit report).

These run only where there is a CUDA device (not in CI); their results on the GPU machine are in
docs/testing.md. The float32 CPU equalities are in tests/test_attention.py and tests/test_loss.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import batch, lora, max_relative_difference

from qwen_ckpt_compat import prepare_for_lora
from qwen_ckpt_compat.speed import loss as loss_module
from qwen_ckpt_compat.speed.loss import ChunkedLinearCrossEntropy, chunked_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Relative (norm) difference allowed between two bf16 computations of the same function by different kernels:
#: a few units of bf16's 2^-8 rounding, accumulated over a model's layers.
BF16_TOLERANCE = 3e-2


def _loss_and_grads(model, inputs) -> tuple:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {
        n: p.grad.detach().float().clone()
        for n, p in model.named_parameters()
        if "lora_" in n and p.grad is not None
    }
    return loss.detach().float(), grads


def test_fused_attention_matches_the_masked_path_in_bf16(tiny_qwen_dir, record_property):
    from helpers import load_qwen

    inputs = {name: value.cuda() for name, value in batch(length=256).items()}
    results = []
    for fused in (False, None):  # the remote masked path, then the default (the fused kernel in training)
        model = lora(load_qwen(tiny_qwen_dir).to(device="cuda", dtype=torch.bfloat16))
        prepare_for_lora(model, **({"fused_attention": False} if fused is False else {}))
        results.append(_loss_and_grads(model, inputs))
    (masked_loss, masked), (fused_loss, fused_grads) = results
    loss_difference = abs(fused_loss - masked_loss).item() / abs(masked_loss).item()
    grad_difference = max_relative_difference(fused_grads, masked)
    record_property("loss_relative_difference", f"{loss_difference:.3e}")
    record_property("lora_grad_relative_difference", f"{grad_difference:.3e}")
    assert loss_difference <= BF16_TOLERANCE and grad_difference <= BF16_TOLERANCE


def test_liger_loss_matches_the_chunked_loss_in_bf16(record_property):
    if loss_module._liger_loss() is None:
        pytest.skip("Liger-Kernel is not installed (pip install qwen-ckpt-compat[liger])")
    torch.manual_seed(0)
    tokens, width, vocab = 4096, 1024, 32768
    hidden = (torch.randn(1, tokens, width, device="cuda") / 4).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, width, device="cuda") / 32).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")
    labels[0, :100] = -100
    liger_loss, _ = chunked_cross_entropy(hidden, weight, labels, 1024)
    (liger_grad,) = torch.autograd.grad(liger_loss, hidden)
    shifted = torch.full_like(labels, -100)
    shifted[..., :-1] = labels[..., 1:]
    own_loss, _ = ChunkedLinearCrossEntropy.apply(
        hidden.view(tokens, width), weight, shifted.view(-1), 1024, torch.bfloat16, False
    )
    (own_grad,) = torch.autograd.grad(own_loss, hidden)
    loss_difference = abs(liger_loss - own_loss).item() / abs(own_loss).item()
    grad_difference = ((liger_grad.float() - own_grad.float()).norm() / own_grad.float().norm()).item()
    record_property("loss_relative_difference", f"{loss_difference:.3e}")
    record_property("hidden_grad_relative_difference", f"{grad_difference:.3e}")
    assert loss_difference <= BF16_TOLERANCE and grad_difference <= BF16_TOLERANCE
