"""The paper pipeline's photometric transforms on a batch of float images on the 0-255 scale, (B, 3, H, W) RGB:
the colour OneOf (brightness/contrast, gamma, HSV shift), Gaussian noise and the 3×3 Gaussian blur, each applied
to the samples whose parameters say so (the others pass through unchanged, bit for bit).

albumentations works on uint8 and saturates after each transform; so do these (clamp to [0, 255]), in float: the
only rounding is the final one to uint8 (the gamma table's floor is kept, since it shifts the mean by half a level).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hpc_drseg.data.device_augment.params import Params

# albumentations' GaussianBlur(blur_limit=(3, 3), sigma=PAPER_BLUR_SIGMA) samples exp(-x²/2σ²) at -1, 0, 1:
# exp(-ln 2) = 1/2, so the taps are exactly [1, 2, 1] / 4 along each axis (data/augment.py says why that sigma).
_BLUR_TAPS = (0.25, 0.5, 0.25)


@functools.lru_cache(maxsize=8)
def _blur_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, 3, 3) outer product of the taps, made once per device (no host-to-device copy per batch)."""
    taps = torch.tensor(_BLUR_TAPS, dtype=dtype)
    return (taps[:, None] * taps[None, :])[None, None].to(device)


def apply_photometric(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Colour, then noise, then blur (the pipeline's order)."""
    image = colour(image, params)
    image = noise(image, params)
    return blur(image, params.blur)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def colour(image: torch.Tensor, params: Params) -> torch.Tensor:
    """The OneOf colour block: each sample gets the member its `colour` choice names (-1: unchanged)."""
    choice = _per_sample(params.colour)
    out = torch.where(choice == 0, brightness_contrast(image, params.contrast, params.brightness), image)
    out = torch.where(choice == 1, gamma(image, params.gamma), out)
    return torch.where(choice == 2, shift_hsv(image, params.hsv_shift), out)


def brightness_contrast(image: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """RandomBrightnessContrast (brightness_by_max): x·alpha + beta, beta already on the 0-255 scale."""
    return (image * _per_sample(alpha) + _per_sample(beta)).clamp_(0.0, 255.0)


def gamma(image: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RandomGamma: 255·(x/255)^gamma, truncated as albumentations' uint8 lookup table is (astype(uint8))."""
    return torch.floor((image / 255.0).clamp(0.0, 1.0).pow(_per_sample(value)) * 255.0)


def shift_hsv(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """HueSaturationValue: hue turned by shift[:, 0] OpenCV units (2 degrees each), saturation (on 0-255) and value
    shifted and saturated; grey pixels (saturation 0) stay grey, as albumentations keeps them."""
    red, green, blue = image.unbind(dim=1)
    value, _ = image.max(dim=1)
    low, _ = image.min(dim=1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == red,
        ((green - blue) / safe).remainder(6.0),
        torch.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))  # sextants, 0..6
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))  # 0 where value is 0 (chroma is)
    hue = (hue + shift[:, 0, None, None] / 30.0).remainder(6.0)  # 2 degrees per unit, 60 degrees per sextant
    shifted = (saturation * 255.0 + shift[:, 1, None, None]).clamp(0.0, 255.0) / 255.0
    saturation = torch.where(saturation > 0, shifted, saturation)
    value = (value + shift[:, 2, None, None]).clamp(0.0, 255.0)
    # HSV → RGB: channel n is V - V·S·clamp(min(k, 4 - k), 0, 1) with k = (n + H) mod 6, n = 5, 3, 1 for R, G, B
    offsets = torch.arange(5.0, 0.0, -2.0, device=image.device, dtype=image.dtype)[None, :, None, None]  # 5, 3, 1
    k = (offsets + hue[:, None]).remainder(6.0)
    weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value[:, None] - (value * saturation)[:, None] * weight


def noise(image: torch.Tensor, params: Params) -> torch.Tensor:
    """GaussNoise (per pixel and channel): + std · N(0, 1) on the 0-255 scale, std = 0 where it does not fire. The
    noise is truncated to whole levels as albumentations adds it to uint8 images (its effective std is ~0.4 level
    below the drawn one: 4.7 rather than 5.1 on average; the tests compare them)."""
    if params.noise is None:
        return image
    noisy = (image + torch.trunc(_per_sample(params.noise_std) * params.noise)).clamp_(0.0, 255.0)
    return torch.where(_per_sample(params.noise_std) > 0, noisy, image)


def blur(image: torch.Tensor, fires: torch.Tensor) -> torch.Tensor:
    """GaussianBlur 3×3, [1, 2, 1]/4 per axis, border mirrored without repeating the edge (OpenCV's default
    BORDER_REFLECT_101 = torch's 'reflect' padding), where `fires`."""
    kernel = _blur_kernel(image.device, image.dtype).expand(image.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), kernel, groups=image.shape[1])
    return torch.where(_per_sample(fires), blurred, image)
