"""Validation monitor: ReduceLROnPlateau, early stopping and best-checkpoint tracking in one checkpointable object.

Paper: ReduceLROnPlateau (factor 0.5, patience 5) and early stopping (patience 15) on a validation quantity. Written
here rather than torch's scheduler so it acts on any optimiser wrapper (DeepSpeed's included) and its whole state is
plain numbers that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hpc_drseg.errors import InputError


@dataclass
class MonitorState:
    best: float = math.nan
    best_epoch: int = -1
    epochs_since_best: int = 0
    epochs_since_lr_change: int = 0
    lr_scale: float = 1.0


class PlateauMonitor:
    """Call `update(value, epoch)` once per epoch; read `improved`, `lr_scale`, `should_stop`."""

    def __init__(self, mode: str, lr_factor: float, lr_patience: int, stop_patience: int, min_scale: float = 0.0):
        if mode not in ("max", "min"):
            raise InputError(f"monitor mode must be 'max' or 'min', got {mode!r}")
        self.mode, self.lr_factor, self.lr_patience = mode, lr_factor, lr_patience
        self.stop_patience, self.min_scale = stop_patience, min_scale
        self.state = MonitorState()
        self.improved = False

    def _better(self, value: float) -> bool:
        if math.isnan(self.state.best):
            return not math.isnan(value)
        return value > self.state.best if self.mode == "max" else value < self.state.best

    def update(self, value: float, epoch: int) -> None:
        state = self.state
        self.improved = self._better(value)
        if self.improved:
            state.best, state.best_epoch = value, epoch
            state.epochs_since_best = state.epochs_since_lr_change = 0
            return
        state.epochs_since_best += 1
        state.epochs_since_lr_change += 1
        # torch's ReduceLROnPlateau semantics: reduce once more than `patience` bad epochs have passed.
        if state.epochs_since_lr_change > self.lr_patience:
            state.lr_scale = max(state.lr_scale * self.lr_factor, self.min_scale)
            state.epochs_since_lr_change = 0

    @property
    def should_stop(self) -> bool:
        return self.stop_patience > 0 and self.state.epochs_since_best >= self.stop_patience

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = MonitorState(**state)
