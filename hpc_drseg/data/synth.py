"""Synthetic DDR-like fundus photographs and lesion masks, written in the official DDR layout.

Stands in for the DDR lesion-segmentation set (Li et al., 2019), which is never shipped: same folders, file types,
split sizes, lesion prevalence and lesion sizes, so readers, shards, training and the demo run on it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from hpc_drseg import __version__
from hpc_drseg.atomic import (
    check_replaceable_output,
    make_temporary_folder,
    output_path,
    raise_if_disk_full,
    remove_stale_temporaries,
    replace_folder,
)
from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.data.ddr import SUBSET_DIR
from hpc_drseg.data.fundus import MIN_SIDE_PX, image_shape, render_fundus
from hpc_drseg.errors import InputError
from hpc_drseg.host import usable_cores

DDR_COUNTS: dict[str, int] = {"train": 383, "valid": 149, "test": 225}
JPEG_QUALITY = 95
# Written into every synthetic tree: --overwrite replaces a folder only if it holds this marker and nothing but what
# write_synthetic_ddr writes, so it can never delete a real DDR copy or any other folder of the user's.
MARKER = ".hpc_drseg-synth.json"
_WRITTEN = re.compile(  # the relative paths of everything else write_synthetic_ddr writes
    rf"{SUBSET_DIR}(?:/(?:{'|'.join(SPLITS)})(?:/image(?:/[^/]+\.jpg)?"
    rf"|/label(?:/(?:{'|'.join(LESIONS)})(?:/[^/]+\.(?:tif|png))?)?)?)?"
)


# ---------------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class _Sample:
    """Everything a worker needs to render and write one image; picklable."""

    root: str
    seed: int
    split: str
    index: int
    image_id: str
    size_px: int
    mask_ext: str


def _image_ids(counts: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """DDR-looking ids ('007-1789-100'): a camera code, a strictly increasing serial (hence unique), a suffix."""
    rng = np.random.default_rng([seed, 0x1D5])
    serial = int(rng.integers(1000, 2000))
    ids: dict[str, list[str]] = {}
    for split in SPLITS:
        ids[split] = []
        for _ in range(counts.get(split, 0)):
            serial += int(rng.integers(1, 4))
            camera, suffix = int(rng.choice((7, 13, 20, 27))), 100 * int(rng.integers(1, 4))
            ids[split].append(f"{camera:03d}-{serial:04d}-{suffix:03d}")
    return ids


def _mask_ext(split_index: int, index: int) -> str:
    # Both formats in every split of ≥ 3 images, so readers are exercised on each (DDR ships .tif, some copies .png).
    return ".png" if (index + split_index) % 3 == 1 else ".tif"


def _plan(root: Path, counts: Mapping[str, int], size_px: int, seed: int) -> list[_Sample]:
    ids = _image_ids(counts, seed)
    return [
        _Sample(str(root), seed, split, i, image_id, size_px, _mask_ext(SPLITS.index(split), i))
        for split in SPLITS
        for i, image_id in enumerate(ids[split])
    ]


def _write_sample(root: Path, sample: _Sample, rgb: np.ndarray, masks: Mapping[str, np.ndarray]) -> None:
    folder = root / "lesion_segmentation" / sample.split
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    if not cv2.imwrite(str(folder / "image" / f"{sample.image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), jpeg):
        raise OSError(f"could not write {folder / 'image' / sample.image_id}.jpg")
    for lesion in LESIONS:
        path = folder / "label" / lesion / f"{sample.image_id}{sample.mask_ext}"
        if not cv2.imwrite(str(path), masks[lesion]):
            raise OSError(f"could not write {path}")


def _make_samples(samples: list[_Sample]) -> int:
    """Renders and writes images with their four masks; each RNG depends only on (seed, split, index)."""
    for sample in samples:
        rng = np.random.default_rng([sample.seed, SPLITS.index(sample.split), sample.index])
        height, width = image_shape(rng, sample.size_px)
        rgb, masks = render_fundus(rng, height, width)
        _write_sample(Path(sample.root), sample, rgb, masks)
    return len(samples)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process already fills the cores; OpenCV's own threads would oversubscribe


def run_jobs(samples: list, make: Callable[[list], int], workers: int, progress: bool, desc: str = "synth DDR") -> None:
    """Calls `make` (a module-level function: it crosses a process boundary) on chunks of `samples` in `workers`
    processes; `make` returns the samples it wrote, for the progress bar."""
    with tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        if workers <= 1:
            for sample in samples:
                bar.update(make([sample]))
            return
        # Small chunks: few inter-process round trips for small images, yet a smooth progress bar and balanced load.
        size = max(1, min(8, len(samples) // (8 * workers)))
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        # spawn, not fork: the caller may hold threads (torch, OpenCV) that a forked child would inherit locked.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = [pool.submit(make, chunk) for chunk in chunks]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def check_args(
    counts: Mapping[str, int] | None, size_px: int, seed: int, workers: int | None, default=DDR_COUNTS
) -> dict[str, int]:
    counts = dict(default if counts is None else counts)
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise InputError(f"counts: unknown split(s) {unknown}; use {list(SPLITS)}")
    bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise InputError(f"counts: {bad}; each count must be an integer >= 0")
    if sum(counts.values()) == 0:
        raise InputError(f"counts: {counts}; at least one split needs images (e.g. --train 8)")
    if size_px < MIN_SIDE_PX / 0.85:
        raise InputError(f"size_px: got {size_px}; it must be >= {math.ceil(MIN_SIDE_PX / 0.85)} (sides vary ±15%)")
    if seed < 0:
        raise InputError(f"seed: got {seed}; it must be >= 0")
    if workers is not None and workers < 1:
        raise InputError(f"workers: got {workers}; it must be >= 1 (or None for all available cores)")
    return {split: n for split, n in counts.items() if n > 0}


def not_synth_reason(folder: Path, written: re.Pattern[str]) -> str | None:
    """Why `folder` is not a tree of `drseg synth` (None if it is one, or empty): MARKER, and otherwise only relative
    paths that `written` matches in full, no symlinks."""
    if not any(folder.iterdir()):
        return None
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):  # absent, unreadable or not JSON
        marker = None
    if not isinstance(marker, dict) or (marker.get("tool"), marker.get("command")) != ("hpc_drseg", "synth"):
        return f"no {MARKER} in it"
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (relative == MARKER or written.fullmatch(relative)):
                return f"it holds {relative}, which drseg synth does not write"
    return None


def _write_marker(root: Path, counts: Mapping[str, int], size_px: int, seed: int, layout: str = "ddr") -> None:
    marker = {"tool": "hpc_drseg", "command": "synth", "version": __version__}
    marker.update(counts=dict(counts), size_px=size_px, seed=seed)
    if layout != "ddr":  # DDR trees keep the marker they always had
        marker["layout"] = layout
    (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def write_synthetic_ddr(
    out: str | Path,
    counts: Mapping[str, int] | None = None,
    size_px: int = 1024,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Writes a synthetic DDR-like tree `out/lesion_segmentation/{split}/{image,label/{EX,HE,MA,SE}}/` atomically,
    with MARKER at its top; returns `out`.

    `counts` maps split → images (default: DDR's 383/149/225; splits with 0 are not created). Image sides vary in
    [0.85, 1.15]·size_px. Same seed → same files, whatever the number of `workers` (default: all available cores).
    An existing `out` is replaced only with overwrite=True, and only if it is a tree written by this function (never
    a file, a symlink or a folder of other files). Temporaries of `out` left by a killed earlier run are removed
    first; a full disk raises NoSpaceError.
    """
    counts = check_args(counts, size_px, seed, workers)

    def fill(tmp: Path) -> None:
        for split in counts:
            for sub in ("image", *(f"label/{lesion}" for lesion in LESIONS)):
                (tmp / SUBSET_DIR / split / sub).mkdir(parents=True)
        samples = _plan(tmp, counts, size_px, seed)
        run_jobs(samples, _make_samples, min(workers or usable_cores(), len(samples)), progress)

    return write_synth_tree(out, overwrite, _WRITTEN, fill, counts, size_px, seed)


def write_synth_tree(
    out: str | Path,
    overwrite: bool,
    written: re.Pattern[str],
    fill: Callable[[Path], None],
    counts: Mapping[str, int],
    size_px: int,
    seed: int,
    layout: str = "ddr",
) -> Path:
    """What every `drseg synth` layout shares: `out` is replaced only with `overwrite` and only if it is an earlier
    tree of `drseg synth` (`written`: the relative paths that layout writes); `fill` builds the new tree in a
    temporary folder, which gets MARKER and is then swapped in (fsynced first). On any failure the temporary goes and
    `out` stays as it was; a full disk raises NoSpaceError."""
    target = output_path(out)
    check_replaceable_output(
        target, overwrite, lambda folder: not_synth_reason(folder, written), "a tree written by drseg synth"
    )
    remove_stale_temporaries(target)
    tmp = None
    try:
        tmp = make_temporary_folder(target)
        fill(tmp)
        _write_marker(tmp, counts, size_px, seed, layout)
        replace_folder(tmp, target)  # fsyncs every image and mask first
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, target)
        raise
    return Path(out)
