"""Atrous Spatial Pyramid Pooling of DeepLab-V3/V3+ (Chen et al. 2017, 2018): a 1×1 branch, three 3×3 atrous
branches, an image-pooling branch, then a 1×1 projection. Ordinary 3×3 convs as the paper's code; depthwise-separable
ones (as segmentation_models_pytorch) as an option.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_drseg.errors import InputError


def conv3x3_bn_relu(in_ch: int, out_ch: int, dilation: int = 1, separable: bool = False) -> nn.Sequential:
    """3×3 conv (dilated, 'same' padding) + BN + ReLU; separable = depthwise 3×3 then pointwise 1×1 (Xception style)."""
    if separable:
        conv: nn.Module = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )
    else:
        conv = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    """Image-level features: global average pool → 1×1 conv (with bias) → ReLU → broadcast back to H×W.

    No BatchNorm here, on purpose: BN on a (B, C, 1, 1) map has one value per channel at batch size 1 and fails in
    train mode ("Expected more than 1 value per channel"), and at small batches its statistics are noise. The conv's
    bias takes BN's shift role. (torchvision and SMP use BN here and so cannot train at batch size 1.)
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.relu(self.conv(self.pool(x)))  # (B, out_ch, 1, 1)
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])  # bilinear from 1×1 is a broadcast


class ASPP(nn.Module):
    """(B, in_ch, h, w) → (B, out_ch, h, w). Five branches concatenated (5·out_ch) → 1×1 conv + BN + ReLU + Dropout."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        if len(rates) != 3 or any(r < 1 for r in rates):
            raise InputError(f"ASPP rates: got {list(rates)}; give three positive atrous rates, e.g. (6, 12, 18)")
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))]
            + [conv3x3_bn_relu(in_ch, out_ch, rate, separable) for rate in rates]
            + [ASPPPooling(in_ch, out_ch)]
        )
        self.project = nn.Sequential(
            nn.Conv2d(5 * out_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def upsample_to(x: Tensor, size: Sequence[int], align_corners: bool = True) -> Tensor:
    """Bilinear resize of (B, C, h, w) to `size`.

    align_corners=True (the paper's code) maps the corner pixel centres of input and output onto each other;
    False (torchvision's segmentation models) maps the corner edges, i.e. treats pixels as areas. The two sample the
    input at slightly different positions, so a checkpoint is best evaluated with the setting it trained with.
    """
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
