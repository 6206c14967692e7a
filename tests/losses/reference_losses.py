"""FROZEN reference: the loss as it was before the fused rewrite (one function per term, each casting the mask and
rebuilding its constants), kept verbatim so the parity tests can compare the package's loss with it. Do not edit:
a change here hides a change of the package's values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_drseg.config import LossConfig
from hpc_drseg.config.choices import BOUNDARY_MODES, BoundaryMode
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError

_DEFAULTS = LossConfig()  # paper constants live only in the config dataclass
TERMS: tuple[str, ...] = ("dice", "bce", "focal", "boundary")
# read-only: a default argument shared by every CombinedLoss() must not be mutable
_DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(dataclasses.asdict(_DEFAULTS.weights))

# ε inside eq. (6)'s sqrt: a flat region gets ‖∇T‖ = sqrt(ε) = 1e-3, i.e. paper weight exp(−1.5e-3) ≈ 0.9985.
# (The paper's code used 1e-8, i.e. 1e-4 and a flat weight of 0.99985: a 0.1 % difference in the term.)
SOBEL_EPS = 1e-6
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------------- helpers
def _check_pair(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or logits.shape != target.shape or logits.shape[1] != len(LESIONS):
        raise InputError(
            f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} must both be "
            f"(B, {len(LESIONS)}, H, W), one channel per lesion {LESIONS}"
        )


def _as_float_target(target: Tensor) -> Tensor:
    """Bool/integer masks: any value > 0 is lesion (so 0/255 masks work); float masks are taken as 0/1 values."""
    if target.dtype.is_floating_point:
        return target.float()
    return (target > 0).float()


def _fp32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Checks shapes, casts logits to fp32 and target to a float mask, and turns autocast off (the Sobel conv would
    otherwise run in bf16/fp16)."""

    @functools.wraps(fn)
    def wrapper(logits: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        _check_pair(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return fn(logits.float(), _as_float_target(target), *args, **kwargs)

    return wrapper


def _channel_mean(per_pixel: Tensor) -> Tensor:
    """(B, C, H, W) → (C,): mean over batch and pixels."""
    return per_pixel.mean(dim=(0, 2, 3))


def _pos_weight_tensor(pos_weight: Optional[Sequence[float] | Tensor], like: Tensor) -> Optional[Tensor]:
    if pos_weight is None:
        return None
    pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=like.device).flatten()
    if pw.numel() != len(LESIONS) or bool((pw < 0).any()):
        raise InputError(
            f"loss.pos_weight: got {pw.tolist()}; give {len(LESIONS)} non-negative values, one per lesion {LESIONS} "
            "(paper code: [4, 1, 1.5, 2])"
        )
    return pw.view(1, -1, 1, 1)


def _bce_map(logits: Tensor, target: Tensor, pos_weight: Optional[Tensor] = None) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")


# ---------------------------------------------------------------------------------------------------- the terms
@_fp32
def dice_loss(logits: Tensor, target: Tensor, eps: float = _DEFAULTS.dice_eps) -> Tensor:
    """Soft Dice (eq. 3-4) per channel over the whole batch: 1 − (2·Σp·y + ε) / (Σp + Σy + ε), p = sigmoid(logits).

    Summing over the batch (not averaging per image) keeps images without a lesion from scoring 1 each.
    Returns (4,) fp32."""
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * intersection + eps) / (denominator + eps)


@_fp32
def bce_loss(logits: Tensor, target: Tensor, pos_weight: Optional[Sequence[float] | Tensor] = None) -> Tensor:
    """Binary cross-entropy with logits (eq. 1), mean over batch and pixels; optional per-lesion positive weights
    (length 4, LESIONS order) multiply the loss of lesion pixels. Returns (4,) fp32."""
    return _channel_mean(_bce_map(logits, target, _pos_weight_tensor(pos_weight, logits)))


@_fp32
def focal_loss(
    logits: Tensor, target: Tensor, alpha: float = _DEFAULTS.focal_alpha, gamma: float = _DEFAULTS.focal_gamma
) -> Tensor:
    """Focal loss (Lin et al. 2017; eq. 2): −α_t (1 − p_t)^γ log p_t, α_t = α on lesion pixels and 1 − α elsewhere;
    mean over batch and pixels. Returns (4,) fp32.

    With z = ±logit (sign of the label), log p_t = logsigmoid(z) and log(1 − p_t) = logsigmoid(−z): no probability is
    ever formed or clamped, so logits of ±100 give the exact limits (0 when right, α_t·|z| when wrong)."""
    sign = 2.0 * target - 1.0  # binary target: +1 lesion, −1 background
    z = sign * logits
    log_pt = F.logsigmoid(z)
    modulator = torch.exp(gamma * F.logsigmoid(-z))  # (1 − p_t)^γ; exactly 1 when γ = 0
    alpha_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    return _channel_mean(-alpha_t * modulator * log_pt)


def mask_gradient_magnitude(target: Tensor, eps: float = SOBEL_EPS) -> Tensor:
    """‖∇T‖ of eq. (6): sqrt(Sobel_x(T)² + Sobel_y(T)² + ε) per channel (depthwise 3×3 conv, zero padding).

    Zero padding treats the outside of the image as background, so lesion pixels on the image border count as edges.
    (B, C, H, W) → (B, C, H, W) fp32, no gradient."""
    mask = _as_float_target(target).detach()
    channels = mask.shape[1]
    kx = torch.tensor(_SOBEL_X, dtype=torch.float32, device=mask.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3): x then y per channel
    with torch.autocast(device_type=mask.device.type, enabled=False):
        grads = F.conv2d(mask, kernels, padding=1, groups=channels)  # (B, 2C, H, W)
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return torch.sqrt(gx.square() + gy.square() + eps)


def boundary_weight(
    target: Tensor, theta: float = _DEFAULTS.boundary_theta, mode: BoundaryMode = "paper", eps: float = SOBEL_EPS
) -> Tensor:
    """Per-pixel weight of the boundary term, (B, C, H, W) fp32.

    - "paper": exp(−θ·‖∇T‖), eq. (5) exactly as printed. It is ≈1 in flat regions and *smaller* next to lesion edges
      (exp(−1.5·2) ≈ 0.05 beside a single-pixel lesion), i.e. it de-emphasises boundaries, contrary to the paper's
      prose ("regions with higher gradient magnitudes ... receive more attention"). The default, because the
      published numbers were trained with it (the paper's code does the same).
    - "edge_emphasis": 2 − exp(−θ·‖∇T‖), the behaviour the prose describes: ≈1 in flat regions, rising towards 2 at
      edges; bounded in [1, 2), so the term's scale stays comparable with BCE whatever θ is.
    """
    if mode not in BOUNDARY_MODES:
        raise InputError(f"loss.boundary_mode: got {mode!r}; choose one of {list(BOUNDARY_MODES)}")
    decay = torch.exp(-theta * mask_gradient_magnitude(target, eps))
    return decay if mode == "paper" else 2.0 - decay


@_fp32
def boundary_loss(
    logits: Tensor,
    target: Tensor,
    theta: float = _DEFAULTS.boundary_theta,
    mode: BoundaryMode = "paper",
    eps: float = SOBEL_EPS,
) -> Tensor:
    """Boundary loss (eq. 5-6): per-pixel BCE × boundary_weight(target), mean over batch and pixels. Returns (4,).

    The per-pixel BCE is unweighted (no pos_weight), as in the paper's code: pos_weight changes only the BCE term."""
    return _channel_mean(_bce_map(logits, target) * boundary_weight(target, theta, mode, eps))


# ------------------------------------------------------------------------------------------------ combined module
class CombinedLoss(nn.Module):
    """L = Σ w_t · mean_c(term_t) over the four terms (paper eq. 1), plus aux_weight · L(aux_logits) when given.

    forward returns (total, logs): total is the differentiable fp32 scalar; logs holds detached fp32 scalars:
    "dice", "bce", "focal", "boundary" (unweighted channel means), "aux" (the aux head's combined loss before
    aux_weight, when given) and "total"; with per_lesion=True also "<term>/<lesion>", e.g. "dice/MA".

    Every argument defaults to the config's default (`LossConfig()`, the paper's values), so `CombinedLoss()` is the
    paper's loss and equals `build_loss(LossConfig())`.
    """

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
        self.weights = {name: float(weights[name]) for name in TERMS}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.boundary_theta, self.boundary_mode = boundary_theta, boundary_mode
        self.dice_eps, self.aux_weight = dice_eps, aux_weight
        pw = _pos_weight_tensor(pos_weight, torch.empty(0))
        # A buffer follows .to(device); not persistent, so checkpoints of the loss (if any) carry no config.
        self.register_buffer("pos_weight", None if pw is None else pw.flatten(), persistent=False)

    def terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each term per lesion, {name: (4,) fp32 tensor}, with gradients."""
        return {
            "dice": dice_loss(logits, target, eps=self.dice_eps),
            "bce": bce_loss(logits, target, pos_weight=self.pos_weight),
            "focal": focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma),
            "boundary": boundary_loss(logits, target, theta=self.boundary_theta, mode=self.boundary_mode),
        }

    def _weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * terms[name].mean() for name in TERMS)  # type: ignore[return-value]

    def forward(
        self, logits: Tensor, target: Tensor, aux_logits: Optional[Tensor] = None, per_lesion: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.terms(logits, target)
        total = self._weighted(terms)
        logs = {name: value.detach().mean() for name, value in terms.items()}
        if per_lesion:
            for name, value in terms.items():
                logs.update({f"{name}/{lesion}": v for lesion, v in zip(LESIONS, value.detach())})
        if aux_logits is not None:
            aux = self._weighted(self.terms(_resize_aux(aux_logits, target), target))
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
        with torch.autocast(device_type=aux.device.type, enabled=False):
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
