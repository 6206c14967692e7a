"""Per-batch building blocks of the metrics: input checks, TP/FP/FN counts, IoU and Dice from counts, exact AP.

Threshold rule, everywhere: a pixel is predicted positive iff `prob > threshold` (as the DDR evaluation code does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError

# Thresholds of the standard protocol's 11-point AUPR (DDR evaluation code: np.linspace(0, 1, 11), `prob > t`).
AUPR_THRESHOLDS: tuple[float, ...] = tuple(k / 10 for k in range(11))


# ------------------------------------------------------------------------------------------------- input checks
def check_inputs(probs: Tensor, target: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """Validates a (B, 4, H, W) pair; returns (float32 probs, bool target).

    Scores are compared in float32 (half types upcast exactly; float64 is rounded), so both protocols and every
    threshold see the same values. Integer/bool masks: > 0 is lesion (DDR's masks); float masks must hold only 0 and 1.
    """
    shape = (len(probs.shape) == 4) and probs.shape[1] == len(LESIONS)
    if not shape or probs.shape != target.shape:
        raise InputError(
            f"{where}: probs {tuple(probs.shape)} and target {tuple(target.shape)} must both be "
            f"(B, {len(LESIONS)}, H, W), one channel per lesion {LESIONS}; resize probs to the mask size first"
        )
    if not probs.dtype.is_floating_point:
        raise InputError(f"{where}: probs must be a floating-point tensor, got {probs.dtype}; pass sigmoid(logits)")
    probs = probs.detach().float()
    if probs.numel() == 0:
        raise InputError(f"{where}: empty batch {tuple(probs.shape)}; every update needs at least one pixel")
    lo, hi = torch.aminmax(probs)
    if not (lo.item() >= 0.0 and hi.item() <= 1.0):  # NaN fails both comparisons
        raise InputError(
            f"{where}: probs must lie in [0, 1], got min {lo.item():.4g}, max {hi.item():.4g}; "
            "pass sigmoid(logits), not logits (and check for NaN)"
        )
    return probs, _as_bool_target(target.detach(), where)


def _as_bool_target(target: Tensor, where: str) -> Tensor:
    if target.dtype == torch.bool:
        return target
    if not target.dtype.is_floating_point:
        return target > 0
    if not bool(((target == 0) | (target == 1)).all()):
        raise InputError(f"{where}: a float target must hold only 0 and 1 (binary masks); threshold soft masks first")
    return target > 0.5


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"eval.threshold: got {threshold}; use a probability in [0, 1] (paper: 0.5)")
    return float(threshold)


# ------------------------------------------------------------------------------------------ functional: counts
def confusion_counts(probs: Tensor, target: Tensor, threshold: float) -> Tensor:
    """(B, C, H, W) float probs + bool target → (C, 3) int64 [TP, FP, FN] per channel, pred = probs > threshold."""
    rows = []
    for c in range(probs.shape[1]):  # count_nonzero per channel: ≈5× faster than bool.sum over dims (0, 2, 3)
        pred, truth = probs[:, c] > threshold, target[:, c]
        tp = torch.count_nonzero(pred & truth)
        rows.append(torch.stack([tp, torch.count_nonzero(pred) - tp, torch.count_nonzero(truth) - tp]))
    return torch.stack(rows)


def iou_from_counts(counts: Tensor) -> Tensor:
    """(C, 3) [TP, FP, FN] → (C,) float64 IoU = TP / (TP + FP + FN); 1 where prediction and truth are both empty."""
    tp, fp, fn = counts.double().unbind(-1)
    union = tp + fp + fn
    return torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))


def dice_from_counts(counts: Tensor) -> Tensor:
    """(C, 3) [TP, FP, FN] → (C,) float64 Dice = 2TP / (2TP + FP + FN); 1 where both are empty."""
    tp, fp, fn = counts.double().unbind(-1)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(tp))


def average_precision(scores: Tensor, target: Tensor) -> Tensor:
    """Exact step-wise AP along the last dim of (C, N) scores / bool target → (C,) float64; NaN where no positive.

    sklearn's definition: AP = Σ_n (R_n − R_{n−1}) P_n over the distinct scores, highest first; tied scores form one
    threshold. Each tie group's ΔTP is weighted by the precision at the group's last (lowest-ranked) pixel.
    """
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    tps = torch.gather(target, -1, order).long().cumsum(-1)
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_end[..., :-1] = sorted_scores[..., 1:] != sorted_scores[..., :-1]
    tps_at_end = torch.where(group_end, tps, torch.zeros_like(tps))
    # tps never decreases, so a running max of the group-end values is "TP count at the previous group end".
    prev_end = torch.nn.functional.pad(torch.cummax(tps_at_end, -1).values[..., :-1], (1, 0))
    delta_tp = torch.where(group_end, tps - prev_end, torch.zeros_like(tps)).double()
    rank = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=torch.float64)
    return (delta_tp * tps.double() / rank).sum(-1) / tps[..., -1].double()
