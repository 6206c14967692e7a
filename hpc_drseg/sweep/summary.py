"""`drseg sweep collect`: SWEEP_DIR/summary.md + summary.csv (one row per configuration, mean ± std over its completed
seeds, ranked) and plots/<metric>_vs_<key>.png for every numeric swept key."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.config import SweepConfig
from hpc_drseg.errors import InputError
from hpc_drseg.plots import pyplot, save_figure
from hpc_drseg.sweep.metrics import summary_metric_names, trial_metrics
from hpc_drseg.sweep.spec import Trial
from hpc_drseg.sweep.status import TRIAL_STATES, sweep_status
from hpc_drseg.sweep.store import load_sweep

_UNSET = object()  # a key this configuration does not set (explicit points may set different keys)


def collect_sweep(sweep_dir: str | Path, rank_by: Optional[str] = None) -> dict[str, Path]:
    """SWEEP_DIR/summary.md + summary.csv (one row per configuration, mean ± std over seeds, ranked) and plots/."""
    sweep_dir = Path(sweep_dir)
    spec, trials = load_sweep(sweep_dir)
    states = {row["trial"]: row["state"] for row in sweep_status(sweep_dir)}
    metric_names = summary_metric_names(spec.eval.split)
    rank_by = rank_by or spec.eval.rank_by
    if rank_by not in metric_names:
        raise InputError(f"rank_by: got {rank_by!r}; choose one of {metric_names}")
    keys = _swept_keys(trials)
    rows = _summary_rows(trials, states, metric_names, spec.eval.split)
    sign = -1.0 if spec.eval.rank_mode == "max" else 1.0
    rows.sort(key=lambda row: (math.isnan(row[rank_by][0]), sign * _nan_to(row[rank_by][0], 0.0)))
    paths = {"md": sweep_dir / "summary.md", "csv": sweep_dir / "summary.csv"}
    atomic_write_text(paths["csv"], _summary_csv(rows, keys, metric_names))
    atomic_write_text(paths["md"], _summary_md(spec, rows, keys, metric_names, rank_by, states))
    for key in keys:
        setting = [row for row in rows if key in row["params"]]  # explicit points may leave a key at its default
        if all(_is_number(row["params"][key]) for row in setting):
            paths[f"plot:{key}"] = _plot(sweep_dir, setting, key, rank_by)
    return paths


def _swept_keys(trials: dict[str, Trial]) -> list[str]:
    keys: list[str] = []
    for trial in trials.values():
        keys.extend(k for k in trial.params if k not in keys)
    return keys


def _summary_rows(
    trials: dict[str, Trial], states: dict[str, str], metric_names: list[str], split: str
) -> list[dict[str, Any]]:
    """One row per configuration: its params, seed counts by state and (mean, std, n) of every metric."""
    by_config: dict[str, list[Trial]] = {}
    for trial in trials.values():
        by_config.setdefault(trial.config_id, []).append(trial)
    rows = []
    for config_id, group in by_config.items():
        done = [t for t in group if states[t.id] == "COMPLETED"]
        values = [trial_metrics(Path(t.run_dir), split, t.monitor, t.monitor_mode) for t in done]
        row: dict[str, Any] = {
            "config": config_id,
            "params": group[0].params,
            "hash": group[0].config_hash,
            "n_seeds": len(done),
            "n_failed": sum(states[t.id] == "FAILED" for t in group),
            "n_pending": sum(states[t.id] in ("PENDING", "RUNNING") for t in group),
        }
        for name in metric_names:
            row[name] = _mean_std([v.get(name, math.nan) for v in values])
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n − 1) over seeds, ignoring NaN; std is NaN for fewer than 2 values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan, 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)), len(finite)


def _nan_to(value: float, fill: float) -> float:
    return fill if math.isnan(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt_value(value: Any) -> str:
    if value is _UNSET:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _fmt_mean_std(stats: tuple[float, float, int]) -> str:
    mean, std, _ = stats
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _summary_csv(rows: list[dict[str, Any]], keys: list[str], metric_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    stats_header = [f"{name}_{part}" for name in metric_names for part in ("mean", "std")]
    writer.writerow(["rank", "config", *keys, "n_seeds", "n_failed", "n_pending", "config_hash", *stats_header])
    for rank, row in enumerate(rows, 1):
        params = [_fmt_value(row["params"].get(k, _UNSET)) for k in keys]
        counts = [row["n_seeds"], row["n_failed"], row["n_pending"], row["hash"]]
        stats = ["" if math.isnan(v) else f"{v:.6g}" for name in metric_names for v in row[name][:2]]
        writer.writerow([rank, row["config"], *params, *counts, *stats])
    return buffer.getvalue()


def _summary_md(
    spec: SweepConfig,
    rows: list[dict[str, Any]],
    keys: list[str],
    metric_names: list[str],
    rank_by: str,
    states: dict[str, str],
) -> str:
    header = ["rank", "config", *keys, "n_seeds", "n_failed", *metric_names]
    lines = [
        f"# Sweep {spec.name}: {len(rows)} configurations × seeds {spec.seeds}",
        "",
        f"Ranked by **{rank_by}** ({spec.eval.rank_mode}); mean ± sample std over the completed seeds. Validation "
        f"metrics are those of the best epoch by each run's train.monitor; `{spec.eval.split}/<protocol>/…` come "
        f"from `drseg eval` (paper and standard protocols). Base config: `{spec.base_config}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, row in enumerate(rows, 1):
        params = [_fmt_value(row["params"].get(k, _UNSET)) for k in keys]
        stats = [_fmt_mean_std(row[m]) for m in metric_names]
        cells = [str(rank), row["config"], *params, str(row["n_seeds"]), str(row["n_failed"]), *stats]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(v == s for v in states.values()) for s in TRIAL_STATES}
    lines += ["", f"Trials: {', '.join(f'{n} {s}' for s, n in counts.items() if n)} (details: drseg sweep status)."]
    return "\n".join(lines) + "\n"


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], key: str, metric: str) -> Path:
    """Mean ± std of `metric` against the swept `key`, one point per configuration."""
    scored = [row for row in rows if not math.isnan(row[metric][0])]
    points = sorted((float(r["params"][key]), r[metric][0], _nan_to(r[metric][1], 0.0)) for r in scored)
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    if points:
        xs, means, stds = zip(*points)
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3)
        if min(xs) > 0 and max(xs) / min(xs) > 20:  # learning-rate-like keys read better on a log axis
            ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, sweep_dir / "plots" / f"{metric.replace('/', '_')}_vs_{key}.png")
