"""Attention-DeepLab against an independent statement of the paper's forward pass (plain torch.nn.functional calls on
the model's own weights), both CBAM blocks on the forward path, the align_corners switch, and the ASPP fact that
docs/method.md states (rate 18 on a 16×16 map sees only zero padding off-centre)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from hpc_drseg.config import ModelConfig
from hpc_drseg.models import build_model
from hpc_drseg.models.aspp import ASPP

# ResNet-18 keeps it fast (depth does not change the wiring); (1, 2, 3) gives every atrous branch real off-centre taps
# on the 4×3 map of a 128×96 input at output stride 32, where the paper's (6, 12, 18) see only their centre tap.
CASES = {
    "paper-rates-64x64": ((6, 12, 18), (64, 64)),
    "small-rates-128x96": ((1, 2, 3), (128, 96)),
}


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, and biases, so that eval-mode BN is really exercised;
    a classifier 20× its initial scale, so logits are O(1) (about 0.1 otherwise) and the tolerances are relative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(20.0)
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean") or name.endswith(".bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("running_var"):
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.5, 2.0, generator=gen))
            elif tensor.is_floating_point() and tensor.ndim == 1:  # BatchNorm weight
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.5, 1.5, generator=gen))
    return model


def attention_deeplab(rates=(6, 12, 18), align_corners: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="attention_deeplab", backbone="resnet18", aspp_rates=list(rates), align_corners=align_corners
    )
    return randomise_(build_model(cfg)).eval()


# ----------------------------------------------------------------------------------- the paper's forward pass
def reference_forward(w: dict[str, Tensor], image: Tensor, rates, align_corners: bool = True) -> Tensor:
    """Attention-DeepLab (ResNet-18, output stride 32) in eval mode, written out from the paper's description.

    ResNet stem and four stages of basic blocks → ASPP (1×1; three 3×3 atrous; global pooling → 1×1 with bias → ReLU
    → broadcast; concat → 1×1 projection) → CBAM (channel, then spatial) → bilinear up to stride 4; layer1 → 1×1 to 48
    → CBAM; concat (ASPP first) → two 3×3 convs → 1×1 classifier → bilinear up to the input size.
    """

    def bn(x: Tensor, p: str) -> Tensor:
        return F.batch_norm(
            x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"], False, 0.0, 1e-5
        )

    def conv_bn_relu(x: Tensor, conv: str, norm: str, **kw) -> Tensor:
        return F.relu(bn(F.conv2d(x, w[f"{conv}.weight"], **kw), norm))

    def basic_block(x: Tensor, p: str, stride: int) -> Tensor:
        out = conv_bn_relu(x, f"{p}.conv1", f"{p}.bn1", stride=stride, padding=1)
        out = bn(F.conv2d(out, w[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
        identity = x
        if f"{p}.downsample.0.weight" in w:
            identity = bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
        return F.relu(out + identity)

    def cbam(x: Tensor, p: str) -> Tensor:
        def mlp(v: Tensor) -> Tensor:
            return F.conv2d(F.relu(F.conv2d(v, w[f"{p}.channel.fc1.weight"])), w[f"{p}.channel.fc2.weight"])

        avg, mx = F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)
        x = x * torch.sigmoid(mlp(avg) + mlp(mx))
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True).values], dim=1)
        return x * torch.sigmoid(F.conv2d(stats, w[f"{p}.spatial.conv.weight"], padding=3))

    def up(x: Tensor, size) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)

    # backbone
    x = conv_bn_relu(image, "backbone.conv1", "backbone.bn1", stride=2, padding=3)
    x = F.max_pool2d(x, 3, 2, 1)
    features = []
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for block in range(2):
            x = basic_block(x, f"backbone.layer{stage}.{block}", stride if block == 0 else 1)
        features.append(x)
    layer1, layer4 = features[0], features[3]
    # ASPP
    branches = [conv_bn_relu(layer4, "aspp.branches.0.0", "aspp.branches.0.1")]
    for i, rate in enumerate(rates, start=1):
        branches.append(
            conv_bn_relu(layer4, f"aspp.branches.{i}.0", f"aspp.branches.{i}.1", padding=rate, dilation=rate)
        )
    pooled = F.relu(
        F.conv2d(F.adaptive_avg_pool2d(layer4, 1), w["aspp.branches.4.conv.weight"], w["aspp.branches.4.conv.bias"])
    )
    branches.append(pooled.expand(-1, -1, *layer4.shape[-2:]))
    aspp = conv_bn_relu(torch.cat(branches, dim=1), "aspp.project.0", "aspp.project.1")
    # decoder
    low = cbam(conv_bn_relu(layer1, "decoder.low_level.0", "decoder.low_level.1"), "decoder.low_level_attention")
    high = up(cbam(aspp, "decoder.aspp_attention"), low.shape[-2:])
    y = conv_bn_relu(torch.cat([high, low], dim=1), "decoder.fuse.0.0", "decoder.fuse.0.1", padding=1)
    y = conv_bn_relu(y, "decoder.fuse.2.0", "decoder.fuse.2.1", padding=1)
    logits = F.conv2d(y, w["decoder.classifier.weight"], w["decoder.classifier.bias"])
    return up(logits, image.shape[-2:])


@pytest.mark.parametrize("case", list(CASES))
def test_attention_deeplab_matches_the_paper_forward_pass(case):
    rates, size = CASES[case]
    model = attention_deeplab(rates)
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(image)
        expected = reference_forward(model.state_dict(), image, rates)
    assert out.shape == (2, 4, *size)
    assert expected.abs().max() > 1.0  # logits of a useful size, so atol 1e-5 is a strict check
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ align_corners
def test_align_corners_is_configurable_and_reaches_every_upsampling():
    rates, size = CASES["small-rates-128x96"]
    paper, other = attention_deeplab(rates, align_corners=True), attention_deeplab(rates, align_corners=False)
    other.load_state_dict(paper.state_dict())
    assert ModelConfig().align_corners is True and paper.align_corners and paper.decoder.align_corners
    assert not other.align_corners and not other.decoder.align_corners
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = paper(image), other(image)
        weights = paper.state_dict()
        torch.testing.assert_close(
            b, reference_forward(weights, image, rates, align_corners=False), rtol=1e-5, atol=1e-5
        )
    assert (a - b).abs().max() > 1e-2  # the two settings give visibly different logits


def test_align_corners_also_moves_the_aux_logits():
    cfg = dict(name="attention_deeplab", backbone="resnet18", use_aux_head=True)
    torch.manual_seed(0)
    paper = build_model(ModelConfig(**cfg)).train()
    other = build_model(ModelConfig(**cfg, align_corners=False)).train()
    other.load_state_dict(paper.state_dict())
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)  # dropout draws alike
    a = paper(image)
    torch.manual_seed(4)
    b = other(image)
    assert (a["aux"] - b["aux"]).abs().max() > 1e-3 and (a["logits"] - b["logits"]).abs().max() > 1e-3


def test_unet_builds_whatever_align_corners_says():
    torch.manual_seed(0)
    a = build_model(ModelConfig(name="unet", unet_base_width=8)).eval()
    torch.manual_seed(0)
    b = build_model(ModelConfig(name="unet", unet_base_width=8, align_corners=False)).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(image), b(image))


# ------------------------------------------------------------------------------------------------------- CBAM sites
@pytest.mark.parametrize("site", ["aspp_attention", "low_level_attention"])
def test_each_cbam_block_is_on_the_forward_path(site):
    model = attention_deeplab()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(image)
        block = getattr(model.decoder, site)
        for weight in (block.channel.fc1.weight, block.channel.fc2.weight, block.spatial.conv.weight):
            weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(6)))
        after = model(image)
    assert (after - before).abs().max() > 1e-3, site


# ------------------------------------------------------------------------------------------------------------- ASPP
def test_rate_18_on_a_16x16_map_is_its_centre_tap():
    """At output stride 32 and 512² input ASPP runs on 16×16: the off-centre taps of rate 18 land at distance 18,
    outside the map, on zero padding — that branch is a 1×1 conv with its centre weights. Rate 12 is not (it reaches
    inside from the edges)."""
    torch.manual_seed(0)
    aspp = ASPP(8, 16, rates=(6, 12, 18)).eval()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        for index, rate, centre_only in ((2, 12, False), (3, 18, True)):
            conv = aspp.branches[index][0]
            full = F.conv2d(x, conv.weight, padding=rate, dilation=rate)
            centre = F.conv2d(x, conv.weight[:, :, 1:2, 1:2])
            assert torch.allclose(full, centre, atol=1e-6) is centre_only, rate
