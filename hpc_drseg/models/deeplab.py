"""DeepLab-V3+ (Chen et al., ECCV 2018) on a ResNet encoder, and the paper's Attention-DeepLab (Jithesh et al., ICMLA
2025): the same network with CBAM after ASPP (256 ch) and after the 48-ch low-level projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hpc_drseg.config.choices import CBAM_SITES, BackboneName
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError
from hpc_drseg.models.aspp import ASPP, conv3x3_bn_relu, upsample_to
from hpc_drseg.models.backbone import build_backbone, check_divisible
from hpc_drseg.models.cbam import CBAM, CBAMImpl


class DeepLabDecoder(nn.Module):
    """Fuses ASPP output (B, aspp_ch, H/os, W/os) with layer1 (B, low_ch, H/4, W/4) → logits (B, n_classes, H/4, W/4).

    low-level 1×1 → 48 + BN + ReLU [→ CBAM]; ASPP output [→ CBAM] upsampled bilinearly to H/4 (`align_corners`) and
    concatenated (aspp_ch + 48) → 3×3 256 + BN + ReLU + Dropout(0.5) → 3×3 256 + BN + ReLU + Dropout(0.1) → 1×1 to
    n_classes (with bias).
    """

    def __init__(
        self,
        aspp_ch: int,
        low_ch: int,
        n_classes: int,
        separable: bool,
        aspp_attention: nn.Module,
        low_level_attention: nn.Module,
        align_corners: bool = True,
    ):
        super().__init__()
        self.align_corners = align_corners
        self.low_level = nn.Sequential(nn.Conv2d(low_ch, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp_attention = aspp_attention
        self.low_level_attention = low_level_attention
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(aspp_ch + 48, 256, separable=separable),
            nn.Dropout(0.5),
            conv3x3_bn_relu(256, 256, separable=separable),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(256, n_classes, 1)

    def forward(self, aspp_out: Tensor, low_level: Tensor) -> Tensor:
        low = self.low_level_attention(self.low_level(low_level))  # (B, 48, H/4, W/4)
        high = upsample_to(self.aspp_attention(aspp_out), low.shape[-2:], self.align_corners)  # (B, 256, H/4, W/4)
        # high-level first, the channel order of the DeepLab-V3+ reference code; (B, 256 + 48, H/4, W/4)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))


class AuxHead(nn.Module):
    """FCN head on layer4 (paper code, not text): 3×3 256 + BN + ReLU + Dropout(0.1) → 1×1 to n_classes."""

    def __init__(self, in_ch: int, n_classes: int):
        super().__init__()
        self.block = nn.Sequential(conv3x3_bn_relu(in_ch, 256), nn.Dropout(0.1), nn.Conv2d(256, n_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DeepLabV3Plus(nn.Module):
    """DeepLab-V3+ with optional CBAM blocks (Attention-DeepLab = cbam_sites=("aspp", "low_level")).

    Input (B, 3, H, W) with H and W multiples of `output_stride`. Output: logits (B, 4, H, W), one sigmoid channel per
    lesion in LESIONS order. Exception: with use_aux_head=True and in train mode, forward returns a dict
    {"logits": (B, 4, H, W), "aux": (B, 4, H, W)} — the aux logits from layer4, also upsampled to the input size, to be
    weighted by loss.aux_weight. In eval mode the aux head is skipped and a plain tensor is returned.

    Defaults are the paper's: ResNet-50, output stride 32 (ASPP on 16×16 at 512² input), rates (6, 12, 18), ordinary
    3×3 convs, align_corners=True for the bilinear upsamplings (ASPP output ×os/4 in the decoder, logits ×4 to the
    input size, and the aux logits; the image-pooling branch is a broadcast either way). pretrained_path = local
    torchvision ImageNet state-dict file for the backbone (never downloaded).
    """

    def __init__(
        self,
        backbone: BackboneName = "resnet50",
        pretrained_path: str | Path | None = None,
        output_stride: int = 32,
        aspp_rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        use_aux_head: bool = False,
        cbam_sites: Sequence[str] = (),
        cbam_reduction: int = 16,
        cbam_kernel_size: int = 7,
        cbam_impl: CBAMImpl = "eager",
        align_corners: bool = True,
    ):
        super().__init__()
        bad = [s for s in cbam_sites if s not in CBAM_SITES]
        if bad:
            raise InputError(f"cbam_sites: got {list(cbam_sites)}; each must be one of {list(CBAM_SITES)}")
        self.output_stride = output_stride
        self.align_corners = align_corners
        self.cbam_sites = tuple(cbam_sites)
        self.backbone = build_backbone(backbone, output_stride, pretrained_path)
        out_ch, low_ch = self.backbone.channels["out"], self.backbone.channels["low_level"]
        self.aspp = ASPP(out_ch, 256, aspp_rates, separable, dropout=0.5)

        def attention(site: str, channels: int) -> nn.Module:
            if site not in cbam_sites:
                return nn.Identity()
            return CBAM(channels, cbam_reduction, cbam_kernel_size, cbam_impl)

        self.decoder = DeepLabDecoder(
            256, low_ch, len(LESIONS), separable, attention("aspp", 256), attention("low_level", 48), align_corners
        )
        self.aux_head = AuxHead(out_ch, len(LESIONS)) if use_aux_head else None

    def forward(self, image: Tensor) -> Tensor | dict[str, Tensor]:
        check_divisible(image.shape[-2], image.shape[-1], self.output_stride, "DeepLab-V3+")
        features = self.backbone(image)  # {"low_level": stride 4, "out": stride output_stride}
        logits = self.decoder(self.aspp(features["out"]), features["low_level"])  # (B, 4, H/4, W/4)
        logits = upsample_to(logits, image.shape[-2:], self.align_corners)
        if self.aux_head is None or not self.training:
            return logits
        aux = upsample_to(self.aux_head(features["out"]), image.shape[-2:], self.align_corners)
        return {"logits": logits, "aux": aux}
