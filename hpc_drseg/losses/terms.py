"""Loss terms of Attention-DeepLab (Jithesh et al., ICMLA 2025, eq. 1-6) as functions of (logits, target): Dice, BCE,
focal and the Sobel boundary loss, each a (C,) = (4,) fp32 tensor (one value per lesion in LESIONS order), plus the
per-pixel pieces they share, which CombinedLoss computes once per batch. All in fp32 from logits with autocast off.

Masks are binary: any value > 0 is lesion, whatever the dtype (0/1 or 0/255, uint8, bool or float).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hpc_drseg.config import LossConfig
from hpc_drseg.config.choices import BOUNDARY_MODES, BoundaryMode
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError

_DEFAULTS = LossConfig()  # paper constants live only in the config dataclass
PIXEL_DIMS = (0, 2, 3)  # (B, C, H, W) → (C,): batch and pixels

# ε inside eq. (6)'s sqrt: a flat region gets ‖∇T‖ = sqrt(ε) = 1e-3, i.e. paper weight exp(−1.5e-3) ≈ 0.9985.
# (The paper's code used 1e-8, i.e. 1e-4 and a flat weight of 0.99985: a 0.1 % difference in the term.)
SOBEL_EPS = 1e-6
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------- inputs, constants
def check_pair(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or logits.shape != target.shape or logits.shape[1] != len(LESIONS):
        raise InputError(
            f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} must both be "
            f"(B, {len(LESIONS)}, H, W), one channel per lesion {LESIONS}"
        )


def autocast_off(like: Tensor) -> torch.autocast:
    """Autocast off on `like`'s device: the Sobel conv and the reductions would otherwise run in bf16/fp16."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def lesion_mask(target: Tensor) -> Tensor:
    """(B, C, H, W) bool, no gradient: any value > 0 is lesion (0/1 and 0/255 masks of any dtype)."""
    return target.detach() > 0


def sobel_kernels(channels: int = len(LESIONS)) -> Tensor:
    """(2C, 1, 3, 3) fp32 on the CPU: Sobel x then y for each channel, for a depthwise conv with groups=C."""
    kx = torch.tensor(_SOBEL_X, dtype=torch.float32)
    return torch.stack([kx, kx.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)


def check_pos_weight(pos_weight: Sequence[float]) -> list[float]:
    """Validated per-lesion positive weights as Python floats (host-side: no device tensor is read)."""
    values = [float(v) for v in pos_weight]
    if len(values) != len(LESIONS) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(
            f"loss.pos_weight: got {values}; give {len(LESIONS)} non-negative values, one per lesion {LESIONS} "
            "(paper code: [4, 1, 1.5, 2])"
        )
    return values


def _pos_weight_tensor(pos_weight: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """(C,) fp32 on `like`'s device. A tensor is checked by size only: reading its values would wait for the device."""
    if isinstance(pos_weight, Tensor):
        if pos_weight.numel() != len(LESIONS):
            raise InputError(f"loss.pos_weight: got {pos_weight.numel()} values; give {len(LESIONS)}, one per lesion")
        return pos_weight.detach().to(device=like.device, dtype=torch.float32).flatten()
    return torch.tensor(check_pos_weight(pos_weight), dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------------- per-pixel maps of the mask alone
# Built from the bool lesion mask without autograd; with binary labels each is one `where` of exact constants.
def label_sign(lesion: Tensor) -> Tensor:
    """+1 on lesion pixels, −1 elsewhere: z = sign·logit makes log p_t = logsigmoid(z)."""
    return torch.where(lesion, 1.0, -1.0)


def focal_alpha_map(lesion: Tensor, alpha: float) -> Tensor:
    """α_t: α on lesion pixels, 1 − α elsewhere."""
    return torch.where(lesion, alpha, 1.0 - alpha)


def bce_weight_map(lesion: Tensor, pos_weight: Tensor) -> Tensor:
    """pos_weight[c] on lesion pixels of channel c, 1 elsewhere (torch's pos_weight, for binary labels)."""
    return torch.where(lesion, pos_weight.view(1, -1, 1, 1), 1.0)


def sobel_magnitude(mask: Tensor, kernels: Tensor, eps: float = SOBEL_EPS) -> Tensor:
    """‖∇T‖ of an fp32 0/1 mask (B, C, H, W): sqrt(Sobel_x² + Sobel_y² + ε) per channel, zero padding."""
    batch, channels, height, width = mask.shape
    grads = F.conv2d(mask, kernels, padding=1, groups=channels)  # (B, 2C, H, W): x then y per channel
    squares = grads.square().view(batch, channels, 2, height, width).sum(dim=2)
    return squares.add_(eps).sqrt_()


def boundary_weight_of_mask(
    mask: Tensor, kernels: Tensor, theta: float, mode: BoundaryMode, eps: float = SOBEL_EPS
) -> Tensor:
    """boundary_weight for an fp32 0/1 mask and prebuilt Sobel kernels (see boundary_weight)."""
    if mode not in BOUNDARY_MODES:
        raise InputError(f"loss.boundary_mode: got {mode!r}; choose one of {list(BOUNDARY_MODES)}")
    decay = sobel_magnitude(mask, kernels, eps).mul_(-theta).exp_()
    return decay if mode == "paper" else 2.0 - decay


def mask_gradient_magnitude(target: Tensor, eps: float = SOBEL_EPS) -> Tensor:
    """‖∇T‖ of eq. (6): sqrt(Sobel_x(T)² + Sobel_y(T)² + ε) per channel (depthwise 3×3 conv, zero padding).

    Zero padding treats the outside of the image as background, so lesion pixels on the image border count as edges.
    (B, C, H, W) → (B, C, H, W) fp32, no gradient. Builds the kernels per call; CombinedLoss keeps them as a buffer."""
    with torch.no_grad(), autocast_off(target):
        kernels = sobel_kernels(target.shape[1]).to(target.device)
        return sobel_magnitude(lesion_mask(target).float(), kernels, eps)


def boundary_weight(
    target: Tensor, theta: float = _DEFAULTS.boundary_theta, mode: BoundaryMode = "paper", eps: float = SOBEL_EPS
) -> Tensor:
    """Per-pixel weight of the boundary term, (B, C, H, W) fp32, no gradient.

    - "paper": exp(−θ·‖∇T‖), eq. (5) exactly as printed. It is ≈1 in flat regions and *smaller* next to lesion edges
      (exp(−1.5·2) ≈ 0.05 beside a single-pixel lesion), i.e. it de-emphasises boundaries, contrary to the paper's
      prose ("regions with higher gradient magnitudes ... receive more attention"). The default, because the
      published numbers were trained with it (the paper's code does the same).
    - "edge_emphasis": 2 − exp(−θ·‖∇T‖), the behaviour the prose describes: ≈1 in flat regions, rising towards 2 at
      edges; bounded in [1, 2), so the term's scale stays comparable with BCE whatever θ is.
    """
    with torch.no_grad(), autocast_off(target):
        kernels = sobel_kernels(target.shape[1]).to(target.device)
        return boundary_weight_of_mask(lesion_mask(target).float(), kernels, theta, mode, eps)


# ------------------------------------------------------------------------ per-channel reductions with gradients
def signed_log_sigmoid(logits: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """(z, log p_t), z = sign·logits: log p_t = logsigmoid(z); −log p_t is the per-pixel BCE of binary labels."""
    z = logits * sign
    return z, F.logsigmoid(z)


def dice_from_probs(probs: Tensor, mask: Tensor, mask_sum: Tensor, eps: float) -> Tensor:
    """1 − (2·Σp·y + ε) / (Σp + Σy + ε) per channel over the whole batch; mask_sum = Σy, (C,)."""
    intersection = (probs * mask).sum(PIXEL_DIMS)
    denominator = probs.sum(PIXEL_DIMS) + mask_sum
    return 1.0 - (2.0 * intersection + eps) / (denominator + eps)


def negative_pixel_mean(per_pixel: Tensor) -> Tensor:
    """−mean over batch and pixels per channel, (C,), as sum / −count: the backward of a sum is a broadcast view,
    where that of mean writes a full-size map."""
    return per_pixel.sum(PIXEL_DIMS) / -(per_pixel.numel() // per_pixel.shape[1])


def weighted_nll(log_pt: Tensor, weight: Optional[Tensor]) -> Tensor:
    """mean(−weight·log p_t) per channel: BCE (weight = pos_weight map or None) and the boundary term."""
    return negative_pixel_mean(log_pt if weight is None else log_pt * weight)


def focal_from_log_pt(z: Tensor, log_pt: Tensor, alpha_t: Tensor, gamma: float) -> Tensor:
    """mean(−α_t (1 − p_t)^γ log p_t) per channel, (1 − p_t)^γ = exp(γ·logsigmoid(−z)), logsigmoid(−z) = log p_t − z.

    No probability is formed or clamped: logits of ±100 give the exact limits (0 when right, α_t·|z| when wrong)."""
    modulator = torch.exp((log_pt - z) * gamma)  # exactly 1 when γ = 0
    return negative_pixel_mean(alpha_t * modulator * log_pt)


# ---------------------------------------------------------------------------------------- the terms, standalone
def _term(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Checks shapes, turns autocast off and hands `fn` fp32 logits and the bool lesion mask (as `target`)."""

    @functools.wraps(fn)
    def wrapper(logits: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        check_pair(logits, target)
        with autocast_off(logits):
            return fn(logits.float(), lesion_mask(target), *args, **kwargs)

    return wrapper


@_term
def dice_loss(logits: Tensor, target: Tensor, eps: float = _DEFAULTS.dice_eps) -> Tensor:
    """Soft Dice (eq. 3-4) per channel over the whole batch: 1 − (2·Σp·y + ε) / (Σp + Σy + ε), p = sigmoid(logits).

    Summing over the batch (not averaging per image) keeps images without a lesion from scoring 1 each.
    Returns (4,) fp32."""
    mask = target.float()
    return dice_from_probs(torch.sigmoid(logits), mask, mask.sum(PIXEL_DIMS), eps)


@_term
def bce_loss(logits: Tensor, target: Tensor, pos_weight: Optional[Sequence[float] | Tensor] = None) -> Tensor:
    """Binary cross-entropy with logits (eq. 1), mean over batch and pixels; optional per-lesion positive weights
    (length 4, LESIONS order) multiply the loss of lesion pixels. Returns (4,) fp32."""
    weight = None if pos_weight is None else bce_weight_map(target, _pos_weight_tensor(pos_weight, logits))
    return weighted_nll(signed_log_sigmoid(logits, label_sign(target))[1], weight)


@_term
def focal_loss(
    logits: Tensor, target: Tensor, alpha: float = _DEFAULTS.focal_alpha, gamma: float = _DEFAULTS.focal_gamma
) -> Tensor:
    """Focal loss (Lin et al. 2017; eq. 2): −α_t (1 − p_t)^γ log p_t, α_t = α on lesion pixels and 1 − α elsewhere;
    mean over batch and pixels. Returns (4,) fp32."""
    z, log_pt = signed_log_sigmoid(logits, label_sign(target))
    return focal_from_log_pt(z, log_pt, focal_alpha_map(target, alpha), gamma)


@_term
def boundary_loss(
    logits: Tensor,
    target: Tensor,
    theta: float = _DEFAULTS.boundary_theta,
    mode: BoundaryMode = "paper",
    eps: float = SOBEL_EPS,
) -> Tensor:
    """Boundary loss (eq. 5-6): per-pixel BCE × boundary_weight(target), mean over batch and pixels. Returns (4,).

    The per-pixel BCE is unweighted (no pos_weight), as in the paper's code: pos_weight changes only the BCE term."""
    weight = boundary_weight(target, theta, mode, eps)
    return weighted_nll(signed_log_sigmoid(logits, label_sign(target))[1], weight)
