"""`drseg shard`: converts a DDR tree (real or synthetic), or another layout's dataset (data/layouts.py), into
WebDataset tar shards plus manifest.json, atomically, never over its own input and replacing only a previous output of
the same command. Sample encoding: encoding.py; resize rules: resize.py; reading shards back: manifest.py.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import cv2
from tqdm import tqdm

from hpc_drseg import __version__
from hpc_drseg.atomic import (
    check_replaceable_output,
    make_temporary_folder,
    output_path,
    raise_if_disk_full,
    refuse_overlap,
    remove_stale_temporaries,
    replace_folder,
)
from hpc_drseg.config.choices import IMAGE_CODECS, MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.data.ddr import DDRReader, SampleFiles
from hpc_drseg.data.encoding import ENCODING, NATIVE_SPLITS, EncodedSample, encode_job
from hpc_drseg.data.layouts import Reader
from hpc_drseg.data.manifest import FORMAT, MANIFEST
from hpc_drseg.data.resize import MASK_RESIZE_DESCRIPTIONS
from hpc_drseg.errors import InputError
from hpc_drseg.host import usable_cores

log = logging.getLogger(__name__)

SAMPLES_PER_SHARD = 16  # DDR valid (149) → 10 shards, test (225) → 15: enough to split by shard over ranks × workers
_TAR_MTIME = 0  # fixed member metadata so that the same input always gives byte-identical shards


# ------------------------------------------------------------------------------------------------------ writing
class _SplitWriter:
    """Streams encoded samples of one split into consecutive tar shards and accumulates the manifest entry."""

    def __init__(self, folder: Path, split: str, samples_per_shard: int) -> None:
        self.folder, self.split, self.samples_per_shard = folder, split, samples_per_shard
        self.tar: Optional[tarfile.TarFile] = None
        self.info: dict[str, Any] = {
            "images": 0,
            "lesion_images": dict.fromkeys(LESIONS, 0),
            "lesion_pixels": dict.fromkeys(LESIONS, 0),
            "lesion_pixels_resized": dict.fromkeys(LESIONS, 0),
            "total_pixels": 0,
            "missing_masks": 0,
            "non_binary_masks": 0,
            "has_native": split in NATIVE_SPLITS,
            "shards": [],
            "shard_sizes": [],
            "ids": [],
        }
        self.non_binary_files: list[str] = []

    def add(self, sample: EncodedSample) -> None:
        info = self.info
        if not info["shard_sizes"] or info["shard_sizes"][-1] == self.samples_per_shard:
            self._open_next_shard()
        for name, data in sample.members:
            member = tarfile.TarInfo(name)
            member.size, member.mtime, member.mode = len(data), _TAR_MTIME, 0o444
            self.tar.addfile(member, io.BytesIO(data))
        info["shard_sizes"][-1] += 1
        info["ids"].append(sample.id)
        info["images"] += 1
        for lesion, native, resized in zip(LESIONS, sample.lesion_pixels, sample.lesion_pixels_resized):
            info["lesion_images"][lesion] += int(native > 0)
            info["lesion_pixels"][lesion] += native
            info["lesion_pixels_resized"][lesion] += resized
        info["total_pixels"] += sample.total_pixels
        info["missing_masks"] += sample.missing_masks
        info["non_binary_masks"] += len(sample.non_binary_files)
        self.non_binary_files.extend(sample.non_binary_files)

    def _open_next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.info['shards']):06d}.tar"
        self.tar = tarfile.open(self.folder / name, "w", format=tarfile.PAX_FORMAT)
        self.info["shards"].append(name)
        self.info["shard_sizes"].append(0)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _encoded(jobs: list[tuple[SampleFiles, str, int, bool, str, str]], workers: int) -> Iterator[EncodedSample]:
    """Encodes in input order, whatever the number of processes (so the output does not depend on it)."""
    if workers <= 1:
        yield from map(encode_job, jobs)
        return
    with multiprocessing.Pool(workers, initializer=cv2.setNumThreads, initargs=(0,)) as pool:
        yield from pool.imap(encode_job, jobs, chunksize=1)


class _Options(NamedTuple):
    image_px: int
    allow_missing_masks: bool
    samples_per_shard: int
    workers: int
    image_codec: str
    mask_resize: str


def _collect(reader: Reader) -> dict[str, list[SampleFiles]]:
    """Lists and validates every split before anything is written, so layout errors cost no work."""
    samples = {split: reader.samples(split) for split in reader.splits()}
    for files in (f for split_files in samples.values() for f in split_files):
        if "." in files.id:
            raise InputError(
                f"image {files.image}: its id '{files.id}' holds a '.', which WebDataset reads as an extension "
                "separator; rename the image and its masks without dots"
            )
    return samples


def _check_args(image_px: int, samples_per_shard: int, image_codec: str, mask_resize: str) -> None:
    if image_codec not in IMAGE_CODECS:
        raise InputError(f"image_codec: got {image_codec!r}; choose one of {list(IMAGE_CODECS)} (CLI: --image-codec)")
    if mask_resize not in MASK_RESIZE_RULES:
        raise InputError(
            f"mask_resize: got {mask_resize!r}; choose one of {list(MASK_RESIZE_RULES)} (CLI: --mask-resize)"
        )
    if image_px <= 0 or image_px % 32:
        raise InputError(f"image_px: got {image_px}; it must be a positive multiple of 32 (e.g. 256, 512, 1024)")
    if samples_per_shard < 1:
        raise InputError(f"samples_per_shard: got {samples_per_shard}; it must be >= 1")


# What `drseg shard` writes into its folder, and nothing else: --overwrite replaces only such a folder.
_SHARD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})-[0-9]{{6}}\.tar")


def _not_shards_reason(folder: Path) -> Optional[str]:
    """Why `folder` is not a previous output of write_shards (None if it is one, or empty): its manifest.json must
    say tool hpc_drseg, and every entry must be that manifest or a `{split}-NNNNNN.tar` regular file."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    try:
        tool = json.loads((folder / MANIFEST).read_text()).get("tool")
    except (OSError, ValueError, AttributeError):  # absent, unreadable, not JSON, not an object
        tool = None
    if tool != "hpc_drseg":
        return f"no {MANIFEST} of drseg shard in it"
    for entry in entries:
        written = entry.name == MANIFEST or _SHARD_NAME.fullmatch(entry.name)
        if not written or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}, which drseg shard does not write"
    return None


def write_shards(
    ddr_root: str | Path | Reader,
    out: str | Path,
    image_px: int = 512,
    overwrite: bool = False,
    allow_missing_masks: bool = False,
    workers: Optional[int] = None,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    progress: bool = True,
    image_codec: str = "png",
    mask_resize: str = MASK_RESIZE_RULES[0],
) -> dict[str, Any]:
    """Writes `{split}-NNNNNN.tar` shards and manifest.json for every split of the DDR tree, or of the dataset a
    Reader of data/layouts.py gives as `ddr_root`; returns the manifest.

    The output appears all at once (written into a temporary sibling folder, synced, then renamed) or not at all.
    `out` may not be, contain or lie inside `ddr_root`; an existing `out` is replaced only with overwrite=True, and
    only if it is a shard folder written by this function (never a file, a symlink or a folder of other files).
    Temporaries of `out` left by a killed earlier run are removed first. A full disk raises NoSpaceError.

    `workers`: encoding processes (None = all cores); the bytes written do not depend on it. `image_codec`: see
    IMAGE_CODECS. `mask_resize`: how masks shrink to image_px, one of MASK_RESIZE_RULES (see resize_mask). Layout
    errors (ddr.find_samples) are raised before any image is read.
    """
    _check_args(image_px, samples_per_shard, image_codec, mask_resize)
    reader = DDRReader(ddr_root, allow_missing_masks) if isinstance(ddr_root, (str, os.PathLike)) else ddr_root
    refuse_overlap(out, reader.root, reader.root_option)  # named as the user gave them; compared with symlinks resolved
    out = output_path(out)
    check_replaceable_output(out, overwrite, _not_shards_reason, "a shard folder written by drseg shard")
    base = reader.source
    samples = _collect(reader)
    if "train" not in samples:
        log.warning("%s has no train split: these shards can be scored (drseg eval) but not trained on", base)
    total = sum(len(files) for files in samples.values())
    workers = usable_cores() if workers is None else workers
    options = _Options(
        image_px, allow_missing_masks, samples_per_shard, max(1, min(workers, total)), image_codec, mask_resize
    )
    remove_stale_temporaries(out)
    tmp = None
    try:
        tmp = make_temporary_folder(out)
        manifest = _manifest_header(base, image_px, samples_per_shard, image_codec, mask_resize)
        manifest.update(layout=reader.layout, dataset=reader.dataset, **reader.manifest_fields())
        with tqdm(total=total, desc=f"shard {out.name}", unit="img", disable=not progress) as bar:
            for split, files in samples.items():
                manifest["splits"][split] = _write_split(tmp, split, files, options, bar)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_folder(tmp, out)  # fsyncs the tars and the manifest first
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, out)
        raise
    return manifest


def _manifest_header(
    base: Path, image_px: int, samples_per_shard: int, image_codec: str, mask_resize: str
) -> dict[str, Any]:
    return {
        "tool": "hpc_drseg",
        "version": __version__,
        "format": FORMAT,
        "image_px": image_px,
        "image_codec": image_codec,
        "lesions": list(LESIONS),
        "samples_per_shard": samples_per_shard,
        "encoding": ENCODING,
        "mask_resize": mask_resize,
        "mask_resize_description": MASK_RESIZE_DESCRIPTIONS[mask_resize],
        "pixel_counts": "lesion_pixels and total_pixels at native resolution; lesion_pixels_resized at image_px",
        "source": str(base),
        "splits": {},
    }


def _write_split(folder: Path, split: str, files: list[SampleFiles], options: _Options, bar: tqdm) -> dict[str, Any]:
    writer = _SplitWriter(folder, split, options.samples_per_shard)
    jobs = [
        (f, split, options.image_px, options.allow_missing_masks, options.image_codec, options.mask_resize)
        for f in files
    ]
    try:
        for sample in _encoded(jobs, options.workers):
            writer.add(sample)
            bar.update(1)
    finally:
        writer.close()
    if writer.non_binary_files:
        shown = ", ".join(writer.non_binary_files[:5])
        log.warning(
            "%s: %d mask file(s) hold more than one non-zero value and were binarised as > 0 (e.g. %s)",
            split,
            len(writer.non_binary_files),
            shown,
        )
    if writer.info["missing_masks"]:
        log.warning("%s: %d missing mask file(s) were treated as empty", split, writer.info["missing_masks"])
    return writer.info
