"""Synthetic fundus images in the layout of IDRiD's segmentation release (data/idrid.py), for tests and docs: the
images of data/fundus.py, JPEG images named IDRiD_NN.jpg, single-channel 0/255 TIFF masks written by OpenCV, and — as
IDRiD does — no mask file where an image has none of a lesion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hpc_drseg.data.fundus import image_shape, render_fundus
from hpc_drseg.data.idrid import IMAGES_DIR, LESION_DIRS, MASKS_DIR, SEGMENTATION_DIR, SET_DIRS
from hpc_drseg.data.synth import JPEG_QUALITY, check_args, run_jobs, write_synth_tree
from hpc_drseg.errors import InputError
from hpc_drseg.host import usable_cores

IDRID_COUNTS: dict[str, int] = {"train": 54, "test": 27}  # IDRiD's segmentation release: IDRiD_01-54, IDRiD_55-81
_WRITTEN = re.compile(  # the relative paths of everything else write_synthetic_idrid writes
    rf"{re.escape(SEGMENTATION_DIR)}(?:/(?:{re.escape(IMAGES_DIR)}(?:/(?:{'|'.join(map(re.escape, SET_DIRS.values()))})"
    rf"(?:/IDRiD_\d+\.jpg)?)?|{re.escape(MASKS_DIR)}(?:/(?:{'|'.join(map(re.escape, SET_DIRS.values()))})"
    rf"(?:/(?:{'|'.join(map(re.escape, LESION_DIRS))})(?:/IDRiD_\d+_(?:MA|HE|EX|SE)\.tif)?)?)?))?"
)


@dataclass(frozen=True)
class _Sample:
    """Everything a worker needs to render and write one image; picklable."""

    root: str
    seed: int
    split: str
    index: int
    image_id: str
    size_px: int


def _plan(root: Path, counts: Mapping[str, int], size_px: int, seed: int) -> list[_Sample]:
    """IDRiD numbers its images across both sets: training IDRiD_01…, then testing."""
    samples, number = [], 0
    for split in SET_DIRS:
        for index in range(counts.get(split, 0)):
            number += 1
            samples.append(_Sample(str(root), seed, split, index, f"IDRiD_{number:02d}", size_px))
    return samples


def _make_samples(samples: list[_Sample]) -> int:
    """Renders and writes images with the masks of the lesions they hold; each RNG depends on (seed, split, index)
    only, and differs from the DDR generator's, so the two synthetic datasets hold different images."""
    for sample in samples:
        rng = np.random.default_rng([sample.seed, 0x1D41D, list(SET_DIRS).index(sample.split), sample.index])
        rgb, masks = render_fundus(rng, *image_shape(rng, sample.size_px))
        base = Path(sample.root) / SEGMENTATION_DIR
        image = base / IMAGES_DIR / SET_DIRS[sample.split] / f"{sample.image_id}.jpg"
        if not cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {image}")
        for folder, code in LESION_DIRS.items():
            if not masks[code].any():
                continue  # IDRiD ships no file for a lesion the image does not show
            path = base / MASKS_DIR / SET_DIRS[sample.split] / folder / f"{sample.image_id}_{code}.tif"
            if not cv2.imwrite(str(path), masks[code]):
                raise OSError(f"could not write {path}")
    return len(samples)


def write_synthetic_idrid(
    out: str | Path,
    counts: Mapping[str, int] | None = None,
    size_px: int = 1024,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Writes a synthetic IDRiD segmentation tree `out/A. Segmentation/…` atomically, with synth.MARKER at its top;
    returns `out`. `counts`: {'train': n, 'test': m} (default IDRiD's 54/27; IDRiD has no valid set). Same seed →
    same files whatever `workers`; --overwrite replaces only a tree of `drseg synth`, as write_synthetic_ddr."""
    if counts is not None and counts.get("valid"):
        raise InputError(f"counts: valid={counts['valid']}; IDRiD has no validation set (drseg shard carves one)")
    counts = check_args({k: v for k, v in (counts or IDRID_COUNTS).items() if k != "valid"}, size_px, seed, workers)

    def fill(tmp: Path) -> None:
        for split in counts:
            (tmp / SEGMENTATION_DIR / IMAGES_DIR / SET_DIRS[split]).mkdir(parents=True)
            for folder in LESION_DIRS:
                (tmp / SEGMENTATION_DIR / MASKS_DIR / SET_DIRS[split] / folder).mkdir(parents=True)
        samples = _plan(tmp, counts, size_px, seed)
        run_jobs(samples, _make_samples, min(workers or usable_cores(), len(samples)), progress, "synth IDRiD")

    return write_synth_tree(out, overwrite, _WRITTEN, fill, counts, size_px, seed, layout="idrid")
