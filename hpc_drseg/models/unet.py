"""U-Net (Ronneberger et al., MICCAI 2015), the paper's baseline: 4 down / 4 up levels of double 3×3 conv + BN + ReLU,
'same' padding so logits come out at input resolution. Base width 32 with bilinear upsampling ≈ 4.3 M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_drseg.config.schema import UNET_INPUT_MULTIPLE
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError
from hpc_drseg.models.backbone import check_divisible


class DoubleConv(nn.Sequential):
    """(3×3 conv + BN + ReLU) × 2; the first conv maps in_ch → mid_ch, the second mid_ch → out_ch."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        mid_ch = mid_ch or out_ch
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2×2 max-pool then DoubleConv: halves H and W."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


class Up(nn.Module):
    """Doubles H and W, concatenates the skip connection, then DoubleConv.

    bilinear: interpolation keeps in_ch channels; DoubleConv narrows (in_ch + skip) → half of that → out_ch;
    otherwise a 2×2 transposed conv halves in_ch first, as the original U-Net's "up-convolution".
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, bilinear: bool):
        super().__init__()
        self.bilinear = bilinear
        if bilinear:
            self.up: nn.Module = nn.Identity()
            self.conv = DoubleConv(in_ch + skip_ch, out_ch, (in_ch + skip_ch) // 2)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)
            self.conv = DoubleConv(in_ch // 2 + skip_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.bilinear:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        else:
            x = self.up(x)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """(B, 3, H, W) → logits (B, 4, H, W), H and W multiples of 16 (four 2× poolings); always a plain tensor.

    Widths per level: w, 2w, 4w, 8w, 16w (base_width w). With bilinear upsampling the bottleneck has 8w channels
    (as the widely used PyTorch U-Net, which the paper's ≈4.3 M-parameter count at w=32 matches); with transposed
    convs it has 16w.
    """

    stride = UNET_INPUT_MULTIPLE  # four 2× poolings

    def __init__(self, base_width: int = 32, bilinear: bool = True):
        super().__init__()
        if base_width < 2:
            raise InputError(f"U-Net base_width: got {base_width}; it must be >= 2 (paper: 32)")
        w = base_width
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(3, w)  # (B, w, H, W)
        self.down1 = Down(w, 2 * w)  # H/2
        self.down2 = Down(2 * w, 4 * w)  # H/4
        self.down3 = Down(4 * w, 8 * w)  # H/8
        self.down4 = Down(8 * w, 16 * w // factor)  # H/16
        self.up1 = Up(16 * w // factor, 8 * w, 8 * w // factor, bilinear)
        self.up2 = Up(8 * w // factor, 4 * w, 4 * w // factor, bilinear)
        self.up3 = Up(4 * w // factor, 2 * w, 2 * w // factor, bilinear)
        self.up4 = Up(2 * w // factor, w, w, bilinear)
        self.classifier = nn.Conv2d(w, len(LESIONS), 1)

    def forward(self, image: Tensor) -> Tensor:
        check_divisible(image.shape[-2], image.shape[-1], self.stride, "U-Net")
        x1 = self.inc(image)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)  # (B, 16w / factor, H/16, W/16)
        x = self.up4(self.up3(self.up2(self.up1(x, x4), x3), x2), x1)  # (B, w, H, W)
        return self.classifier(x)
