"""Lesion-segmentation metrics, summable across ranks: `functional` (per-batch counts, exact AP), `histogram`
(score histograms of the standard protocol), `protocols` (PaperMetrics, StandardMetrics), `bench` (speed and
agreement with sklearn).
"""

from hpc_drseg.metrics.functional import (
    AUPR_THRESHOLDS,
    average_precision,
    check_inputs,
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
from hpc_drseg.metrics.protocols import PaperMetrics, StandardMetrics, lesion_mean, per_lesion

__all__ = [
    "AUPR_THRESHOLDS",
    "PR_CURVE_POINTS",
    "PaperMetrics",
    "ScoreGrid",
    "StandardMetrics",
    "average_precision",
    "check_inputs",
    "confusion_counts",
    "dice_from_counts",
    "histogram_average_precision",
    "histogram_counts",
    "histogram_pr_points",
    "iou_from_counts",
    "lesion_mean",
    "per_lesion",
    "score_histograms",
    "trapezoid_aupr",
]
