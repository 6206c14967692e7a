"""The combined loss of Attention-DeepLab (Jithesh et al., ICMLA 2025, eq. 1): L = w_dice·Dice + w_bce·BCE +
w_focal·Focal + w_boundary·Boundary, plus the weighted aux-head loss, as an nn.Module built from the config.

Built for the training step: constants are buffers made once, the mask's maps are computed once per batch without
autograd, the four terms share one log-sigmoid, and the forward never reads a device value back to the host, so the
GPU never waits for the CPU and torch.compile traces it in one graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_drseg.config import LossConfig
from hpc_drseg.config.choices import BOUNDARY_MODES, BoundaryMode
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError
from hpc_drseg.losses.terms import (
    PIXEL_DIMS,
    autocast_off,
    bce_weight_map,
    boundary_weight_of_mask,
    check_pair,
    check_pos_weight,
    dice_from_probs,
    focal_alpha_map,
    focal_from_log_pt,
    label_sign,
    lesion_mask,
    signed_log_sigmoid,
    sobel_kernels,
    weighted_nll,
)

_DEFAULTS = LossConfig()
TERMS: tuple[str, ...] = ("dice", "bce", "focal", "boundary")
# read-only: a default argument shared by every CombinedLoss() must not be mutable
_DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(dataclasses.asdict(_DEFAULTS.weights))


class MaskMaps(NamedTuple):
    """What the loss needs from the mask alone, (B, C, H, W) fp32 maps unless noted; shared by the main and aux
    heads. A NamedTuple, so torch.compile traces it without a graph break."""

    mask: Tensor  # 0/1 labels
    mask_sum: Tensor  # (C,): Σy per channel, for Dice
    sign: Tensor  # ±1
    alpha_t: Tensor  # focal α_t
    bce_weight: Optional[Tensor]  # pos_weight on lesion pixels, 1 elsewhere; None without pos_weight
    boundary_weight: Tensor  # eq. (5)-(6) weight


class CombinedLoss(nn.Module):
    """L = Σ w_t · mean_c(term_t) over the four terms (paper eq. 1), plus aux_weight · L(aux_logits) when given.

    forward returns (total, logs): total is the differentiable fp32 scalar; logs holds detached fp32 scalars:
    "dice", "bce", "focal", "boundary" (unweighted channel means), "aux" (the aux head's combined loss before
    aux_weight, when given) and "total"; with per_lesion=True also "<term>/<lesion>", e.g. "dice/MA".

    Every argument defaults to the config's default (`LossConfig()`, the paper's values), so `CombinedLoss()` is the
    paper's loss and equals `build_loss(LossConfig())`. Move it to the logits' device (`.to(device)`) and keep it in
    fp32: its constants are buffers.
    """

    pos_weight: Optional[Tensor]
    sobel_kernels: Tensor

    def __init__(
        self,
        weights: Mapping[str, float] = _DEFAULT_WEIGHTS,
        focal_alpha: float = _DEFAULTS.focal_alpha,
        focal_gamma: float = _DEFAULTS.focal_gamma,
        boundary_theta: float = _DEFAULTS.boundary_theta,
        boundary_mode: BoundaryMode = _DEFAULTS.boundary_mode,
        pos_weight: Optional[Sequence[float]] = _DEFAULTS.pos_weight,
        dice_eps: float = _DEFAULTS.dice_eps,
        aux_weight: float = _DEFAULTS.aux_weight,
    ) -> None:
        super().__init__()
        if set(weights) != set(TERMS):
            raise InputError(f"loss.weights: got keys {sorted(weights)}; give exactly {list(TERMS)}")
        if boundary_mode not in BOUNDARY_MODES:
            raise InputError(f"loss.boundary_mode: got {boundary_mode!r}; choose one of {list(BOUNDARY_MODES)}")
        # Python floats, read at every call (a test may change one on a live loss): no device tensor involved.
        self.weights = {name: float(weights[name]) for name in TERMS}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.boundary_theta, self.boundary_mode = boundary_theta, boundary_mode
        self.dice_eps, self.aux_weight = dice_eps, aux_weight
        # Validated here, once, on the host; buffers follow .to(device) and, not persistent, stay out of checkpoints.
        pw = None if pos_weight is None else torch.tensor(check_pos_weight(pos_weight), dtype=torch.float32)
        self.register_buffer("pos_weight", pw, persistent=False)
        self.register_buffer("sobel_kernels", sobel_kernels(len(LESIONS)), persistent=False)

    def mask_maps(self, target: Tensor) -> MaskMaps:
        """The mask's per-pixel maps, once per batch and without autograd: the mask is cast to fp32 once."""
        with torch.no_grad(), autocast_off(target):
            lesion = lesion_mask(target)
            mask = lesion.float()
            theta, mode = self.boundary_theta, self.boundary_mode
            return MaskMaps(
                mask=mask,
                mask_sum=mask.sum(PIXEL_DIMS),
                sign=label_sign(lesion),
                alpha_t=focal_alpha_map(lesion, self.focal_alpha),
                bce_weight=None if self.pos_weight is None else bce_weight_map(lesion, self.pos_weight),
                boundary_weight=boundary_weight_of_mask(mask, self.sobel_kernels, theta, mode),
            )

    def head_terms(self, logits: Tensor, maps: MaskMaps) -> dict[str, Tensor]:
        """Each term per lesion for one head's logits, {name: (4,) fp32 tensor}, with gradients; call with autocast
        off. Dice uses sigmoid(logits), the other three share log p_t = logsigmoid(±logits)."""
        x = logits.float()
        z, log_pt = signed_log_sigmoid(x, maps.sign)
        return {
            "dice": dice_from_probs(torch.sigmoid(x), maps.mask, maps.mask_sum, self.dice_eps),
            "bce": weighted_nll(log_pt, maps.bce_weight),
            "focal": focal_from_log_pt(z, log_pt, maps.alpha_t, self.focal_gamma),
            "boundary": weighted_nll(log_pt, maps.boundary_weight),
        }

    def terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each term per lesion, {name: (4,) fp32 tensor}, with gradients."""
        check_pair(logits, target)
        with autocast_off(logits):
            return self.head_terms(logits, self.mask_maps(target))

    def _weighted(self, means: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * means[name] for name in TERMS)  # type: ignore[return-value]

    def forward(
        self, logits: Tensor, target: Tensor, aux_logits: Optional[Tensor] = None, per_lesion: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        check_pair(logits, target)
        with autocast_off(logits):
            maps = self.mask_maps(target)
            terms = self.head_terms(logits, maps)
            means = {name: value.mean() for name, value in terms.items()}
            total = self._weighted(means)
            logs = {name: value.detach() for name, value in means.items()}
            if per_lesion:
                for name, value in terms.items():
                    logs.update({f"{name}/{lesion}": v for lesion, v in zip(LESIONS, value.detach())})
            if aux_logits is not None:
                aux_terms = self.head_terms(_resize_aux(aux_logits, target), maps)
                aux = self._weighted({name: value.mean() for name, value in aux_terms.items()})
                total = total + self.aux_weight * aux
                logs["aux"] = aux.detach()
        logs["total"] = total.detach()
        return total, logs


def _resize_aux(aux_logits: Tensor, target: Tensor) -> Tensor:
    """Aux-head logits (B, 4, h, w) → fp32 at the target's H×W (bilinear), as the main head's output."""
    if aux_logits.ndim != 4 or aux_logits.shape[:2] != target.shape[:2]:
        raise InputError(
            f"loss: aux_logits {tuple(aux_logits.shape)} must be (B, {len(LESIONS)}, h, w) with the batch and "
            f"channels of target {tuple(target.shape)}"
        )
    aux = aux_logits.float()
    if aux.shape[-2:] != target.shape[-2:]:
        with autocast_off(aux):
            aux = F.interpolate(aux, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return aux


def build_loss(cfg: LossConfig) -> CombinedLoss:
    """The combined loss described by `cfg` (config section `loss`)."""
    return CombinedLoss(
        weights=dataclasses.asdict(cfg.weights),
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        boundary_theta=cfg.boundary_theta,
        boundary_mode=cfg.boundary_mode,
        pos_weight=cfg.pos_weight,
        dice_eps=cfg.dice_eps,
        aux_weight=cfg.aux_weight,
    )
