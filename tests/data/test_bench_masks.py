"""`drseg bench masks`: the per-rule lesion-area ratios and microaneurysm survival on hand-made masks with known
answers, on a synthetic DDR tree (the default rule within AREA_RATIO_BOUNDS), and through the command line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hpc_drseg.cli import main
from hpc_drseg.config.choices import MASK_RESIZE_RULES
from hpc_drseg.data.bench import AREA_RATIO_BOUNDS, format_mask_resize_table, mask_resize_stats, mask_resize_table


def test_stats_on_hand_made_masks() -> None:
    """64 → 16 px: MA = two 1-px dots (one on a sampled pixel, 4i+2), EX = an aligned 8×8 square, SE/HE empty."""
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[10, 10, 0] = 1  # sampled by nearest
    mask[41, 41, 0] = 1  # not sampled
    mask[16:24, 32:40, 1] = 1
    rows = {r["rule"]: r for r in mask_resize_stats([mask], 16)}
    assert list(rows) == list(MASK_RESIZE_RULES)
    for rule, ma_ratio, ma_kept in (("nearest", 16 / 2, 1), ("area", 0.0, 0), ("any", 32 / 2, 2)):
        row = rows[rule]
        assert row["images"] == 1 and row["ma_components"] == 2 and row["image_px"] == 16
        assert row["area_ratio"]["MA"] == pytest.approx(ma_ratio), rule
        assert row["area_ratio"]["EX"] == pytest.approx(1.0), rule  # whole footprints: every rule is exact
        assert math.isnan(row["area_ratio"]["SE"]) and math.isnan(row["area_ratio"]["HE"])
        assert row["ma_kept"] == ma_kept and row["ma_kept_fraction"] == ma_kept / 2, rule


def test_table_on_a_synthetic_tree(tmp_path: Path) -> None:
    from hpc_drseg.data.synth import write_synthetic_ddr

    root = write_synthetic_ddr(tmp_path / "ddr", counts={"train": 6}, size_px=1600, seed=1, progress=False, workers=1)
    rows = {r["rule"]: r for r in mask_resize_table(root, 512)}
    low, high = AREA_RATIO_BOUNDS
    for lesion, ratio in rows["nearest"]["area_ratio"].items():
        assert math.isnan(ratio) or low <= ratio <= high, (lesion, ratio)
    assert rows["any"]["ma_kept_fraction"] == 1.0
    assert rows["any"]["area_ratio"]["MA"] > rows["nearest"]["area_ratio"]["MA"]
    text = format_mask_resize_table(list(rows.values()))
    assert "| nearest |" in text and "| any |" in text and "100.0 %" in text
    assert f"default rule `nearest`: lesion area within [{low}, {high}]" in text


def test_cli(tmp_path: Path, make_ddr, capsys) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 2}, size_px=96)
    assert main(["bench", "masks", "--ddr-root", str(root), "--image-px", "32"]) == 0
    out = capsys.readouterr().out
    assert "masks resized to 32 px" in out and "| area |" in out
    assert main(["bench", "masks", "--ddr-root", str(root), "--image-px", "0"]) == 2
    assert "--image-px: got 0" in capsys.readouterr().err
    assert main(["bench", "masks", "--ddr-root", str(tmp_path / "none")]) == 2
