"""The two evaluation protocols as summable metric objects: the paper's (Jithesh et al., ICMLA 2025, Table I) and
the standard one of later DDR work (docs/method.md).

Counts first, reductions last (as SMP's metrics/functional.py): each class keeps only summable tensors (per-batch sums,
TP/FP/FN counts, score histograms) that ranks add up with one all-reduce; `compute()` turns them into AP/IoU/… .
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
from hpc_drseg.metrics.functional import (
    average_precision,
    check_inputs,
    check_threshold,
    confusion_counts,
    dice_from_counts,
    iou_from_counts,
)
from hpc_drseg.metrics.histogram import (
    PR_CURVE_POINTS,
    ScoreGrid,
    histogram_average_precision,
    histogram_counts,
    histogram_pr_points,
    score_histograms,
    trapezoid_aupr,
)

ReduceSum = Callable[[Tensor], Optional[Tensor]]


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
