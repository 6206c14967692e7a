"""DeviceAugment: the paper's augmentation of a whole batch on the training device, from uint8 images and bit-packed
masks to the uint8 channels-last Batch layout the trainer normalises (data/samples.py)."""

from __future__ import annotations

from typing import Optional

import torch

from hpc_drseg.config import AugmentConfig
from hpc_drseg.data.device_augment.geometry import Geometry
from hpc_drseg.data.device_augment.params import Params, Probabilities, draw_params, probabilities
from hpc_drseg.data.device_augment.photometric import apply_photometric
from hpc_drseg.data.samples import channels_last_view
from hpc_drseg.errors import InputError

_BITS = 4  # one bit per lesion in a packed mask (data/encoding.py pack_masks)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 with bit i = lesion i → (B, 4, H, W) uint8 0/1, channels-last memory."""
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=packed.device)
    return channels_last_view((packed[..., None] >> shifts) & 1)


class DeviceAugment:
    """`(image (B, H, W, 3) uint8, packed mask (B, H, W) uint8, generator) -> (image (B, 3, H, W) uint8, mask
    (B, 4, H, W) uint8 0/1)`, both channels-last, on the device the inputs are on.

    Parameters come from `generator` alone (draw_params), so a batch is a function of its seed. `apply` takes them
    explicitly (the tests compare single transforms with albumentations' through it).
    """

    def __init__(self, probs: Probabilities, image_px: int, device: torch.device, border: str = "reflect_101") -> None:
        self.probs, self.image_px = probs, image_px
        self.geometry = Geometry(image_px, device, border)
        # Photometric steps that can never fire (preset 'light') are skipped: the same output, less work.
        self.photometric = probs.colour > 0 or probs.noise > 0 or probs.blur > 0

    def __call__(
        self, image: torch.Tensor, packed: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(image, packed)
        return self.apply(image, packed, draw_params(self.probs, image.shape[0], self.image_px, generator))

    def apply(self, image: torch.Tensor, packed: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """One grid_sample for every geometric transform (bilinear image, nearest mask), then colour, noise and blur;
        rounded once to uint8."""
        picture = channels_last_view(image).to(torch.float32)
        planes = packed[:, None].to(torch.float32)
        picture, planes = self.geometry.warp(picture, planes, params)
        if self.photometric:
            picture = apply_photometric(picture, params)
        out = picture.round_().clamp_(0.0, 255.0).to(torch.uint8, memory_format=torch.channels_last)
        return out, unpack(planes[:, 0].round().to(torch.uint8))

    def _check(self, image: torch.Tensor, packed: torch.Tensor) -> None:
        side = self.image_px
        if image.shape[1:] != (side, side, 3) or packed.shape != (image.shape[0], side, side):
            raise InputError(
                f"device augment expects images (B, {side}, {side}, 3) and packed masks (B, {side}, {side}); got "
                f"{tuple(image.shape)} and {tuple(packed.shape)}: set data.image_px to the shards' image_px"
            )


def build_device_augment(cfg: AugmentConfig, image_px: int, device: torch.device) -> Optional[DeviceAugment]:
    """The preset named by `cfg` on `device`, or None when nothing would be applied (as build_augment)."""
    if image_px <= 0:
        raise InputError(f"image_px: got {image_px}; it must be > 0 (data.image_px)")
    probs = probabilities(cfg)
    return None if probs.none else DeviceAugment(probs, image_px, torch.device(device), cfg.border)
