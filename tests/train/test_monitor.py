"""Validation monitors: best epoch / early stopping on train.monitor, ReduceLROnPlateau on optim.plateau_monitor."""

from __future__ import annotations

import math

import pytest

from hpc_drseg.config import load_config
from hpc_drseg.config.checks import ConfigError
from hpc_drseg.config.schema import VALIDATION_QUANTITIES
from hpc_drseg.train.monitor import BestTracker, LRPlateau, TrainingMonitor
from hpc_drseg.train.validate import flatten_results


def test_plateau_follows_torch_semantics():
    """torch: reduce once more than `patience` epochs without an improvement beyond 1e-4 relative, then restart."""
    plateau = LRPlateau("min", factor=0.5, patience=2, min_scale=0.2)
    for value in (1.0, 0.99995, 1.2, 1.1):  # 0.99995 is within the 1e-4 relative threshold: not an improvement
        plateau.update(value)
    assert plateau.state.lr_scale == 0.5 and plateau.state.bad_epochs == 0
    for value in (0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95):
        plateau.update(value)
    assert plateau.state.lr_scale == 0.2  # 0.5 * 0.5 = 0.25, then clamped at min_scale
    plateau.update(math.nan)
    assert plateau.state.bad_epochs == 1


def test_best_tracker_and_early_stopping():
    best = BestTracker("max", stop_patience=2)
    assert best.update(math.nan, 0) is False
    assert best.update(0.3, 1) is True and best.update(0.3, 2) is False  # strictly better wins
    assert not best.should_stop
    assert best.update(0.1, 3) is False and best.should_stop
    assert (best.state.best, best.state.best_epoch) == (0.3, 1)


def test_two_monitors_watch_their_own_quantity_and_round_trip():
    monitor = TrainingMonitor(
        best=BestTracker("max", 15),
        plateau=LRPlateau("min", factor=0.5, patience=0),
        monitor="val/mAP",
        plateau_monitor="val/loss",
    )
    monitor.update({"val/mAP": 0.2, "val/loss": 1.0}, 0)
    monitor.update({"val/mAP": 0.3, "val/loss": 1.5}, 1)  # AP improves while the loss does not
    assert monitor.improved and monitor.lr_scale == 0.5
    restored = TrainingMonitor(BestTracker("max", 15), LRPlateau("min", 0.5, 0), "val/mAP", "val/loss")
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict() == monitor.state_dict()


def test_paper_defaults_and_validated_names():
    cfg = load_config(None, [])
    assert (cfg.optim.plateau_monitor, cfg.optim.plateau_mode) == ("val/loss", "min")
    assert (cfg.train.monitor, cfg.train.monitor_mode) == ("val/mAP", "max")
    assert load_config(None, ["optim.plateau_monitor=val/mIoU"]).optim.plateau_mode == "max"
    for override, key in (
        ("optim.plateau_monitor=val/AP", "optim.plateau_monitor"),
        ("train.monitor=mAP", "train.monitor"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_validation_logs_exactly_the_quantities_monitors_may_name():
    lesion = {"MA": 0.1, "EX": 0.2, "SE": 0.3, "HE": 0.4}
    standard = {"AP": lesion, "IoU": lesion, "mAP": 0.1, "mIoU": 0.1, "mDice": 0.1, "mAUPR11": 0.1}
    paper = {"mAP": 0.2, "mIoU": 0.2}
    logged = {f"val/{key}" for key in flatten_results(paper, standard, 0.5)}
    assert logged == set(VALIDATION_QUANTITIES)
