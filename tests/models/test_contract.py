"""The model contract, run over every registered model and its main variants: (B, 4, H, W) logits, backward reaches
every parameter, no NaN, batch size 1 in train mode, channels_last input, bf16 autocast on CPU."""

from __future__ import annotations

import pytest
import torch

from hpc_drseg.config import CBAMConfig, ModelConfig
from hpc_drseg.constants import LESIONS
from hpc_drseg.models import build_model
from hpc_drseg.models.registry import MODEL_NAMES

# Small and fast: ResNet-18 (depth does not change the wiring), 64×64 inputs (ASPP sees 2×2 at OS 32).
VARIANTS = {
    "attention_deeplab": ModelConfig(name="attention_deeplab", backbone="resnet18"),
    "attention_deeplab-os16-aux": ModelConfig(
        name="attention_deeplab", backbone="resnet18", output_stride=16, use_aux_head=True
    ),
    "attention_deeplab-aspp-site-separable": ModelConfig(
        name="attention_deeplab", backbone="resnet18", aspp_separable=True, cbam=CBAMConfig(sites=["aspp"])
    ),
    "deeplabv3plus": ModelConfig(name="deeplabv3plus", backbone="resnet18"),
    "deeplabv3plus-os16": ModelConfig(name="deeplabv3plus", backbone="resnet18", output_stride=16),
    "unet": ModelConfig(name="unet", unet_base_width=8),
    "unet-transposed": ModelConfig(name="unet", unet_base_width=8, unet_bilinear=False),
}
SIZE = 64


def test_every_registered_model_is_covered():
    assert {cfg.name for cfg in VARIANTS.values()} == set(MODEL_NAMES)


def logits_of(out):
    return out["logits"] if isinstance(out, dict) else out


def weighted_loss(out, seed=0):
    """Random per-pixel weights: the plain sum of logits has zero gradient through train-mode BatchNorm."""
    outputs = list(out.values()) if isinstance(out, dict) else [out]
    gen = torch.Generator().manual_seed(seed)
    return sum((o.float() * torch.randn(o.shape, generator=gen)).mean() for o in outputs)


def make_model(key):
    torch.manual_seed(0)
    return build_model(VARIANTS[key])


@pytest.mark.parametrize("key", list(VARIANTS))
def test_train_step_reaches_every_parameter(key):
    model = make_model(key).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    cfg = VARIANTS[key]
    if cfg.use_aux_head:
        assert set(out) == {"logits", "aux"} and out["aux"].shape == (2, len(LESIONS), SIZE, SIZE)
    logits = logits_of(out)
    assert logits.shape == (2, len(LESIONS), SIZE, SIZE) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    weighted_loss(out).backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    zero = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
    assert len(zero) <= 0.02 * len(params), f"parameters with all-zero gradient: {zero[:5]}"


@pytest.mark.parametrize("key", list(VARIANTS))
def test_batch_size_one_in_train_mode(key):
    model = make_model(key).train()
    out = model(torch.randn(1, 3, SIZE, SIZE))
    assert logits_of(out).shape == (1, len(LESIONS), SIZE, SIZE)
    weighted_loss(out).backward()


@pytest.mark.parametrize("key", list(VARIANTS))
def test_eval_returns_plain_tensor_and_channels_last_matches(key):
    model = make_model(key).eval()
    image = torch.randn(2, 3, SIZE, 96)
    with torch.no_grad():
        reference = model(image)
        model = model.to(memory_format=torch.channels_last)
        out = model(image.contiguous(memory_format=torch.channels_last))
    assert isinstance(reference, torch.Tensor) and reference.shape == (2, len(LESIONS), SIZE, 96)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_bf16_autocast_on_cpu(key):
    """32×32 (the smallest size every model takes): CPUs without AVX-512 run bf16 convs on a slow fallback path."""
    size = 32
    model = make_model(key).train().to(memory_format=torch.channels_last)
    image = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image)
        loss = weighted_loss(out)
    assert logits_of(out).shape == (2, len(LESIONS), size, size)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
