"""Tests of hpc_drseg.metrics, both evaluation protocols (docs/method.md): hand-checked tiny cases (expected numbers
worked out by hand in the comments), agreement with sklearn.metrics on random and lesion-like data, exactness at bin
slot edges, summable state (halves summed == whole, incl. a real 2-process gloo all-reduce) and input validation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from sklearn.metrics import auc, average_precision_score

from hpc_drseg.constants import LESIONS
from hpc_drseg.metrics import (
    AUPR_THRESHOLDS,
    PR_CURVE_POINTS,
    PaperMetrics,
    ScoreGrid,
    StandardMetrics,
    average_precision,
    histogram_pr_points,
    score_histograms,
)


def same4(row: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One row of pixels, copied into all four lesion channels → (1, 4, 1, N)."""
    return torch.tensor([[row] * len(LESIONS)], dtype=dtype).unsqueeze(2)


def lesion_like(shape: tuple[int, ...], pos_rate: float, seed: int, spread: float = 2.0) -> tuple[torch.Tensor, ...]:
    """Sparse lesions; sigmoid scores peaked near 0 for background, broad for lesions (like a trained model)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) < pos_rate
    logits = torch.where(target, torch.randn(shape, generator=g) * spread + 1, torch.randn(shape, generator=g) * 2 - 6)
    return torch.sigmoid(logits), target


def sk_ap(probs: torch.Tensor, target: torch.Tensor, c: int) -> float:
    return float(average_precision_score(target[:, c].flatten().numpy(), probs[:, c].flatten().numpy()))


def brute_pr_points(probs: torch.Tensor, target: torch.Tensor, c: int) -> tuple[list[float], list[float]]:
    """Precision/recall at the 11 thresholds straight from `probs > t` (DDR evaluation-code conventions)."""
    precision, recall = [], []
    for t in AUPR_THRESHOLDS:
        pred, truth = probs[:, c] > t, target[:, c]
        tp, npred = int((pred & truth).sum()), int(pred.sum())
        precision.append(tp / npred if npred else 1.0)
        recall.append(tp / int(truth.sum()))
    return precision, recall


def flat(result: dict) -> dict[str, float]:
    """{"AP": {"MA": x, …}, "mAP": y} → {"AP/MA": x, …, "mAP": y}, for pytest.approx (no nested dicts)."""
    out = {}
    for key, value in result.items():
        out.update({f"{key}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def assert_same_results(actual: dict, expected: dict, rel: float = 1e-12) -> None:
    assert flat(actual) == pytest.approx(flat(expected), rel=rel, nan_ok=True)


# ------------------------------------------------------------------------------------------------ hand cases
def test_perfect_prediction_scores_one_in_both_protocols():
    target = same4([1, 0, 0, 1, 0, 0])
    probs = target.clone()  # 1.0 on lesions, 0.0 elsewhere
    paper, standard = PaperMetrics(), StandardMetrics()
    paper.update(probs, target.bool())
    standard.update(probs, target.bool())
    p, s = paper.compute(), standard.compute()
    assert p["AP"] == dict.fromkeys(LESIONS, 1.0) and p["IoU"] == dict.fromkeys(LESIONS, 1.0)
    assert p["mAP"] == 1.0 and p["mIoU"] == 1.0
    for key in ("AP", "AUPR11", "IoU", "Dice"):
        assert s[key] == pytest.approx(dict.fromkeys(LESIONS, 1.0), abs=1e-12)
        assert s["m" + key] == pytest.approx(1.0, abs=1e-12)
    # AUPR11 points: t = 0 … 0.9 → (R 1, P 1); t = 1 → nothing predicted (R 0, P 1 by convention): area 1.


def test_empty_batch_paper_ap_zero_iou_one_standard_nan():
    target = torch.zeros(1, 4, 3, 3)
    probs = torch.full((1, 4, 3, 3), 0.2)  # nothing above 0.5 either
    paper = PaperMetrics()
    paper.update(probs, target)
    p = paper.compute()
    assert p["AP"] == dict.fromkeys(LESIONS, 0.0) and p["IoU"] == dict.fromkeys(LESIONS, 1.0)
    assert (p["mAP"], p["mIoU"]) == (0.0, 1.0)
    standard = StandardMetrics()
    standard.update(probs, target)
    s = standard.compute()
    assert all(math.isnan(v) for v in [*s["AP"].values(), *s["AUPR11"].values(), s["mAP"], s["mAUPR11"]])
    assert s["IoU"] == dict.fromkeys(LESIONS, 1.0) and s["Dice"] == dict.fromkeys(LESIONS, 1.0)


def test_false_positives_on_an_empty_lesion_give_iou_zero():
    target = torch.zeros(1, 4, 1, 4)
    probs = torch.tensor([0.9, 0.1, 0.1, 0.1]).expand(1, 4, 1, 4)
    paper, standard = PaperMetrics(), StandardMetrics()
    paper.update(probs, target)
    standard.update(probs, target)
    assert paper.compute()["IoU"] == dict.fromkeys(LESIONS, 0.0)
    assert standard.compute()["Dice"] == dict.fromkeys(LESIONS, 0.0)


def test_all_empty_lesion_channel_is_skipped_by_standard_means_but_counts_zero_in_paper():
    # MA, EX, HE: scores [.9, .2] on truth [1, 0] → AP 1, IoU 1. SE: no lesion, scores [.7, .1] → pred 1 FP.
    probs = torch.tensor([[[[0.9, 0.2]], [[0.9, 0.2]], [[0.7, 0.1]], [[0.9, 0.2]]]])
    target = torch.tensor([[[[1, 0]], [[1, 0]], [[0, 0]], [[1, 0]]]], dtype=torch.uint8)
    paper, standard = PaperMetrics(), StandardMetrics()
    paper.update(probs, target)
    standard.update(probs, target)
    p, s = paper.compute(), standard.compute()
    assert p["AP"] == {"MA": 1.0, "EX": 1.0, "SE": 0.0, "HE": 1.0}
    assert p["mAP"] == pytest.approx(0.75)  # the paper's rule: the empty channel's AP 0 is averaged in
    assert p["IoU"]["SE"] == 0.0 and p["mIoU"] == pytest.approx(0.75)
    assert math.isnan(s["AP"]["SE"]) and math.isnan(s["AUPR11"]["SE"])
    assert s["mAP"] == pytest.approx(1.0) and s["mAUPR11"] == pytest.approx(1.0)  # NaN skipped: mean of 3 ones
    assert s["IoU"]["SE"] == 0.0 and s["mIoU"] == pytest.approx(0.75)  # IoU is defined (0) and averaged in


@pytest.mark.parametrize("score_bits", [6, 10])
def test_ap_with_ties_hand_case(score_bits):
    # Scores .9 .8 .8 .8 .3 .1, truth 1 0 1 1 0 1 (4 positives). Thresholds, highest first:
    #   .9: TP 1 of 1 predicted → P 1,   R 1/4
    #   .8: TP 3 of 4 (the three tied .8 enter together) → P 3/4, R 3/4
    #   .3: TP 3 of 5 → P 3/5, R 3/4 (ΔR 0)
    #   .1: TP 4 of 6 → P 2/3, R 1
    # AP = 1/4·1 + 1/2·3/4 + 0 + 1/4·2/3 = 19/24. (Ranking the ties 1,0,1,1 one by one would give ≈ 0.8125 instead.)
    scores = [0.9, 0.8, 0.8, 0.8, 0.3, 0.1]
    truth = [1, 0, 1, 1, 0, 1]
    assert average_precision(torch.tensor([scores]), torch.tensor([truth], dtype=torch.bool)).item() == pytest.approx(
        19 / 24, abs=1e-12
    )
    paper, standard = PaperMetrics(), StandardMetrics(score_bits=score_bits)  # four scores, four different slots
    paper.update(same4(scores), same4(truth))
    standard.update(same4(scores), same4(truth))
    assert paper.compute()["mAP"] == pytest.approx(19 / 24, abs=1e-12)
    assert standard.compute()["AP"] == pytest.approx(dict.fromkeys(LESIONS, 19 / 24), abs=1e-12)
    assert average_precision_score(truth, scores) == pytest.approx(19 / 24, abs=1e-12)


def test_iou_dice_counts_hand_case_and_strict_threshold_rule():
    # truth 1 1 0 0 1 0, probs .9 .4 .6 .5 .51 .1; pred = prob > .5 → 1 0 1 0 1 0 (0.5 itself is NOT positive).
    # TP 2 (pixels 0, 4), FP 1 (pixel 2), FN 1 (pixel 1): IoU 2/4, Dice 4/6.
    truth = same4([1, 1, 0, 0, 1, 0])
    probs = same4([0.9, 0.4, 0.6, 0.5, 0.51, 0.1])
    for threshold, iou, dice in [(0.5, 2 / 4, 4 / 6), (0.45, 2 / 5, 4 / 7)]:  # at .45 pixel 3 (.5) is a 2nd FP
        paper, standard = PaperMetrics(threshold), StandardMetrics(threshold)
        paper.update(probs, truth)
        standard.update(probs, truth)
        assert paper.compute()["IoU"] == pytest.approx(dict.fromkeys(LESIONS, iou))
        s = standard.compute()
        assert s["IoU"] == pytest.approx(dict.fromkeys(LESIONS, iou)) and s["mIoU"] == pytest.approx(iou)
        assert s["Dice"] == pytest.approx(dict.fromkeys(LESIONS, dice)) and s["mDice"] == pytest.approx(dice)
        assert standard.state_tensors()["counts"][0].tolist() == [2, 1 + (threshold < 0.5), 1]


def test_aupr11_hand_case():
    # Positives score .95 .55 .25, negatives .75 .45 .05. (TP, FP) for score > t and the PR points:
    #   t = 0:        3, 3 → P .5,  R 1        t = .1, .2:  3, 2 → P .6, R 1
    #   t = .3, .4:   2, 2 → P .5,  R 2/3      t = .5:      2, 1 → P 2/3, R 2/3
    #   t = .6, .7:   1, 1 → P .5,  R 1/3      t = .8, .9:  1, 0 → P 1, R 1/3
    #   t = 1:        0, 0 → P 1 (nothing predicted), R 0
    # Trapezoids where R drops: 1/3·(.6 + .5)/2 + 1/3·(2/3 + .5)/2 + 1/3·(1 + 1)/2 = 11/60 + 7/36 + 1/3 = 32/45.
    scores = [0.95, 0.55, 0.25, 0.75, 0.45, 0.05]
    truth = [1, 1, 1, 0, 0, 0]
    standard = StandardMetrics()
    standard.update(same4(scores), same4(truth))
    assert standard.compute()["AUPR11"] == pytest.approx(dict.fromkeys(LESIONS, 32 / 45), abs=1e-12)
    precision, recall = histogram_pr_points(standard.state_tensors()["hist"], standard.grid)
    expected_p = [0.5, 0.6, 0.6, 0.5, 0.5, 2 / 3, 0.5, 0.5, 1, 1, 1]
    expected_r = [1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 0]
    assert precision[0].tolist() == pytest.approx(expected_p) and recall[0].tolist() == pytest.approx(expected_r)
    assert auc(expected_r, expected_p) == pytest.approx(32 / 45)  # sklearn's trapezoid agrees


def test_paper_metrics_average_over_batches():
    # Batch 1: perfect (AP 1, IoU 1). Batch 2: no lesion but one FP → AP 0 (paper rule), IoU 0. Means: 0.5, 0.5.
    paper = PaperMetrics()
    paper.update(same4([0.9, 0.1]), same4([1, 0]))
    paper.update(same4([0.9, 0.1]), same4([0, 0]))
    assert paper.compute() == {
        "AP": dict.fromkeys(LESIONS, 0.5),
        "IoU": dict.fromkeys(LESIONS, 0.5),
        "mAP": 0.5,
        "mIoU": 0.5,
    }


def test_results_are_plain_floats_in_lesion_order():
    probs, target = lesion_like((1, 4, 16, 16), 0.2, seed=3)
    paper, standard = PaperMetrics(), StandardMetrics()
    paper.update(probs, target)
    standard.update(probs, target)
    p, s = paper.compute(), standard.compute()
    assert list(p) == ["AP", "IoU", "mAP", "mIoU"]
    assert list(s) == ["AP", "AUPR11", "IoU", "Dice", "mAP", "mAUPR11", "mIoU", "mDice"]
    for result in (p, s):
        for value in result.values():
            if isinstance(value, dict):
                assert list(value) == list(LESIONS) and all(type(v) is float for v in value.values())
            else:
                assert type(value) is float


# -------------------------------------------------------------------------------------------- sklearn agreement
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_ap_per_batch_equals_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 4, 48, 48)
    probs = torch.rand(shape, generator=g)
    if seed == 1:
        probs = (probs * 20).round() / 20  # heavy ties: 21 distinct scores
    if seed == 2:
        probs, _ = lesion_like(shape, 0.005, seed)  # ~0.5 % positives, peaked scores
    target = torch.rand(shape, generator=g) < (0.005 + 0.3 * probs if seed != 2 else 0.005)
    target[:, 3] = False  # a lesion absent from the batch: AP recorded as 0
    paper = PaperMetrics()
    paper.update(probs, target)
    result = paper.compute()
    for c, lesion in enumerate(LESIONS[:3]):
        assert result["AP"][lesion] == pytest.approx(sk_ap(probs, target, c), abs=1e-9)
    assert result["AP"]["HE"] == 0.0


def test_paper_bf16_scores_match_sklearn_on_the_same_values():
    # Autocast outputs: bf16 probabilities have only 256 levels per octave, i.e. many ties.
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(2, 4, 32, 32, generator=g).bfloat16()
    target = torch.rand(2, 4, 32, 32, generator=g) < 0.1
    paper = PaperMetrics()
    paper.update(probs, target)
    ap = paper.compute()["AP"]
    for c, lesion in enumerate(LESIONS):
        assert ap[lesion] == pytest.approx(sk_ap(probs.float(), target, c), abs=1e-9)


def confident(shape: tuple[int, ...], pos_rate: float, seed: int, pos: tuple, neg: tuple, fp_rate: float = 0.0):
    """Scores of an over-confident model: Gaussian logits (mean, sd) for positives and negatives, and a fraction
    `fp_rate` of negatives drawn like the positives (saturated false positives)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) < pos_rate
    fooled = torch.rand(shape, generator=g) < fp_rate
    z = torch.randn(shape, generator=g)
    logits = torch.where(target | fooled, z * pos[1] + pos[0], z * neg[1] + neg[0])
    return torch.sigmoid(logits), target


CONFIDENT = {
    # (positive logits, negative logits, share of saturated false positives): scores crowd at 0 and 1 in float32
    "saturated_fp": ((15.0, 5.0), (-10.0, 3.0), 0.05),
    "confident_separable": ((12.0, 4.0), (-4.0, 4.0), 0.0),
    "both_near_one": ((20.0, 6.0), (5.0, 6.0), 0.0),
    "both_near_zero": ((-20.0, 4.0), (-30.0, 4.0), 0.0),
    "extreme_logits": ((30.0, 8.0), (10.0, 8.0), 0.0),
}


@pytest.mark.parametrize("case", sorted(CONFIDENT))
@pytest.mark.parametrize("pos_rate", [0.02, 0.002])
def test_standard_ap_matches_sklearn_for_confident_models(case, pos_rate):
    """Evenly spaced probability bins lumped every logit above ≈ 9 into one slot and missed by up to 0.08."""
    pos, neg, fp_rate = CONFIDENT[case]
    probs, target = confident((2, 4, 160, 160), pos_rate, seed=len(case), pos=pos, neg=neg, fp_rate=fp_rate)
    standard = StandardMetrics()
    standard.update(probs, target)
    ap = standard.compute()["AP"]
    for c, lesion in enumerate(LESIONS):
        assert ap[lesion] == pytest.approx(sk_ap(probs, target, c), abs=1e-3)


@pytest.mark.parametrize("kind", ["constant", "three_levels", "zeros_and_ones", "no_positives"])
def test_standard_ap_with_ties_and_degenerate_scores(kind):
    g = torch.Generator().manual_seed(9)
    shape = (2, 4, 64, 64)
    target = torch.rand(shape, generator=g) < 0.01
    if kind == "constant":
        probs = torch.full(shape, 0.3)
    elif kind == "three_levels":
        probs = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, shape, generator=g)]
    elif kind == "zeros_and_ones":
        probs = torch.where(torch.rand(shape, generator=g) < 0.5, target.float(), 1 - target.float())
    else:
        probs, target = torch.rand(shape, generator=g), torch.zeros(shape, dtype=torch.bool)
    standard = StandardMetrics()
    standard.update(probs, target)
    ap = standard.compute()["AP"]
    for c, lesion in enumerate(LESIONS):
        if kind == "no_positives":
            assert math.isnan(ap[lesion])
        else:
            assert ap[lesion] == pytest.approx(sk_ap(probs, target, c), abs=1e-12)


@pytest.mark.parametrize(
    "case",
    ["uniform", "calibrated_imbalance", "lesion_like_0.5pct", "hard_peaked_0.5pct", "half_positive"],
)
def test_standard_ap_matches_sklearn_within_1e3(case):
    shape = (2, 4, 128, 128)
    g = torch.Generator().manual_seed(11)
    if case == "uniform":
        probs = torch.rand(shape, generator=g)
        target = torch.rand(shape, generator=g) < 0.3
    elif case == "calibrated_imbalance":
        probs = torch.rand(shape, generator=g)
        target = torch.rand(shape, generator=g) < 0.02 * probs
    elif case == "lesion_like_0.5pct":
        probs, target = lesion_like(shape, 0.005, seed=12)
    elif case == "hard_peaked_0.5pct":
        probs, target = lesion_like(shape, 0.005, seed=13, spread=4.0)
    else:
        probs = torch.sigmoid(torch.randn(shape, generator=g))
        target = torch.rand(shape, generator=g) < probs
    standard = StandardMetrics()
    standard.update(probs, target)
    ap = standard.compute()["AP"]
    for c, lesion in enumerate(LESIONS):
        assert ap[lesion] == pytest.approx(sk_ap(probs, target, c), abs=1e-3)


def test_standard_ap_is_exact_when_scores_sit_on_distinct_slots():
    # Scores quantised to multiples of 1/1000: 2**-10 relative resolution gives every distinct score its own slot.
    g = torch.Generator().manual_seed(21)
    probs = (torch.rand(3, 4, 40, 40, generator=g) * 1000).round() / 1000
    target = torch.rand(3, 4, 40, 40, generator=g) < probs * 0.2
    standard = StandardMetrics()
    standard.update(probs, target)
    ap = standard.compute()["AP"]
    for c, lesion in enumerate(LESIONS):
        assert ap[lesion] == pytest.approx(sk_ap(probs, target, c), abs=1e-12)


# ---------------------------------------------------------------------------------------------- slot exactness
def neighbours(values: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """values and their `steps` float32 neighbours on either side, within [0, 1]."""
    out, up, down = [values], values, values
    for _ in range(steps):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-1.0))
        out += [up, down]
    return torch.cat(out).clamp(0, 1)


@pytest.mark.parametrize("score_bits", [6, 10, 14])
def test_slots_are_monotone_and_split_exactly_at_grid_thresholds(score_bits):
    thresholds = PR_CURVE_POINTS + (0.37,)
    grid = ScoreGrid(score_bits, thresholds)
    g = torch.Generator().manual_seed(score_bits)
    tiny = torch.tensor([0.0, 1e-45, 1e-38, 1e-20, 1e-8, 1 - 2**-24, 1.0])
    values = torch.cat([neighbours(torch.tensor(thresholds)), torch.rand(20000, generator=g), neighbours(tiny)])
    values = values.sort().values
    slots = grid.slots(values).long()
    assert bool((slots[1:] >= slots[:-1]).all()) and 0 <= int(slots.min()) and int(slots.max()) < grid.n_slots
    for t in thresholds:
        assert torch.equal(slots > grid.edge(t), values > t), t
    assert grid.edge(0.123) is None


def test_score_resolution_is_relative_at_both_ends():
    """Logits −25 and −24 (p ≈ 1e-11), 14 and 15 (1 − p ≈ 1e-6) fall in different slots: resolution even in logit."""
    grid = ScoreGrid(10, PR_CURVE_POINTS)
    logits = torch.tensor([-25.0, -24.0, -9.0, -8.99, 8.99, 9.0, 14.0, 15.0])  # float32 ties beyond ≈ 16
    slots = grid.slots(torch.sigmoid(logits)).tolist()
    assert slots == sorted(slots) and len(set(slots)) == len(slots)


def test_aupr11_points_and_iou_counts_are_exact_at_threshold_edges():
    # Scores exactly on each threshold, and one float32 ulp either side: `> t` must split them like the brute force.
    g = torch.Generator().manual_seed(8)
    ticks = torch.tensor(AUPR_THRESHOLDS, dtype=torch.float32)
    near = torch.cat([ticks, torch.nextafter(ticks, torch.tensor(2.0)), torch.nextafter(ticks, torch.tensor(-1.0))])
    near = near.clamp(0, 1).repeat(8)  # 264 values
    probs = torch.cat([near, torch.rand(2 * 4 * 1000 - near.numel(), generator=g)])
    probs = probs[torch.randperm(probs.numel(), generator=g)].reshape(2, 4, 1, 1000)
    target = torch.rand(probs.shape, generator=g) < 0.4
    standard = StandardMetrics()
    standard.update(probs, target)
    precision, recall = histogram_pr_points(standard.state_tensors()["hist"], standard.grid)
    for c in range(len(LESIONS)):
        brute_p, brute_r = brute_pr_points(probs, target, c)
        assert precision[c].tolist() == brute_p and recall[c].tolist() == brute_r
        pred = probs[:, c] > 0.5
        tp = int((pred & target[:, c]).sum())
        expected = [tp, int(pred.sum()) - tp, int(target[:, c].sum()) - tp]
        assert standard.state_tensors()["counts"][c].tolist() == expected
        assert standard.compute()["AUPR11"][LESIONS[c]] == pytest.approx(auc(brute_r, brute_p), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 0.37, 0.30001])
def test_iou_counts_equal_direct_counts_for_any_threshold(threshold):
    """0.30001 shares its slot with the PR point 0.3, so it cannot split it: counted directly instead."""
    probs, target = lesion_like((2, 4, 32, 32), 0.1, seed=4)
    probs = torch.cat([probs.flatten()[:-6], torch.tensor([0.3, 0.30001, 0.300005, 0.37, 0.5, 0.50001])])
    probs = probs.reshape(target.shape)
    metric = StandardMetrics(threshold)
    metric.update(probs, target)
    assert (metric._threshold_edge is None) == (threshold == 0.30001)
    for c in range(len(LESIONS)):
        pred = probs[:, c] > threshold
        tp = int((pred & target[:, c]).sum())
        expected = [tp, int(pred.sum()) - tp, int(target[:, c].sum()) - tp]
        assert metric.state_tensors()["counts"][c].tolist() == expected


def test_histogram_channels_and_classes():
    # MA: .05 (neg), .95 (pos); other channels all-zero scores and truth.
    probs = torch.zeros(1, 4, 1, 2)
    probs[0, 0, 0] = torch.tensor([0.05, 0.95])
    target = torch.zeros(1, 4, 1, 2, dtype=torch.bool)
    target[0, 0, 0, 1] = True
    grid = ScoreGrid(8, PR_CURVE_POINTS)
    hist = score_histograms(probs, target, grid)
    assert hist.shape == (4, 2, grid.n_slots) and hist.dtype == torch.int64
    low, high = grid.slots(torch.tensor([0.05, 0.95])).tolist()
    assert hist[0, 0].nonzero().flatten().tolist() == [low] and hist[0, 1].nonzero().flatten().tolist() == [high]
    assert hist[1:, 0, 0].tolist() == [2, 2, 2] and int(hist[1:].sum()) == 6


# -------------------------------------------------------------------------------------------------- summable state
def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [lesion_like((2, 4, 24, 24), 0.05, seed=seed + i) for i in range(n)]


def feed(metric, data) -> None:
    for probs, target in data:
        metric.update(probs, target)


def summed(*metrics) -> dict[str, torch.Tensor]:
    states = [m.state_tensors() for m in metrics]
    return {k: sum(s[k] for s in states) for k in states[0]}


@pytest.mark.parametrize("make", [PaperMetrics, lambda: StandardMetrics()], ids=["paper", "standard"])
def test_sum_of_halves_equals_whole(make):
    data = batches(4, seed=30)
    whole, first, second, merged = make(), make(), make(), make()
    feed(whole, data)
    feed(first, data[:2])
    feed(second, data[2:])
    merged.load_state_tensors(summed(first, second))
    assert_same_results(merged.compute(), whole.compute(), rel=1e-12)
    for key, tensor in whole.state_tensors().items():
        assert torch.allclose(merged.state_tensors()[key], tensor, rtol=1e-12, atol=0)


def test_state_dtypes_are_exact_counters():
    standard = StandardMetrics()
    state = standard.state_tensors()
    assert state["hist"].dtype == torch.int64 and state["counts"].dtype == torch.int64
    assert PaperMetrics().state_tensors()["batches"].dtype == torch.int64
    # Counts beyond int32 and float32 exactness survive: 3e9 + 1 negatives and 2**33 + 1 positives.
    state["hist"][:, 0, 0] = 3_000_000_001
    top = standard.grid.n_slots - 2  # the slot of score 1.0: the last key, not above a split
    state["hist"][:, 1, top] = 2**33 + 1
    standard.load_state_tensors(state)
    standard.update(same4([0.0, 1.0]), same4([0, 1]))
    assert standard.state_tensors()["hist"][0, :, [0, top]].tolist() == [[3_000_000_002, 0], [0, 2**33 + 2]]
    assert standard.compute()["AP"]["MA"] == 1.0


def double_in_place(tensor: torch.Tensor) -> None:
    tensor.mul_(2)


def test_sync_with_returning_and_in_place_reducers():
    data = batches(2, seed=40)
    for make in (PaperMetrics, lambda: StandardMetrics()):
        twice, returning, in_place = make(), make(), make()
        feed(twice, data + data)
        feed(returning, data)
        feed(in_place, data)
        returning.sync(lambda t: t * 2)  # Accelerate-style: returns the sum over two identical ranks
        in_place.sync(double_in_place)  # torch.distributed.all_reduce-style: in place, returns None
        assert_same_results(returning.compute(), twice.compute(), rel=1e-12)
        assert_same_results(in_place.compute(), twice.compute(), rel=1e-12)


def test_reset_clears_state():
    probs, target = lesion_like((1, 4, 8, 8), 0.2, seed=50)
    for metric in (PaperMetrics(), StandardMetrics()):
        metric.update(probs, target)
        first = metric.compute()
        metric.reset()
        with pytest.raises(ValueError, match="no (batch|pixel) was added"):
            metric.compute()
        metric.update(probs, target)
        assert_same_results(metric.compute(), first)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from hpc_drseg.metrics import PaperMetrics, StandardMetrics
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(2, 4, 16, 16, generator=g), torch.rand(2, 4, 16, 16, generator=g) < 0.1) for _ in range(3)]
    paper, standard = PaperMetrics(), StandardMetrics()
    for probs, target in data[rank::2]:  # rank 0: batches 0, 2; rank 1: batch 1
        paper.update(probs, target)
        standard.update(probs, target)
    paper.sync(dist.all_reduce)
    standard.sync(dist.all_reduce)
    if rank == 0:
        json.dump({"paper": paper.compute(), "standard": standard.compute()}, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # two fresh interpreters importing torch: ≈20 s on the shared 2-core machine
def test_two_process_gloo_all_reduce_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"), str(out)]) for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    result = json.loads(out.read_text())
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(2, 4, 16, 16, generator=g), torch.rand(2, 4, 16, 16, generator=g) < 0.1) for _ in range(3)]
    paper, standard = PaperMetrics(), StandardMetrics()
    feed(paper, data)
    feed(standard, data)
    assert_same_results(result["paper"], paper.compute())
    assert_same_results(result["standard"], standard.compute())


# ----------------------------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("make", [PaperMetrics, lambda: StandardMetrics()], ids=["paper", "standard"])
@pytest.mark.parametrize(
    "probs, target, message",
    [
        (torch.rand(1, 4, 4, 4), torch.zeros(1, 4, 4, 5), "must both be"),
        (torch.rand(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), r"\(B, 4, H, W\)"),
        (torch.rand(4, 4, 4), torch.zeros(4, 4, 4), "must both be"),
        (torch.rand(1, 4, 2, 2) + 1.0, torch.zeros(1, 4, 2, 2), r"must lie in \[0, 1\].*not logits"),
        (torch.rand(1, 4, 2, 2) - 1.0, torch.zeros(1, 4, 2, 2), r"must lie in \[0, 1\]"),
        (torch.full((1, 4, 2, 2), math.nan), torch.zeros(1, 4, 2, 2), "NaN"),
        (torch.ones(1, 4, 2, 2, dtype=torch.int64), torch.zeros(1, 4, 2, 2), "floating-point"),
        (torch.rand(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5), "only 0 and 1"),
        (torch.rand(0, 4, 2, 2), torch.zeros(0, 4, 2, 2), "empty batch"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(make, probs, target, message):
    with pytest.raises(ValueError, match=message):
        make().update(probs, target)


def test_uint8_masks_0_255_count_as_lesion():
    probs = same4([0.9, 0.1])
    a, b = StandardMetrics(), StandardMetrics()
    a.update(probs, same4([255, 0], dtype=torch.uint8))
    b.update(probs, same4([1, 0], dtype=torch.bool))
    assert a.compute() == b.compute()


@pytest.mark.parametrize("score_bits", [0, 5, 17])
def test_score_bits_range(score_bits):
    with pytest.raises(ValueError, match="eval.score_bits"):
        StandardMetrics(score_bits=score_bits)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_must_be_a_probability(threshold):
    for make in (PaperMetrics, StandardMetrics):
        with pytest.raises(ValueError, match="eval.threshold"):
            make(threshold)


def test_load_state_tensors_rejects_foreign_state():
    with pytest.raises(ValueError, match="state keys"):
        PaperMetrics().load_state_tensors(StandardMetrics().state_tensors())
    with pytest.raises(ValueError, match="other score_bits"):
        StandardMetrics().load_state_tensors(StandardMetrics(score_bits=8).state_tensors())


def test_pr_points_need_grid_thresholds():
    standard = StandardMetrics()
    with pytest.raises(ValueError, match="thresholds of the score grid"):
        histogram_pr_points(standard.state_tensors()["hist"], standard.grid, (0.0, 0.125, 1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_give_the_cpu_result():
    probs, target = lesion_like((2, 4, 64, 64), 0.01, seed=60)
    for make in (PaperMetrics, lambda: StandardMetrics()):
        cpu, gpu = make(), make().to("cuda")
        cpu.update(probs, target)
        gpu.update(probs.cuda(), target.cuda())
        assert gpu.state_tensors()[next(iter(gpu.state_tensors()))].device.type == "cuda"
        assert_same_results(gpu.compute(), cpu.compute(), rel=1e-9)


def test_bench_metrics_reports_agreement_and_speed():
    from hpc_drseg.metrics import bench

    rows = bench.benchmark_ap(images=1, side_px=64, repeats=1)
    assert [row["scores"] for row in rows] == ["confident model", "uniform"]
    assert all(row["max_abs_ap_diff"] < 1e-3 and row["streaming_s"] > 0 for row in rows)
    agreement = bench.agreement_table(pixels=20_000)
    assert len(agreement) == len(bench.GAUSSIAN_CASES)
    assert all(abs(row["streaming"] - row["sklearn"]) < 1e-3 for row in agreement)
    assert "speed-up" in bench.format_ap_table(rows) and "linear bins" in bench.format_agreement_table(agreement)


def test_negative_zero_and_flushed_denormals_score_as_zero():
    """Interpolated probabilities can be −0.0, and with denormals flushed (the trainer sets it for speed) the
    neighbours of 0 become ±0.0: every such score is the slot of 0, and the metrics do not fail on them."""
    grid = ScoreGrid(10, PR_CURVE_POINTS)
    zero = grid.slots(torch.tensor([0.0])).item()
    assert grid.slots(torch.tensor([-0.0, 0.0])).tolist() == [zero, zero]
    torch.set_flush_denormal(True)
    try:
        tiny = torch.tensor([1e-45, -1e-45, 1e-40]).clamp(0, 1)
        assert grid.slots(tiny).tolist() == [zero] * 3
        standard = StandardMetrics()
        standard.update(same4([-0.0, 0.9]), same4([0, 1]))
        assert standard.compute()["mAP"] == 1.0
    finally:
        torch.set_flush_denormal(False)  # torch's default
