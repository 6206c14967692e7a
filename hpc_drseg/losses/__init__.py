"""Loss of Attention-DeepLab (Jithesh et al., ICMLA 2025, eq. 1-6): the four terms as functions of (logits, target)
in `terms`, their weighted combination as the module built from the config in `combined`."""

from hpc_drseg.losses.combined import TERMS, CombinedLoss, MaskMaps, build_loss
from hpc_drseg.losses.terms import (
    SOBEL_EPS,
    bce_loss,
    boundary_loss,
    boundary_weight,
    dice_loss,
    focal_loss,
    mask_gradient_magnitude,
)

__all__ = [
    "SOBEL_EPS",
    "TERMS",
    "CombinedLoss",
    "MaskMaps",
    "bce_loss",
    "boundary_loss",
    "boundary_weight",
    "build_loss",
    "dice_loss",
    "focal_loss",
    "mask_gradient_magnitude",
]
