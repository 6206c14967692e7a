"""A trial's numbers: validation metrics at its best epoch (RUN/metrics.csv, by train.monitor) and test metrics of
both evaluation protocols (RUN/eval_<split>.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hpc_drseg.report import PROTOCOLS, best_row, read_metrics_csv

VAL_METRICS = ("val/mAP", "val/mIoU", "val/mDice")
TEST_METRICS = ("mAP", "mIoU")


def summary_metric_names(split: str) -> list[str]:
    """Every metric a sweep summary can show and rank by, e.g. val/mAP, test/paper/mIoU."""
    return [*VAL_METRICS, *(f"{split}/{protocol}/{name}" for protocol in PROTOCOLS for name in TEST_METRICS)]


def trial_metrics(run_dir: Path, split: str, monitor: str, monitor_mode: str) -> dict[str, float]:
    """Validation metrics at the best epoch (by `monitor`, RUN/metrics.csv) and test metrics (RUN/eval_<split>.json)."""
    metrics: dict[str, float] = {}
    best = best_row(read_metrics_csv(run_dir), monitor, monitor_mode)
    if best is not None:
        metrics.update({name: best.get(name, math.nan) for name in VAL_METRICS})
        metrics["best_epoch"] = best.get("epoch", math.nan)
    path = Path(run_dir) / f"eval_{split}.json"
    if path.is_file():
        for protocol, values in json.loads(path.read_text())["protocols"].items():
            for name in TEST_METRICS:
                metrics[f"{split}/{protocol}/{name}"] = _as_float(values.get(name))
    return metrics


def _as_float(value: Any) -> float:
    """eval_<split>.json writes a metric it could not compute as null."""
    return float(value) if isinstance(value, (int, float)) else math.nan
