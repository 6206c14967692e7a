"""Graceful stop on SIGTERM / SIGUSR2 (SLURM's pre-timeout signal): finish the step, checkpoint, exit resumable.

The handler only raises a flag; the trainer polls it at step boundaries and agrees on it across ranks, so every
rank stops after the same step (a rank that stopped alone would hang the others in the next collective).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType
from typing import Optional

from hpc_drseg.constants import EXIT_RESUMABLE

__all__ = ["EXIT_RESUMABLE", "STOP_SIGNALS", "StopFlag", "die_with_launcher"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopFlag:
    """Set by SIGTERM/SIGUSR2 (or by hand); remembers which signal came first."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "manual") -> None:
        if self.signal_name is None:
            self.signal_name = name

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        self.request(signal.Signals(signum).name)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopFlag:
        if self.installed:
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def die_with_launcher() -> None:
    """A rank started by torchrun / accelerate launch (LOCAL_RANK set) gets SIGTERM when its launcher dies.

    Killed with SIGKILL (or by the OOM killer) the launcher cannot stop its ranks; unsupervised they would run on
    and a later run in the same folder would deadlock with them. With the signal they checkpoint and exit 75 like
    after any SIGTERM. A lone `drseg train` keeps running when its shell goes (nohup, a closed terminal).
    """
    if sys.platform.startswith("linux") and "LOCAL_RANK" in os.environ:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
