"""On-device ImageNet normalisation of uint8 batches, shared by training, evaluation and prediction.

Kept apart from data/augment.py so that `drseg eval` and `drseg predict` never import albumentations.
"""

from __future__ import annotations

import functools

import torch

from hpc_drseg.constants import IMAGENET_MEAN, IMAGENET_STD
from hpc_drseg.errors import InputError


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) on the 0-255 scale as (1, 3, 1, 1) float32 tensors on `device`, made once per device: building
    them per call would be a host-to-device copy every step."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return mean.to(device), inv_std.to(device)


def normalize(image: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) uint8 on any device, in either memory layout -> ImageNet-normalised `dtype`, channels-last memory
    if `channels_last` else contiguous NCHW.

    (x/255 - mean)/std is folded into one subtract and one multiply on the 0-255 scale, in float32 (the cast to
    float32 also makes the layout, so a channels-last input costs no separate transpose); the result is cast to
    `dtype` last, so a bf16/fp16 input is the float32 value rounded once.
    """
    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[1] != 3:
        raise InputError(
            f"normalize expects a (B, 3, H, W) uint8 tensor; got {tuple(image.shape)} {image.dtype} "
            "(normalise once, on the raw batch)"
        )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    mean, inv_std = _constants(image.device)
    out = image.to(dtype=torch.float32, memory_format=layout).sub_(mean).mul_(inv_std)
    return out if dtype == torch.float32 else out.to(dtype)
