"""RunLogger without trackers: metrics.csv and plots/training_curves.png after each epoch (within its time share; a
failure to plot is a warning), and the progress bars on stderr."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import pytest

from hpc_drseg.train import logs
from hpc_drseg.train.logs import CurvesPlot, RunLogger, progress_bar

PNG = b"\x89PNG\r\n\x1a\n"


def _row(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "step": 3 * epoch + 3, "lr": 1e-4, "train/total": 1 / (epoch + 1), "val/mAP": 0.1 * epoch}


def _end_epochs(logger: RunLogger, epochs: int) -> None:
    for epoch in range(epochs):
        logger.history.append(_row(epoch))
        logger.epoch_row(logger.history[-1])


def test_epoch_rows_write_metrics_csv_and_training_curves(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(logs, "CURVES_TIME_SHARE", math.inf)  # every epoch, however short
    logger = RunLogger(tmp_path / "run", enabled=True, history=[])
    _end_epochs(logger, 2)
    logger.close()
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["val/mAP"]) for row in rows] == [0.0, 0.1]
    assert (tmp_path / "run" / "plots" / "training_curves.png").read_bytes()[:8] == PNG
    assert logger.curves.rows == 2


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path / "run", enabled=False, history=[])
    _end_epochs(logger, 1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_curves_take_at_most_their_share_of_the_training_time(tmp_path: Path) -> None:
    curves, history, png = CurvesPlot(tmp_path), [_row(0)], tmp_path / "plots" / "training_curves.png"
    curves.refresh(history)  # right at the start: no training time yet to spend 5 % of
    assert not png.exists()
    curves.started = time.perf_counter() - 100.0  # 100 s of training: 5 s of plotting allowed
    curves.spent_s, curves.next_cost_s = 4.5, 1.0
    curves.refresh(history)
    assert not png.exists()
    curves.spent_s = 0.0
    curves.refresh(history)
    assert png.read_bytes()[:8] == PNG and curves.spent_s == curves.next_cost_s > 0
    png.unlink()
    curves.refresh(history)  # nothing new since the last figure
    assert not png.exists()


def test_a_failure_to_plot_is_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(logs, "CURVES_TIME_SHARE", math.inf)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plots").write_text("a file where the plots folder should be")
    logger = RunLogger(run_dir, enabled=True, history=[])
    with caplog.at_level(logging.WARNING, logger="hpc_drseg.train"):
        _end_epochs(logger, 1)
    assert "plots/training_curves.png not updated" in caplog.text
    assert (run_dir / "metrics.csv").is_file() and logger.curves.rows == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bar_goes_to_stderr_on_rank_0_only(enabled: bool, capsys) -> None:
    bar = progress_bar(8, "eval test", enabled, unit="img")
    bar.update(4)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert ("eval test" in captured.err and "8/8" not in captured.err and "4/8" in captured.err) == enabled
    assert (captured.err == "") == (not enabled)
