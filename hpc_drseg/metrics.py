"""Lesion-segmentation metrics of the two evaluation protocols (docs/method.md): the paper's (Jithesh et al., ICMLA
2025, Table I) and the standard one of later DDR work.

Counts first, reductions last (as SMP's metrics/functional.py): each class keeps only summable tensors (per-batch sums,
TP/FP/FN counts, score histograms) that ranks add up with one all-reduce; `compute()` turns them into AP/IoU/… .
Threshold rule, everywhere: a pixel is predicted positive iff `prob > threshold` (as the DDR evaluation code does).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor

from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError

# Thresholds of the standard protocol's 11-point AUPR (DDR evaluation code: np.linspace(0, 1, 11), `prob > t`).
AUPR_THRESHOLDS: tuple[float, ...] = tuple(k / 10 for k in range(11))

ReduceSum = Callable[[Tensor], Optional[Tensor]]


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
    low = tail.view(torch.int32).bitwise_right_shift_(shift)
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


# ----------------------------------------------------------------------------------------------------- results
def per_lesion(values: Tensor) -> dict[str, float]:
    return {lesion: float(v) for lesion, v in zip(LESIONS, values.tolist())}


def lesion_mean(values: dict[str, float]) -> float:
    """Mean over lesions, skipping NaN (a lesion absent from the whole split); NaN if every lesion is NaN."""
    defined = [v for v in values.values() if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


# ------------------------------------------------------------------------------------------------ shared state
class _SummableState:
    """State = a dict of tensors that ranks add up element-wise; subclasses define `_empty_state()`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.reset()

    def _empty_state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self._state = self._empty_state()

    def to(self, device: torch.device | str) -> _SummableState:
        """Moves the state (e.g. to the rank's GPU before an NCCL all-reduce); returns self."""
        self.device = torch.device(device)
        self._state = {k: v.to(self.device) for k, v in self._state.items()}
        return self

    def state_tensors(self) -> dict[str, Tensor]:
        """Copies of the summable state: the sum of two objects' states is the state of one fed both inputs."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_tensors(self, state: Mapping[str, Tensor]) -> None:
        """Replaces the state, e.g. by an element-wise sum of several objects' `state_tensors()`."""
        expected = self._empty_state()
        if set(state) != set(expected):
            raise ValueError(f"{type(self).__name__}: state keys {sorted(state)} != expected {sorted(expected)}")
        for k, ref in expected.items():
            if tuple(state[k].shape) != tuple(ref.shape):
                raise ValueError(
                    f"{type(self).__name__}: state[{k!r}] has shape {tuple(state[k].shape)}, expected "
                    f"{tuple(ref.shape)} (was it made with other score_bits?)"
                )
        self._state = {k: state[k].detach().to(self.device, ref.dtype).clone() for k, ref in expected.items()}

    def sync(self, reduce_sum: ReduceSum) -> None:
        """Sums the state across ranks; call once, on every rank, before `compute()`.

        `reduce_sum(t)` either reduces in place and returns None (`torch.distributed.all_reduce`) or returns the
        summed tensor (Accelerate: `lambda t: accelerator.reduce(t, "sum")`). Tensors are visited in sorted-key order
        so every rank issues the same collectives. The state's device must suit the backend (see `to()`).
        """
        for k in sorted(self._state):
            reduced = reduce_sum(self._state[k])
            if reduced is not None:
                if tuple(reduced.shape) != tuple(self._state[k].shape):
                    raise ValueError(f"sync: reduce_sum changed the shape of {k!r}; it must sum, not gather")
                self._state[k] = reduced.to(device=self.device, dtype=self._state[k].dtype)


# ----------------------------------------------------------------------------------------------------- protocols
class PaperMetrics(_SummableState):
    """Protocol 1 ("paper", Table I): per batch of 4 consecutive 512² test images and per lesion, exact AP over the
    batch's pixels (0 when the batch has no positive pixel) and IoU at `threshold` (1 when prediction and truth are
    both empty); reported values are means over batches. Biased (batch-dependent), but reproduces the paper.

    One `update()` call is one batch. State: per-lesion sums of AP and IoU over batches, and the batch count.
    """

    def __init__(self, threshold: float = 0.5, device: torch.device | str = "cpu") -> None:
        self.threshold = check_threshold(threshold)
        super().__init__(device)

    def _empty_state(self) -> dict[str, Tensor]:
        n = len(LESIONS)
        return {
            "ap_sum": torch.zeros(n, dtype=torch.float64, device=self.device),
            "iou_sum": torch.zeros(n, dtype=torch.float64, device=self.device),
            "batches": torch.zeros((), dtype=torch.int64, device=self.device),
        }

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Adds one batch: probs (B, 4, H, W) in [0, 1], target the binary masks of the same shape."""
        probs, target = check_inputs(probs, target, "PaperMetrics.update")
        n = len(LESIONS)
        scores = probs.transpose(0, 1).reshape(n, -1)  # (4, B·H·W): AP pools the batch's pixels per lesion
        truth = target.transpose(0, 1).reshape(n, -1)
        ap = average_precision(scores, truth).nan_to_num(nan=0.0)  # paper: a batch without positives scores 0
        iou = iou_from_counts(confusion_counts(probs, target, self.threshold))
        self._state["ap_sum"] += ap.to(self.device)
        self._state["iou_sum"] += iou.to(self.device)
        self._state["batches"] += 1

    def compute(self) -> dict:
        """{"AP": {lesion: x}, "IoU": {…}, "mAP": x, "mIoU": x} as Python floats (means over batches)."""
        batches = int(self._state["batches"])
        if batches == 0:
            raise ValueError("PaperMetrics.compute: no batch was added; call update() (and sync() on every rank)")
        ap = per_lesion(self._state["ap_sum"] / batches)
        iou = per_lesion(self._state["iou_sum"] / batches)
        return {"AP": ap, "IoU": iou, "mAP": lesion_mean(ap), "mIoU": lesion_mean(iou)}


class StandardMetrics(_SummableState):
    """Protocol 2 ("standard", later DDR work): counts over the whole split at native resolution, per lesion.

    AP (sklearn's definition, each slot of the score grid one threshold: within 1e-3 of sklearn for the scores of
    confident models, tested), 11-point AUPR (thresholds 0, 0.1, …, 1, trapezoid rule, exact: they split slots),
    IoU and Dice at `threshold` from exact TP/FP/FN counts (read off the histogram; counted directly only when
    `threshold` falls within the score resolution of a PR-curve point without being one).
    A lesion with no positive pixel in the split has AP = AUPR11 = NaN, skipped by mAP / mAUPR11.
    State: int64 score histograms (C, 2, n_slots) and TP/FP/FN counts (C, 3); exact up to 2**63 pixels.
    """

    def __init__(self, threshold: float = 0.5, score_bits: int = 10, device: torch.device | str = "cpu") -> None:
        self.threshold = check_threshold(threshold)
        self.score_bits = score_bits
        try:  # the threshold splits its slot too, so that TP/FP/FN come free from the histogram
            self.grid = ScoreGrid(score_bits, PR_CURVE_POINTS + (self.threshold,))
        except InputError:  # a threshold within the score resolution of a PR point: counted directly
            self.grid = ScoreGrid(score_bits, PR_CURVE_POINTS)
        self._threshold_edge = self.grid.edge(self.threshold)
        self._grids: dict[torch.device, ScoreGrid] = {}
        super().__init__(device)

    def _empty_state(self) -> dict[str, Tensor]:
        n = len(LESIONS)
        return {
            "hist": torch.zeros((n, 2, self.grid.n_slots), dtype=torch.int64, device=self.device),
            "counts": torch.zeros((n, 3), dtype=torch.int64, device=self.device),
        }

    def _grid_on(self, device: torch.device) -> ScoreGrid:
        if device not in self._grids:
            self._grids[device] = copy.copy(self.grid).to(device)
        return self._grids[device]

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Adds images: probs (B, 4, H, W) in [0, 1], already resized to the masks' native size; binary target."""
        probs, target = check_inputs(probs, target, "StandardMetrics.update")
        hist = score_histograms(probs, target, self._grid_on(probs.device))
        if self._threshold_edge is None:
            counts = confusion_counts(probs, target, self.threshold)
        else:
            counts = histogram_counts(hist, self._threshold_edge)
        self._state["hist"] += hist.to(self.device)
        self._state["counts"] += counts.to(self.device)

    def compute(self) -> dict:
        """{"AP", "AUPR11", "IoU", "Dice": {lesion: x}, "mAP", "mAUPR11", "mIoU", "mDice": x} as Python floats."""
        hist = self._state["hist"]
        if int(hist[0].sum()) == 0:
            raise ValueError("StandardMetrics.compute: no pixel was added; call update() (and sync() on every rank)")
        precision, recall = histogram_pr_points(hist, self.grid)
        values = {
            "AP": per_lesion(histogram_average_precision(hist)),
            "AUPR11": per_lesion(trapezoid_aupr(precision, recall)),
            "IoU": per_lesion(iou_from_counts(self._state["counts"])),
            "Dice": per_lesion(dice_from_counts(self._state["counts"])),
        }
        means = {f"m{name}": lesion_mean(per) for name, per in values.items()}
        return {**values, **means}
