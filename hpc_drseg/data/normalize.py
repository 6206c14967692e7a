"""On-device ImageNet normalisation of uint8 batches, shared by training, evaluation and prediction.

Kept apart from data/augment.py so that `drseg eval` and `drseg predict` never import albumentations.
"""

from __future__ import annotations

import torch

from hpc_drseg.constants import IMAGENET_MEAN, IMAGENET_STD
from hpc_drseg.errors import InputError


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 on any device -> float32 ImageNet-normalised, in the input's memory format."""
    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[1] != 3:
        raise InputError(
            f"normalize expects a (B, 3, H, W) uint8 tensor; got {tuple(image.shape)} {image.dtype} "
            "(normalise once, on the raw batch)"
        )
    # (x/255 - mean)/std folded into one subtract and one multiply on the 0-255 scale.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) * 255.0)
    return (image.to(torch.float32) - mean) * inv_std
