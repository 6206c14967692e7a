"""Validation monitors: the best epoch (best.pt, early stopping) and ReduceLROnPlateau, each on its own quantity.

The paper's code steps ReduceLROnPlateau (factor 0.5, patience 5) on the validation loss and keeps the best checkpoint
and stops early (patience 15) on validation AP: two quantities, `optim.plateau_monitor` and `train.monitor`. Written
here rather than torch's scheduler so it acts on any optimiser wrapper (DeepSpeed's included) and its whole state is
plain numbers that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hpc_drseg.config.choices import MONITOR_MODES

# torch.optim.lr_scheduler.ReduceLROnPlateau's defaults, which the paper's code used: an epoch counts as an
# improvement only when it beats the best by more than this fraction of it (threshold_mode "rel").
PLATEAU_REL_THRESHOLD = 1e-4


@dataclass
class BestState:
    best: float = math.nan
    best_epoch: int = -1
    epochs_since_best: int = 0


@dataclass
class PlateauState:
    best: float = math.nan
    bad_epochs: int = 0
    lr_scale: float = 1.0


def _check_mode(mode: str) -> str:
    if mode not in MONITOR_MODES:
        raise ValueError(f"monitor mode must be one of {MONITOR_MODES}, got {mode!r}")
    return mode


class BestTracker:
    """The best value of `train.monitor` so far (strictly better wins) and early stopping after `stop_patience`."""

    def __init__(self, mode: str, stop_patience: int) -> None:
        self.mode, self.stop_patience = _check_mode(mode), stop_patience
        self.state = BestState()

    def update(self, value: float, epoch: int) -> bool:
        """Records one epoch's value; True when it is a new best."""
        state = self.state
        best = state.best
        improved = not math.isnan(value) and (
            math.isnan(best) or (value > best if self.mode == "max" else value < best)
        )
        if improved:
            state.best, state.best_epoch, state.epochs_since_best = value, epoch, 0
        else:
            state.epochs_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stop_patience > 0 and self.state.epochs_since_best >= self.stop_patience


class LRPlateau:
    """torch's ReduceLROnPlateau semantics: after more than `patience` epochs without a relative improvement of
    PLATEAU_REL_THRESHOLD, the learning rate is multiplied by `factor` (not below `min_scale`); the count restarts."""

    def __init__(self, mode: str, factor: float, patience: int, min_scale: float = 0.0) -> None:
        self.mode, self.factor, self.patience, self.min_scale = _check_mode(mode), factor, patience, min_scale
        self.state = PlateauState()

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.state.best
        if math.isnan(best):
            return True
        if self.mode == "min":
            return value < best - abs(best) * PLATEAU_REL_THRESHOLD
        return value > best + abs(best) * PLATEAU_REL_THRESHOLD

    def update(self, value: float) -> None:
        state = self.state
        if self._is_better(value):
            state.best, state.bad_epochs = value, 0
            return
        state.bad_epochs += 1
        if state.bad_epochs > self.patience:
            state.lr_scale = max(state.lr_scale * self.factor, self.min_scale)
            state.bad_epochs = 0


class TrainingMonitor:
    """Both monitors, stepped once per epoch with the validation metrics; one checkpointable state."""

    def __init__(self, best: BestTracker, plateau: LRPlateau, monitor: str, plateau_monitor: str) -> None:
        self.best, self.plateau = best, plateau
        self.monitor, self.plateau_monitor = monitor, plateau_monitor
        self.improved = False

    def update(self, metrics: dict[str, float], epoch: int) -> None:
        """`metrics`: {"val/…": value}; both monitored names are checked against it before step 0."""
        self.improved = self.best.update(metrics[self.monitor], epoch)
        self.plateau.update(metrics[self.plateau_monitor])

    @property
    def lr_scale(self) -> float:
        return self.plateau.state.lr_scale

    @property
    def should_stop(self) -> bool:
        return self.best.should_stop

    def state_dict(self) -> dict[str, Any]:
        return {"best": asdict(self.best.state), "plateau": asdict(self.plateau.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.state = BestState(**state["best"])
        self.plateau.state = PlateauState(**state["plateau"])


class LossWatch:
    """Non-finite losses, noticed without a host round trip per step.

    Each step only records, on the device, whether its loss was finite (and, on the host, its step and sample ids);
    `check` brings a whole window to the host at once, so the steady state never waits on the GPU for it. A NaN is
    then found up to one window late (its weights are not checkpointed: every save checks first), naming the first
    bad step and its samples.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._finite: list[torch.Tensor] = []
        self._steps: list[tuple[int, list[str]]] = []

    def record(self, loss: torch.Tensor, step: int, ids: list[str]) -> None:
        self._finite.append(torch.isfinite(loss.detach()))
        self._steps.append((step, ids))

    def check(self, epoch: int) -> None:
        """Raises FloatingPointError naming the first non-finite step of the window; empties the window."""
        if not self._finite:
            return
        finite = torch.stack(self._finite).cpu()  # the window's one host round trip
        steps, self._finite, self._steps = self._steps, [], []
        bad = (~finite).nonzero()
        if not len(bad):
            return
        step, ids = steps[int(bad[0])]
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch} step {step} (rank {self.rank}; {len(bad)} of steps "
            f"{steps[0][0]}-{steps[-1][0]} were); samples: {', '.join(ids)}. Lower optim.lr, use train.precision=no, "
            "or run with train.debug=true to find the operation"
        )
