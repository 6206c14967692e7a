"""Run logs on rank 0: progress bars, RUN/metrics.csv (one row per epoch), RUN/plots/training_curves.png (refreshed
as epochs end) and the experiment trackers of train.trackers (train/trackers.py: TensorBoard events under RUN/tb,
MLflow, W&B), which Accelerate's `log` feeds."""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from hpc_drseg.atomic import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("hpc_drseg.train")

# Drawing plots/training_curves.png takes ~0.5-1 s of a CPU core (matplotlib's layout and PNG encoding; the first
# time also its import): refreshes may take at most this share of the training time. Every epoch of a real run (epochs
# of more than ~20 s) refreshes it; a tiny run's few-second epochs only now and then, or not at all.
CURVES_TIME_SHARE = 0.05


class _NullBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: Optional[int], desc: str, enabled: bool, unit: str = "step", initial: int = 0):
    """A tqdm bar on stderr, or one that does nothing (other ranks, --quiet)."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


class RunLogger:
    """`accelerator`: the Accelerator built with the run's trackers (train/trackers.py); rank 0 starts them here, under
    the run folder's lock, and ends them in close(). None: metrics.csv and the plot only."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        history: list[dict[str, float]],
        accelerator: Optional[Accelerator] = None,
    ) -> None:
        self.run_dir, self.enabled, self.history = Path(run_dir), enabled, history
        self.accelerator = accelerator if enabled else None
        self.curves = CurvesPlot(self.run_dir)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator is not None:
            try:
                # The trackers were built with their names and folders; the project name is only a required argument.
                self.accelerator.init_trackers(self.run_dir.name)
            except BaseException:
                # Accelerate lists every tracker before starting any: finishing one that never started would raise
                # over this error (in end_training), so end the started ones here and forget the rest.
                self._end_trackers()
                raise

    def progress_bar(self, total: int, initial: int, desc: str):
        return progress_bar(total, desc, self.enabled, initial=initial)

    def step_scalars(self, step: int, terms: dict[str, torch.Tensor], lr: float, img_per_s: float, bar) -> None:
        """Every log_every_steps: one host sync for all terms, then the bar and the trackers."""
        values = {k: float(v) for k, v in zip(terms, torch.stack(list(terms.values())).tolist())}
        bar.update(1)
        bar.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{img_per_s:.1f}")
        scalars = {f"train/{name}": value for name, value in values.items()}
        self._log({**scalars, "train/lr": lr, "train/img_per_s": img_per_s}, step)

    def epoch_row(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._log({f"epoch/{key}": value for key, value in row.items() if key not in ("epoch", "step")}, row["step"])
        atomic_write_text(self.run_dir / "metrics.csv", _csv_text(self.history))
        self.curves.refresh(self.history)

    def _log(self, values: dict[str, float], step: float) -> None:
        if self.accelerator is not None:
            self.accelerator.log(values, step=int(step))

    def close(self) -> None:
        """Ends the tracker runs while the run folder is still locked; Accelerate's end_training then finds none."""
        if self.enabled:
            self.curves.refresh(self.history)  # the last epochs, if the time share allows it now
        if self.accelerator is not None:
            self._end_trackers()

    def _end_trackers(self) -> None:
        """Every tracker is asked to finish; one that cannot (a tracking server gone) is a warning: the run's own
        files are complete, and the caller still has the run folder's lock to release."""
        trackers = self.accelerator.trackers
        while trackers:
            tracker = trackers.pop(0)
            try:
                tracker.finish()
            except Exception as exc:
                log.warning("tracker %s did not finish: %s: %s", tracker.name, type(exc).__name__, exc)


class CurvesPlot:
    """RUN/plots/training_curves.png, as nnU-Net's progress.png: the report's figure of the history so far (Agg
    backend, written atomically), within CURVES_TIME_SHARE of the time since training started. A figure is never worth
    a crash of the run: a failure to draw it is a warning."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.started = run_dir, time.perf_counter()
        self.spent_s, self.next_cost_s = 0.0, 2.0  # plotting so far; the next plot's cost (the first: + import)
        self.rows = 0  # history rows in the figure on disk

    def refresh(self, history: list[dict[str, float]]) -> None:
        budget_s = CURVES_TIME_SHARE * (time.perf_counter() - self.started)
        if len(history) == self.rows or self.spent_s + self.next_cost_s > budget_s:
            return
        begun = time.perf_counter()
        try:
            # plots.py holds the one training-curves figure (drseg eval/report redraw it from metrics.csv).
            from hpc_drseg.plots import PLOTS_DIR, plot_training_curves

            plot_training_curves(history, self.run_dir / PLOTS_DIR / "training_curves.png")
            self.rows = len(history)
        except Exception as exc:  # fonts, disk, matplotlib: a plot failure only costs the figure
            log.warning("%s/plots/training_curves.png not updated: %s: %s", self.run_dir, type(exc).__name__, exc)
        self.next_cost_s = time.perf_counter() - begun
        self.spent_s += self.next_cost_s


def _csv_text(rows: list[dict[str, float]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
