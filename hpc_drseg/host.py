"""Facts about the machine this process runs on. Standard library only."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: a SLURM job or taskset may grant fewer than the node has, and os.cpu_count()
    would oversubscribe them."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
