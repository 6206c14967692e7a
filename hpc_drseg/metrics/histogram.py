"""Score histograms of the standard protocol: a slot layout that resolves confident models' scores, the counts ranks
sum, and AP / PR points / 11-point AUPR read off them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hpc_drseg.errors import InputError
from hpc_drseg.metrics.functional import AUPR_THRESHOLDS

# --------------------------------------------------------------------------------------- functional: histograms
# The standard protocol's AP is read off score histograms, which ranks can sum. Their slots must resolve the scores of
# confident models: a trained network puts most pixels at logits beyond ±9, which evenly spaced probability bins
# lump into their end bins. A float32 score's bit pattern is monotone in its value and its exponent is a log scale,
# so the slot of p is the top bits of p for p ≤ 0.5 and of 1 − p above (exact in float32), mirrored: a relative
# resolution of 2**-score_bits in p near 0 and in 1 − p near 1, i.e. even in logit over every float32 score.
_FLOAT32_MANTISSA_BITS = 23
_HALF_BITS = 0x3F000000  # the float32 bit pattern of 0.5
PR_CURVE_POINTS: tuple[float, ...] = tuple(k / 100 for k in range(101))  # 0.00, 0.01, …, 1.00 (AUPR11's included)


def _float_keys(probs: Tensor, score_bits: int) -> Tensor:
    """float32 probs in [0, 1] → int32 keys, non-decreasing in p; 0.5 ↦ half_key, 1 ↦ 2·half_key."""
    shift = _FLOAT32_MANTISSA_BITS - score_bits
    half_key = _HALF_BITS >> shift
    tail = torch.minimum(probs, 1.0 - probs)  # 1 − p is exact in float32 for p ≥ 0.5
    # abs: −0.0 (from interpolation, or a tiny negative flushed by denormals-are-zero) has the sign bit set, which
    # would make a negative key; it is the same score as +0.0.
    low = tail.abs_().view(torch.int32).bitwise_right_shift_(shift)
    return torch.where(probs > 0.5, 2 * half_key - low, low)


class ScoreGrid:
    """Slots of the score histograms: a key per float32 score (see above), each key split in two at the threshold
    that falls in it (if any), so that `prob > t` is exactly `slot > edge(t)` for every t in `thresholds`."""

    def __init__(self, score_bits: int, thresholds: tuple[float, ...], device: torch.device | str = "cpu") -> None:
        if not 6 <= score_bits <= 16:
            raise InputError(f"eval.score_bits: got {score_bits}; use 6..16 (default 10: 0.1 % resolution)")
        self.score_bits = score_bits
        self.n_keys = 2 * (_HALF_BITS >> (_FLOAT32_MANTISSA_BITS - score_bits)) + 1
        self.n_slots = 2 * self.n_keys
        values = torch.tensor(sorted(set(thresholds)), dtype=torch.float32, device=device)
        keys = _float_keys(values, score_bits)
        if keys.unique().numel() != keys.numel():
            raise InputError(f"thresholds {thresholds} are closer than the score resolution 2**-{score_bits}")
        self._split = torch.full((self.n_keys,), math.inf, dtype=torch.float32, device=device)
        self._split[keys.long()] = values
        self._edges = {float(t): 2 * int(k) for t, k in zip(values.tolist(), keys.tolist())}

    def edge(self, threshold: float) -> Optional[int]:
        """e with `prob > threshold` ⇔ `slot > e`, for the grid's thresholds; None for any other value."""
        return self._edges.get(float(torch.tensor(threshold, dtype=torch.float32)))

    def to(self, device: torch.device) -> ScoreGrid:
        self._split = self._split.to(device)
        return self

    def slots(self, probs: Tensor) -> Tensor:
        """Slot index (int32) of each float32 score in [0, 1], flattened."""
        keys = _float_keys(probs.reshape(-1), self.score_bits)
        above_split = probs.reshape(-1) > self._split.index_select(0, keys)
        return keys.mul_(2).add_(above_split)


def score_histograms(probs: Tensor, target: Tensor, grid: ScoreGrid) -> Tensor:
    """(B, C, H, W) float32 probs + bool target → (C, 2, n_slots) int64 counts; [:, 0] negatives, [:, 1] positives.

    One channel at a time keeps the temporaries at one channel's size; positives (well under 1 % of pixels) get their
    own small bincount and negatives are the rest.
    """
    rows = []
    for c in range(probs.shape[1]):
        slots = grid.slots(probs[:, c].contiguous())
        every = torch.bincount(slots, minlength=grid.n_slots)
        positive = torch.bincount(slots[target[:, c].reshape(-1)], minlength=grid.n_slots)
        rows.append(torch.stack([every - positive, positive]))
    return torch.stack(rows)


def histogram_counts(hist: Tensor, edge: int) -> Tensor:
    """(C, 2, S) counts → (C, 3) int64 [TP, FP, FN] for pred = slot > edge."""
    tp = hist[:, 1, edge + 1 :].sum(-1)
    fp = hist[:, 0, edge + 1 :].sum(-1)
    fn = hist[:, 1, : edge + 1].sum(-1)
    return torch.stack([tp, fp, fn], dim=1)


def histogram_average_precision(hist: Tensor) -> Tensor:
    """(C, 2, S) slot counts → (C,) float64 AP, each slot one threshold (sklearn's definition); NaN if no positive."""
    pos = hist[:, 1].flip(-1)  # highest scores first
    tps = pos.cumsum(-1)
    predicted = tps + hist[:, 0].flip(-1).cumsum(-1)
    precision = tps.double() / predicted.clamp_min(1).double()  # clamp only touches slots with ΔTP = 0
    return (pos.double() * precision).sum(-1) / tps[:, -1].double()


def histogram_pr_points(
    hist: Tensor, grid: ScoreGrid, thresholds: tuple[float, ...] = AUPR_THRESHOLDS
) -> tuple[Tensor, Tensor]:
    """(C, 2, S) counts → (precision, recall), each (C, len(thresholds)) float64, pred = score > t exactly.

    Each t must be one of the grid's thresholds. Nothing predicted → precision 1; no positive → recall NaN.
    """
    edges = [grid.edge(t) for t in thresholds]
    if None in edges:
        raise ValueError(f"PR thresholds {thresholds} must be thresholds of the score grid")
    # above[:, :, j] = count of scores in slots ≥ j; score > t ⇔ slot ≥ edge + 1.
    above = torch.nn.functional.pad(hist.flip(-1).cumsum(-1).flip(-1), (0, 1))
    at = torch.tensor([e + 1 for e in edges], device=hist.device)
    fp, tp = above[:, 0, at].double(), above[:, 1, at].double()
    positives = hist[:, 1].sum(-1, keepdim=True).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.ones_like(tp))
    recall = tp / positives  # NaN where the split has no positive pixel
    return precision, recall


def trapezoid_aupr(precision: Tensor, recall: Tensor) -> Tensor:
    """(C, K) PR points at increasing thresholds → (C,) area under precision(recall) by the trapezoid rule."""
    return ((recall[:, :-1] - recall[:, 1:]) * (precision[:, :-1] + precision[:, 1:]) / 2).sum(-1)
