"""`drseg bench metrics`: the standard protocol's streaming AP against sklearn's exact AP on the same scores — time per
batch of native-size images and the AP difference, for the scores of a confident model and for uniform scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from hpc_drseg.constants import LESIONS
from hpc_drseg.metrics.protocols import StandardMetrics


def confident_scores(images: int, side_px: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, 4, side, side) sigmoid scores of an over-confident model (lesion logits N(12, 5), background N(-9, 4),
    2 % of the background fooled like lesions) and sparse targets (1 % lesion pixels)."""
    g = torch.Generator().manual_seed(seed)
    shape = (images, len(LESIONS), side_px, side_px)
    target = torch.rand(shape, generator=g) < 0.01
    fooled = torch.rand(shape, generator=g) < 0.02
    z = torch.randn(shape, generator=g)
    logits = torch.where(target | fooled, z * 5 + 12, z * 4 - 9)
    return torch.sigmoid(logits), target


def uniform_scores(images: int, side_px: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (images, len(LESIONS), side_px, side_px)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g) < 0.01


def _timed(run: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def _sklearn_ap(probs: torch.Tensor, target: torch.Tensor) -> list[float]:
    from sklearn.metrics import average_precision_score

    return [
        float(average_precision_score(target[:, c].reshape(-1).numpy(), probs[:, c].reshape(-1).numpy()))
        for c in range(len(LESIONS))
    ]


def _streaming_ap(probs: torch.Tensor, target: torch.Tensor, score_bits: int) -> list[float]:
    metric = StandardMetrics(score_bits=score_bits)
    metric.update(probs, target)
    ap = metric.compute()["AP"]
    return [ap[lesion] for lesion in LESIONS]


def _measure(name: str, probs: torch.Tensor, target: torch.Tensor, score_bits: int, repeats: int) -> dict:
    streaming = min(_timed(lambda: _streaming_ap(probs, target, score_bits))[1] for _ in range(repeats))
    exact, sklearn_s = _timed(lambda: _sklearn_ap(probs, target))
    ours = _streaming_ap(probs, target, score_bits)
    return {
        "scores": name,
        "pixels": probs.numel(),
        "streaming_s": streaming,
        "sklearn_s": sklearn_s,
        "speedup": sklearn_s / streaming,
        "max_abs_ap_diff": max(abs(a - b) for a, b in zip(ours, exact)),
    }


def benchmark_ap(images: int = 4, side_px: int = 1024, score_bits: int = 10, repeats: int = 3) -> list[dict]:
    """One row per score distribution: best-of-`repeats` seconds of the streaming AP (update + compute, 4 lesions)
    and one sklearn run on the same pixels, their ratio, and the largest AP difference over the lesions."""
    sources = (("confident model", confident_scores), ("uniform", uniform_scores))
    return [_measure(name, *make(images, side_px), score_bits, repeats) for name, make in sources]


# Over-confident models: (positive logit mean, sd), (negative logit mean, sd), share of positives.
GAUSSIAN_CASES: tuple[tuple[tuple[float, float], tuple[float, float], float], ...] = (
    ((4.0, 3.0), (-4.0, 3.0), 0.02),
    ((12.0, 4.0), (-4.0, 4.0), 0.02),
    ((20.0, 6.0), (5.0, 6.0), 0.02),
    ((15.0, 5.0), (10.0, 5.0), 0.02),
    ((-20.0, 4.0), (-30.0, 4.0), 0.02),
    ((14.0, 3.0), (-9.0, 3.0), 0.002),
)


def linear_bins_ap(probs: torch.Tensor, target: torch.Tensor, bins: int = 10_000) -> float:
    """The baseline: AP from a histogram with `bins` evenly spaced probability bins (every logit above ≈ 9 shares the
    top bin), read off as the streaming AP is."""
    slots = (probs.double() * bins).ceil().long().clamp_(0, bins)
    pos = torch.bincount(slots[target], minlength=bins + 1).flip(0)
    neg = torch.bincount(slots[~target], minlength=bins + 1).flip(0)
    tps = pos.cumsum(0)
    precision = tps.double() / (tps + neg.cumsum(0)).clamp_min(1).double()
    return float((pos.double() * precision).sum() / tps[-1].double())


def agreement_table(pixels: int = 400_000, score_bits: int = 10, seed: int = 0) -> list[dict]:
    """AP of sklearn, of the streaming histogram and of the linear-bin baseline on Gaussian logits (one lesion)."""
    from sklearn.metrics import average_precision_score

    rows = []
    g = torch.Generator().manual_seed(seed)
    for (pos_mu, pos_sd), (neg_mu, neg_sd), share in GAUSSIAN_CASES:
        target = torch.rand(pixels, generator=g) < share
        z = torch.randn(pixels, generator=g)
        probs = torch.sigmoid(torch.where(target, z * pos_sd + pos_mu, z * neg_sd + neg_mu))
        metric = StandardMetrics(score_bits=score_bits)
        metric.update(
            probs.reshape(1, 1, 1, -1).expand(1, len(LESIONS), 1, -1),
            target.reshape(1, 1, 1, -1).expand(1, len(LESIONS), 1, -1),
        )
        rows.append(
            {
                "logits": f"pos N({pos_mu:g},{pos_sd:g}) neg N({neg_mu:g},{neg_sd:g}) {share:.1%}",
                "sklearn": float(average_precision_score(target.numpy(), probs.numpy())),
                "streaming": metric.compute()["AP"][LESIONS[0]],
                "linear_bins": linear_bins_ap(probs, target),
            }
        )
    return rows


def format_agreement_table(rows: list[dict]) -> str:
    lines = [f"{'logits':<38} {'sklearn':>8} {'streaming':>10} {'10k linear bins':>16}"]
    for row in rows:
        lines.append(
            f"{row['logits']:<38} {row['sklearn']:>8.4f} {row['streaming']:>10.4f} {row['linear_bins']:>16.4f}"
        )
    return "\n".join(lines)


def format_ap_table(rows: list[dict]) -> str:
    lines = [f"{'scores':<16} {'pixels':>11} {'streaming s':>12} {'sklearn s':>10} {'speed-up':>9} {'max |ΔAP|':>10}"]
    for row in rows:
        lines.append(
            f"{row['scores']:<16} {row['pixels']:>11,} {row['streaming_s']:>12.3f} {row['sklearn_s']:>10.3f} "
            f"{row['speedup']:>8.1f}x {row['max_abs_ap_diff']:>10.2e}"
        )
    return "\n".join(lines)
