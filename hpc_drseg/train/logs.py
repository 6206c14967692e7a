"""Run logs on rank 0: a progress bar, RUN/metrics.csv (one row per epoch), TensorBoard events under RUN/tb."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import torch

from hpc_drseg.atomic import atomic_write_text


class _NullBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, history: list[dict[str, float]]) -> None:
        self.run_dir, self.enabled, self.history = Path(run_dir), enabled, history
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.run_dir / "tb"))

    def progress_bar(self, total: int, initial: int, desc: str):
        if not self.enabled:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def step_scalars(self, step: int, terms: dict[str, torch.Tensor], lr: float, img_per_s: float, bar) -> None:
        """Every log_every_steps: one host sync for all terms, then the bar and TensorBoard."""
        values = {k: float(v) for k, v in zip(terms, torch.stack(list(terms.values())).tolist())}
        bar.update(1)
        bar.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{img_per_s:.1f}")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.add_scalar("train/lr", lr, step)
            self._writer.add_scalar("train/img_per_s", img_per_s, step)

    def epoch_row(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("epoch", "step"):
                self._writer.add_scalar(f"epoch/{key}", value, step)
        self._writer.flush()
        atomic_write_text(self.run_dir / "metrics.csv", _csv_text(self.history))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _csv_text(rows: list[dict[str, float]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
