"""No host round trip in the loss: forward + backward of CombinedLoss, repeated, make no call that reads a device
value back to the CPU or builds a host tensor for the device (tests/host_sync_counter.py), in every configuration."""

from __future__ import annotations

import pytest
import torch
from host_sync_counter import TENSOR_METHODS, count_host_syncs

from hpc_drseg.config import LossConfig
from hpc_drseg.losses import bce_loss, build_loss, mask_gradient_magnitude

CALLS = 3


def test_counter_counts_calls_from_package_code_only():
    logits, target = torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    originals = (torch.tensor, torch.Tensor.item, torch.Tensor.__bool__)
    with count_host_syncs(package="hpc_drseg") as counter:
        bce_loss(logits, target, pos_weight=[4.0, 1.0, 1.5, 2.0])  # a list: torch.tensor(...) in hpc_drseg
        mask_gradient_magnitude(target)  # builds its Sobel kernels with torch.tensor(...)
        bce_loss(logits, target, pos_weight=torch.ones(4))  # a tensor is used as is: no call
        assert bool(torch.ones(())) and torch.ones(2).tolist() and torch.zeros(()).item() == 0  # from a test file
    assert counter.calls == 2, counter.sites
    assert all("hpc_drseg/losses/terms.py:" in site and site.endswith("torch.tensor") for site in counter.sites)
    # Restored: the C methods show through again and nothing is counted any more.
    assert all(name not in vars(torch.Tensor) for name in TENSOR_METHODS)
    assert (torch.tensor, torch.Tensor.item, torch.Tensor.__bool__) == originals
    bce_loss(logits, target, pos_weight=[1.0] * 4)
    assert counter.calls == 2


@pytest.mark.parametrize(
    "settings, with_aux, bf16",
    [
        ({}, False, False),
        ({"pos_weight": [4.0, 1.0, 1.5, 2.0], "boundary_mode": "edge_emphasis"}, True, False),
        ({"pos_weight": [4.0, 1.0, 1.5, 2.0]}, True, True),
    ],
    ids=["paper", "pos_weight-edge-aux", "pos_weight-aux-bf16"],
)
def test_loss_forward_backward_makes_no_host_round_trip(settings, with_aux, bf16):
    loss = build_loss(LossConfig(**settings))
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    logits = torch.randn(2, 4, 16, 16, generator=gen).to(dtype).requires_grad_()
    aux = torch.randn(2, 4, 8, 8, generator=gen).to(dtype).requires_grad_() if with_aux else None
    mask = (torch.rand(2, 4, 16, 16, generator=gen) < 0.2).to(torch.uint8)
    with count_host_syncs(package="hpc_drseg") as counter:
        for _ in range(CALLS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                total, logs = loss(logits, mask, aux, per_lesion=True)
            total.backward()
    assert counter.calls == 0, counter.sites
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_backward_never_synchronizes():
    """On the device itself: CUDA's sync debug mode raises on any operation that waits for the GPU."""
    loss = build_loss(LossConfig(pos_weight=[4.0, 1.0, 1.5, 2.0])).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 4, 64, 64, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    aux = torch.randn(4, 4, 16, 16, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    mask = (torch.rand(4, 4, 64, 64, device="cuda", generator=gen) < 0.1).to(torch.uint8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(CALLS):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, _ = loss(logits, mask, aux, per_lesion=True)
            total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits.grad.float()).all()
