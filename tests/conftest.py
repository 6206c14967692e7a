"""Shared fixtures: a small synthetic DDR tree and its shards, made once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import sys  # noqa: E402

# Shared test helpers (tree_snapshot.py) live beside this file; with --import-mode=importlib only folders on sys.path
# are importable.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_COUNTS = {"train": 8, "valid": 4, "test": 4}
TINY_SIZE_PX = 192
SHARDS_IMAGE_PX = 128
SHARDS_PER_SHARD = 2  # many small shards, so rank × worker splitting is exercised


def write_tiny_ddr(
    root: Path,
    counts: Mapping[str, int] = TINY_COUNTS,
    size_px: int = TINY_SIZE_PX,
    seed: int = 0,
    mask_ext: str = ".tif",
) -> Path:
    """A minimal tree in the official DDR layout (non-square JPEG images, 0/255 masks incl. 1-px MA); returns root.

    Hand-made on purpose: tests of bad inputs edit single files of it. The `ddr_root` fixture prefers the package's
    own synthetic generator.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "lesion_segmentation"
    for split, count in counts.items():
        for index in range(count):
            height, width = (int(v) for v in rng.integers(int(size_px * 0.85), int(size_px * 1.15) + 1, 2))
            sample_id = f"{split}_{index:03d}"
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            cv2.circle(image, (width // 2, height // 2), min(height, width) // 2 - 2, (40, 80, 160), -1)
            (base / split / "image").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(base / split / "image" / f"{sample_id}.jpg"), image)
            for lesion in ("EX", "HE", "MA", "SE"):
                folder = base / split / "label" / lesion
                folder.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / f"{sample_id}{mask_ext}"), _tiny_mask(rng, height, width, lesion))
    return Path(root)


def _tiny_mask(rng: np.random.Generator, height: int, width: int, lesion: str) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    if rng.random() < 0.2:  # some images lack the lesion, as in DDR
        return mask
    if lesion == "MA":  # single pixels: the case a nearest-neighbour resize erases
        ys, xs = rng.integers(0, height, 5), rng.integers(0, width, 5)
        mask[ys, xs] = 255
    else:
        for _ in range(int(rng.integers(1, 4))):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.circle(mask, centre, int(rng.integers(2, 9)), 255, -1)
    return mask


@pytest.fixture
def make_ddr() -> Callable[..., Path]:
    """`make_ddr(root, counts=..., size_px=..., seed=..., mask_ext='.tif')` writes a hand-made DDR tree."""
    return write_tiny_ddr


@pytest.fixture(scope="session")
def ddr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic DDR tree: 8 train / 4 valid / 4 test images of ~192 px (folder holding lesion_segmentation/)."""
    out = tmp_path_factory.mktemp("ddr") / "DDR-dataset"
    from hpc_drseg.data.synth import write_synthetic_ddr

    return Path(
        write_synthetic_ddr(out, counts=dict(TINY_COUNTS), size_px=TINY_SIZE_PX, seed=0, progress=False, workers=1)
    )


@pytest.fixture(scope="session")
def shards_dir(ddr_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ddr_root` sharded at 128 px with 2 samples per shard (train 4, valid 2, test 2 shards)."""
    from hpc_drseg.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(ddr_root, out, image_px=SHARDS_IMAGE_PX, samples_per_shard=SHARDS_PER_SHARD, workers=1, progress=False)
    return out
