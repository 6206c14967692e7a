"""Helpers shared by the sweep tests (importable because tests/sweep/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
# A U-Net of width 8 for one step: each trial is dominated by process start-up (~10 s train + ~8 s eval on 2 cores).
TINY = [
    "model.name=unet",
    "model.unet_base_width=8",
    "train.steps_per_epoch=1",
    "train.max_epochs=1",
    "eval.score_bits=8",
]


def write_spec(folder: Path, **fields) -> Path:
    """FOLDER/spec.yaml: a debug-executor sweep of configs/debug.yaml into FOLDER/sweep, plus `fields`."""
    spec = {"base_config": str(DEBUG_YAML), "sweep_dir": str(folder / "sweep"), "executor": {"kind": "debug"}}
    spec.update(fields)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
