"""Part 6 of `drseg bench gpu`: a short real training run — DDR-sized synthetic data (383 train / 149 valid images at
512 px on a GPU), a few epochs through `hpc_drseg.train.train` — with its wall time split into start-up, training,
validation and checkpointing, and extrapolated to the paper's 100 epochs (goal: at most 3 minutes)."""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from hpc_drseg.gpu_check.context import Context

GOAL_100_EPOCHS_S = 180.0
EPOCHS_EXTRAPOLATED = 100


class PhaseClock:
    """Seconds spent in each phase, per epoch: wraps the trainer's own phase methods for the length of a run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_epoch_at: float | None = None
        self.epochs: list[dict[str, float]] = []

    def _timed(self, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if phase == "train":
                self.first_epoch_at = self.first_epoch_at or time.perf_counter()
                self.epochs.append({"train": 0.0, "validation": 0.0, "checkpoint": 0.0})
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if self.epochs:  # anything before the first epoch counts as start-up
                    self.epochs[-1][phase] += time.perf_counter() - began

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[PhaseClock]:
        """Trainer.run_epoch (training), Trainer.validate, Checkpointer.save/wait (checkpoint: the snapshot taken on
        the training thread and any wait for the background writer) — restored on the way out."""
        from hpc_drseg.train.checkpoint import Checkpointer
        from hpc_drseg.train.trainer import Trainer

        targets = [
            (Trainer, "run_epoch", "train"),
            (Trainer, "validate", "validation"),
            (Checkpointer, "save", "checkpoint"),
            (Checkpointer, "wait", "checkpoint"),
        ]
        originals = [(cls, name, getattr(cls, name)) for cls, name, _ in targets]
        try:
            for cls, name, phase in targets:
                setattr(cls, name, self._timed(phase, getattr(cls, name)))
            yield self
        finally:
            for cls, name, method in originals:
                setattr(cls, name, method)


def extrapolate(epochs: list[dict[str, float]], startup_s: float, count: int = EPOCHS_EXTRAPOLATED) -> float:
    """Start-up + `count` steady epochs; the steady epoch is the median of those after the first (the first pays
    cuDNN autotuning, allocator growth and the data stream's start), or the first when it is the only one."""
    totals = [sum(epoch.values()) for epoch in epochs]
    steady = statistics.median(totals[1:]) if len(totals) > 1 else totals[0]
    return startup_s + count * steady


def run(ctx: Context) -> None:
    from hpc_drseg.train.trainer import train

    epochs = ctx.sizes.full_run_epochs
    with tempfile.TemporaryDirectory(prefix="drseg-gpu-check-run-") as tmp:
        overrides = [*ctx.sizes.full_run_overrides, f"train.max_epochs={epochs}", f"train.run_dir={tmp}/run"]
        cfg = ctx.config(*overrides, "train.early_stop_patience=0")
        clock = PhaseClock()
        with clock.installed():
            result = train(cfg)
        wall_s = time.perf_counter() - clock.started
    startup_s = (clock.first_epoch_at or clock.started) - clock.started
    phases = {name: sum(epoch[name] for epoch in clock.epochs) for name in ("train", "validation", "checkpoint")}
    extrapolated = extrapolate(clock.epochs, startup_s) if clock.epochs else None
    history = [
        {key: row.get(key) for key in ("epoch", "epoch_time_s", "img_per_s", "train/total", "val/loss", "val/mAP")}
        for row in result.progress.history
    ]
    ctx.emit(
        {
            "kind": "full_run",
            "epochs": epochs,
            "train_images": ctx.sizes.synth_counts["train"],
            "valid_images": ctx.sizes.synth_counts["valid"],
            "image_px": ctx.sizes.image_px,
            "overrides": overrides,
            "stop": result.reason,
            "wall_s": wall_s,
            "startup_s": startup_s,
            "train_s": phases["train"],
            "validation_s": phases["validation"],
            "checkpoint_s": phases["checkpoint"],
            "other_s": wall_s - startup_s - sum(phases.values()),
            "per_epoch": clock.epochs,
            "history": history,
            "extrapolated_100_epochs_s": extrapolated,
            "goal_s": GOAL_100_EPOCHS_S,
            "goal_met": extrapolated is not None and extrapolated <= GOAL_100_EPOCHS_S,
        }
    )
