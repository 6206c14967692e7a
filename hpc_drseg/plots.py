"""Figures shared by the training loop (RUN/plots/training_curves.png as epochs end), reports and sweeps: matplotlib
on the Agg backend, written atomically. Depends on nothing but constants and atomic writes, so train/ may use it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.atomic import atomic_writer
from hpc_drseg.constants import LESION_COLOURS, LESIONS

PLOTS_DIR = "plots"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: clusters have no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """savefig to a temporary file in the same folder, then rename: a reader never sees half a PNG."""
    try:
        with atomic_writer(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path


def lesion_colour(lesion: str) -> tuple[float, float, float]:
    return tuple(c / 255 for c in LESION_COLOURS[lesion])  # type: ignore[return-value]


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Optional[Path]:
    """Loss terms, validation means, per-lesion validation AP/IoU and the learning rate vs epoch; None without rows."""
    if not history:
        return None
    plt = pyplot()
    columns = list(history[0])
    epochs = [row.get("epoch", i) for i, row in enumerate(history)]

    def series(key: str) -> list[float]:
        return [row.get(key, math.nan) for row in history]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    losses, means, lesions, lr = axes.flat
    for key in [c for c in columns if c.startswith("train/")] + ["val/loss"]:
        if key in columns:
            losses.plot(epochs, series(key), "--" if key == "val/loss" else "-", marker=".", label=key)
    for key in ("val/mAP", "val/mIoU", "val/mDice", "val/mAUPR11", "val/paper_mAP", "val/paper_mIoU"):
        if key in columns:
            means.plot(epochs, series(key), marker=".", label=key)
    for lesion in LESIONS:
        for metric, style in (("AP", "-"), ("IoU", "--")):
            if f"val/{metric}_{lesion}" in columns:
                lesions.plot(
                    epochs,
                    series(f"val/{metric}_{lesion}"),
                    style,
                    marker=".",
                    color=lesion_colour(lesion),
                    label=f"{metric} {lesion}",
                )
    if "lr" in columns:
        rates = series("lr")
        lr.plot(epochs, rates, marker=".", color="black", label="lr")
        if all(r > 0 for r in rates if math.isfinite(r)) and any(math.isfinite(r) for r in rates):
            lr.set_yscale("log")
    titles = (
        "training loss terms (epoch means) and val/loss",
        "validation means (standard protocol; paper_*)",
        "validation per lesion (AP solid, IoU dashed)",
        "learning rate",
    )
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes.flat, titles):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)
