"""What a part of `drseg bench gpu` is handed in its worker process: where to write rows, the scratch folder shared
by the parts of one run (synthetic shards), its sizes (GPU or dry run) and the time it has. Standard library only."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_drseg.gpu_check.plan import CONFIG, Sizes
from hpc_drseg.gpu_check.results import append_row

STATUS_SUFFIX = ".status.json"


class PartSkipped(Exception):
    """Raised by a part that cannot run here (no CUDA, a missing import): recorded as skipped with the message."""


@dataclass(frozen=True)
class Context:
    part: str
    results: Path
    work: Path
    dry_run: bool
    sizes: Sizes
    until: float
    """time.time() by which the part must be done (the driver kills it then)."""

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    def left_s(self) -> float:
        return self.until - time.time()

    def emit(self, row: dict[str, Any]) -> None:
        """One row of results.jsonl (flushed and fsynced), tagged with this part's name; echoed to the log."""
        row = {"part": self.part, **row}
        append_row(self.results, row)
        print(json.dumps(row, default=str), flush=True)

    def config(self, *overrides: str) -> Any:
        """The paper model's config with this run's sizes, the synthetic shards and `overrides` (last wins)."""
        from hpc_drseg.config import load_config

        base = [*self.sizes.model_overrides, f"data.image_px={self.sizes.image_px}", f"data.shards={self.shards}"]
        base.append(f"data.num_workers={self.loader_workers()}")
        return load_config(self.repo_file(CONFIG), [*base, *overrides])

    def loader_workers(self, where_workers: bool = False) -> int:
        """Loader workers per process: on a GPU run all cores but two (left to the training process); in a dry run
        none, since each spawned worker imports torch again (seconds on a loaded 2-core machine), except one where the
        worker path itself is measured."""
        if self.dry_run:
            return 1 if where_workers else 0
        return max(1, min(12, (os.cpu_count() or 2) - 2))

    @staticmethod
    def repo_file(relative: str) -> Path:
        return Path(__file__).resolve().parents[2] / relative

    def write_status(self, status: str, reason: str) -> None:
        (self.work / f"{self.part}{STATUS_SUFFIX}").write_text(json.dumps({"status": status, "reason": reason}))
