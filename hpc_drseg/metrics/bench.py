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


def format_ap_table(rows: list[dict]) -> str:
    lines = [f"{'scores':<16} {'pixels':>11} {'streaming s':>12} {'sklearn s':>10} {'speed-up':>9} {'max |ΔAP|':>10}"]
    for row in rows:
        lines.append(
            f"{row['scores']:<16} {row['pixels']:>11,} {row['streaming_s']:>12.3f} {row['sklearn_s']:>10.3f} "
            f"{row['speedup']:>8.1f}x {row['max_abs_ap_diff']:>10.2e}"
        )
    return "\n".join(lines)
