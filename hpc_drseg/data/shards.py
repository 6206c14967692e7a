"""Converts a DDR tree (real or synthetic) into WebDataset tar shards plus manifest.json, atomically; the resize rules
(images to image_px² by area averaging, masks by one of MASK_RESIZE_RULES) and the sample encoding live here.

Sample `<id>` in `{split}-NNNNNN.tar`: `<id>.image.png` (or `.image.npy`, see IMAGE_CODECS) RGB at image_px²,
`<id>.mask.png` the 4 masks bit-packed, `<id>.native.png` (valid/test) the same at native resolution, `<id>.json`
{id, split, native_hw}.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import cv2
import numpy as np
from tqdm import tqdm

from hpc_drseg import __version__
from hpc_drseg.atomic import (
    make_temporary_folder,
    output_path,
    raise_if_disk_full,
    refuse_non_folder,
    refuse_overlap,
    remove_stale_temporaries,
    replace_folder,
)
from hpc_drseg.config.choices import IMAGE_CODECS, MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.data.ddr import SampleFiles, available_splits, find_samples, read_sample, resolve_root
from hpc_drseg.errors import ExistsError, InputError, MissingError
from hpc_drseg.host import usable_cores

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NATIVE_SPLITS = ("valid", "test")  # the standard evaluation protocol scores these at native resolution
SAMPLES_PER_SHARD = 16  # DDR valid (149) → 10 shards, test (225) → 15: enough to split by shard over ranks × workers
# IMAGE_CODECS: how training images are stored; both lossless (no second lossy step after the source JPEG), so they
# decode to the same pixels. png: ~2.4× smaller (the default, kind to shared file systems); npy: raw arrays, decoding
# ~40× cheaper (512²: ~0.15 ms instead of ~6 ms, most of a loader worker's decode time) for nodes short of CPU.
ENCODING = {
    "image": "image.png or image.npy (manifest image_codec): RGB uint8 at image_px × image_px, lossless",
    "mask": "mask.png: 1-channel uint8 PNG, bit i set = lesion LESIONS[i] present (4 binary planes, lossless)",
    "native": "native.png (valid/test only): like mask.png at the image's native height × width",
    "json": "json: {id, split, native_hw: [height, width]}",
}
_PNG_LEVEL = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # zlib level 1: ~1.5× faster than 3, files ~7% larger; decode alike
FORMAT = 1  # bump when the sample encoding changes; readers refuse other formats
_TAR_MTIME = 0  # fixed member metadata so that the same input always gives byte-identical shards
# One line per mask-resize rule, written into the manifest beside the rule's name (resize_mask has the details).
MASK_RESIZE_DESCRIPTIONS = {
    "nearest": "shrink = the source pixel under the target pixel's centre (INTER_NEAREST_EXACT; the paper code's "
    "rule, area-true on average), enlarge = nearest",
    "area": "shrink = lesion where it covers >= 1/2 of the target pixel's footprint (INTER_AREA >= 0.5; area-true), "
    "enlarge = nearest",
    "any": "per axis: shrink = any lesion coverage in the footprint (INTER_AREA > 0; keeps every microaneurysm, "
    "dilates lesion area), enlarge = nearest",
}
LEGACY_MASK_RESIZE = "any"  # the only rule of shards written before the manifest named it
# A footprint exactly half covered must count for `area`; INTER_AREA's float32 weights of a non-integer scale sum to
# 1 only within ~1e-7, so the threshold sits a hair below 1/2.
_AREA_THRESHOLD = 0.5 - 1e-5


# --------------------------------------------------------------------------------------------------- resizing
def resize_image(image: np.ndarray, image_px: int) -> np.ndarray:
    """(H, W, 3) uint8 → (image_px, image_px, 3): area averaging when shrinking (no aliasing), else bicubic."""
    height, width = image.shape[:2]
    if (height, width) == (image_px, image_px):
        return image.copy()
    shrinking = image_px * image_px <= height * width
    return cv2.resize(image, (image_px, image_px), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def resize_mask(mask: np.ndarray, image_px: int, rule: str = MASK_RESIZE_RULES[0]) -> np.ndarray:
    """(H, W, C) uint8 0/1 → (image_px, image_px, C) 0/1 by `rule`, one of MASK_RESIZE_RULES.

    An enlarged axis always takes the source pixel under each target pixel's centre (nearest, centre-aligned), which
    keeps every source pixel. A shrunk axis depends on the rule (measured in docs/method.md, 1600 → 512 px):
    - `nearest` (default): the source pixel under the target pixel's centre (INTER_NEAREST_EXACT), as the paper's
      code. Unbiased in area on average; a 1-3 px microaneurysm survives only if a sampled pixel falls on it.
    - `area`: lesion where it covers at least half of the target pixel's footprint (INTER_AREA of the 0/1 mask
      ≥ 0.5). Area-true for lesions larger than a footprint; erases lesions smaller than half a footprint.
    - `any`: lesion where any source pixel under the footprint is (INTER_AREA > 0 per axis: exact max-pooling).
      Keeps every microaneurysm but dilates every lesion by up to a footprint (MA area ×2.2, EX ×1.4 on synthetic
      1600 px images at 512 px), so a model trained on it learns fat lesions; native-resolution evaluation does not
      undo that.
    """
    if rule not in MASK_RESIZE_RULES:
        raise InputError(f"mask_resize: got {rule!r}; choose one of {list(MASK_RESIZE_RULES)} (CLI: --mask-resize)")
    if rule == "any":
        return _resize_mask_any(mask, image_px)
    height, width = mask.shape[:2]
    out = mask
    if image_px > height or image_px > width:  # enlarged axes first: nearest, exact on uint8, commutes with the rest
        out = _resized(out, (max(width, image_px), max(height, image_px)), cv2.INTER_NEAREST_EXACT)
    if out.shape[:2] != (image_px, image_px):
        size = (image_px, image_px)
        if rule == "nearest":
            out = _resized(out, size, cv2.INTER_NEAREST_EXACT)
        else:  # INTER_AREA of a 0/1 mask is the covered fraction of each target pixel's footprint
            out = (_resized(out.astype(np.float32), size, cv2.INTER_AREA) >= _AREA_THRESHOLD).astype(np.uint8)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _resized(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize to (width, height) that keeps a trailing channel axis of size 1 (cv2 drops it)."""
    out = cv2.resize(array, size, interpolation=interpolation)
    return out[..., None] if out.ndim == 2 and array.ndim == 3 else out


def _resize_mask_any(mask: np.ndarray, image_px: int) -> np.ndarray:
    """The `any` rule: per axis, shrink = INTER_AREA on 0/1 float32 then > 0 (max over the footprint), enlarge =
    nearest (centre-aligned)."""
    out = mask
    for axis in (1, 0):  # width, then height
        source = out.shape[axis]
        if source == image_px:
            continue
        size = (image_px, out.shape[0]) if axis == 1 else (out.shape[1], image_px)
        if image_px < source:
            out = (_resized(out.astype(np.float32), size, cv2.INTER_AREA) > 0).astype(np.uint8)
        else:
            out = _resized(out, size, cv2.INTER_NEAREST_EXACT)
    return np.ascontiguousarray(out, dtype=np.uint8)


def mask_resize_rule(manifest: dict[str, Any]) -> str:
    """The mask-resize rule a manifest records; shards written before the manifest named it used `any` (their
    `mask_resize` entry, if any, is a description, not a rule name)."""
    rule = manifest.get("mask_resize")
    return rule if rule in MASK_RESIZE_RULES else LEGACY_MASK_RESIZE


# --------------------------------------------------------------------------------------------------- encoding
def pack_masks(mask: np.ndarray) -> np.ndarray:
    """(H, W, 4) 0/1 → (H, W) uint8 with bit i = channel i."""
    assert mask.shape[-1] == len(LESIONS) == 4, mask.shape
    # The 4 channel bytes of a pixel read as one little-endian word w (byte i = channel i); shifting byte i down to
    # bit i and masking is ~10× faster than a weighted sum over the strided channel axis.
    word = np.ascontiguousarray(mask, dtype=np.uint8).view("<u4")[..., 0]
    return ((word | word >> 7 | word >> 14 | word >> 21) & 0xF).astype(np.uint8)


# Row v: the 4 channel bits of the packed value v. A table lookup (np.take) is ~8× faster than shifting words.
_UNPACK_TABLE = np.array([[(value >> bit) & 1 for bit in range(4)] for value in range(16)], dtype=np.uint8)


def unpack_masks(packed: np.ndarray, channels_first: bool = False, name: str = "mask") -> np.ndarray:
    """(H, W) uint8 → (H, W, 4) uint8 0/1, the inverse of pack_masks; (4, H, W) with `channels_first`."""
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise InputError(f"{name}: a packed mask is (H, W) uint8; got {packed.shape} {packed.dtype}; re-shard")
    if packed.size and packed.max() > 15:
        raise InputError(f"{name}: packed mask values must be 0..15 (4 lesion bits), got {packed.max()}; re-shard")
    if channels_first:
        return np.take(_UNPACK_TABLE.T, packed, axis=1)
    return np.take(_UNPACK_TABLE, packed, axis=0)


def lesion_pixel_counts(packed: np.ndarray) -> list[int]:
    """Pixels per channel of a packed mask, from one histogram of the 16 possible values."""
    histogram = np.bincount(packed.ravel(), minlength=16)
    values = np.arange(16)
    return [int(histogram[(values >> bit) & 1 == 1].sum()) for bit in range(len(LESIONS))]


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) gray or (H, W, 3) RGB uint8 → PNG bytes."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array, _PNG_LEVEL)
    assert ok, "cv2.imencode failed on a valid uint8 array"
    return buffer.tobytes()


def decode_png(data: bytes, name: str) -> np.ndarray:
    """PNG bytes → (H, W) uint8 or (H, W, 3) RGB uint8, values unchanged (never expands gray masks to 3 channels)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise InputError(f"{name}: corrupt PNG in the shard; re-run `drseg shard --overwrite`")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


class EncodedSample(NamedTuple):
    id: str
    members: list[tuple[str, bytes]]
    """(tar member name, content) in the order they are written."""
    lesion_pixels: list[int]
    """Lesion pixels per channel at native resolution."""
    lesion_pixels_resized: list[int]
    total_pixels: int
    missing_masks: int
    non_binary_files: list[str]


def encode_image(image: np.ndarray, codec: str) -> bytes:
    """(H, W, 3) RGB uint8 → the bytes of `<id>.image.<codec>`."""
    if codec == "png":
        return encode_png(image)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def decode_image(data: bytes, codec: str, name: str) -> np.ndarray:
    """Inverse of encode_image: (H, W, 3) RGB uint8; a clear error naming `name` for anything else."""
    if codec == "png":
        image = decode_png(data, name)
    else:
        try:
            image = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{name}: corrupt .npy in the shard ({exc}); re-run `drseg shard --overwrite`") from exc
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{name}: expected an RGB uint8 image, got {image.shape} {image.dtype}; re-shard")
    return image


def encode_sample(
    files: SampleFiles,
    split: str,
    image_px: int,
    allow_missing_masks: bool,
    image_codec: str = "png",
    mask_resize: str = MASK_RESIZE_RULES[0],
) -> EncodedSample:
    """Reads, resizes and encodes one sample (runs in a pool worker)."""
    sample = read_sample(files, allow_missing_masks)
    packed_native = pack_masks(sample.masks)
    packed_small = pack_masks(resize_mask(sample.masks, image_px, mask_resize))
    height, width = sample.image.shape[:2]
    meta = {"id": files.id, "split": split, "native_hw": [height, width]}
    members = [
        (f"{files.id}.image.{image_codec}", encode_image(resize_image(sample.image, image_px), image_codec)),
        (f"{files.id}.mask.png", encode_png(packed_small)),
    ]
    if split in NATIVE_SPLITS:
        members.append((f"{files.id}.native.png", encode_png(packed_native)))
    members.append((f"{files.id}.json", json.dumps(meta, sort_keys=True).encode()))
    return EncodedSample(
        id=files.id,
        members=members,
        lesion_pixels=lesion_pixel_counts(packed_native),
        lesion_pixels_resized=lesion_pixel_counts(packed_small),
        total_pixels=height * width,
        missing_masks=len(sample.missing_masks),
        non_binary_files=[str(files.masks[lesion]) for lesion in sample.non_binary_masks],
    )


def _encode_job(job: tuple[SampleFiles, str, int, bool, str, str]) -> EncodedSample:
    return encode_sample(*job)


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
        yield from map(_encode_job, jobs)
        return
    with multiprocessing.Pool(workers, initializer=cv2.setNumThreads, initargs=(0,)) as pool:
        yield from pool.imap(_encode_job, jobs, chunksize=1)


class _Options(NamedTuple):
    image_px: int
    allow_missing_masks: bool
    samples_per_shard: int
    workers: int
    image_codec: str
    mask_resize: str


def _collect(ddr_root: Path, allow_missing_masks: bool) -> dict[str, list[SampleFiles]]:
    """Lists and validates every split before anything is written, so layout errors cost no work."""
    samples = {split: find_samples(ddr_root, split, allow_missing_masks) for split in available_splits(ddr_root)}
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


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses an existing `out` unless it is a shard folder written by this command (so nothing of the user's can be
    lost by replacing it) and --overwrite was given. The first check comes first so that the error says at once
    when --overwrite would not help."""
    if not os.path.lexists(out):
        return
    refuse_non_folder(out)
    reason = _not_shards_reason(out)
    if reason:
        raise ExistsError(
            f"--out {out} exists and is not a shard folder written by drseg shard ({reason}); --overwrite replaces "
            "only those: remove it yourself or choose another --out"
        )
    if not overwrite:
        raise ExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")


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
    ddr_root: str | Path,
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
    """Writes `{split}-NNNNNN.tar` shards and manifest.json for every split of the DDR tree; returns the manifest.

    The output appears all at once (written into a temporary sibling folder, synced, then renamed) or not at all.
    `out` may not be, contain or lie inside `ddr_root`; an existing `out` is replaced only with overwrite=True, and
    only if it is a shard folder written by this function (never a file, a symlink or a folder of other files).
    Temporaries of `out` left by a killed earlier run are removed first. A full disk raises NoSpaceError.

    `workers`: encoding processes (None = all cores); the bytes written do not depend on it. `image_codec`: see
    IMAGE_CODECS. `mask_resize`: how masks shrink to image_px, one of MASK_RESIZE_RULES (see resize_mask). Layout
    errors (ddr.find_samples) are raised before any image is read.
    """
    _check_args(image_px, samples_per_shard, image_codec, mask_resize)
    refuse_overlap(out, ddr_root, "--ddr-root")  # named as the user gave them; compared with symlinks resolved
    out = output_path(out)
    _check_out(out, overwrite)
    base = resolve_root(ddr_root)
    samples = _collect(base, allow_missing_masks)
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


# ------------------------------------------------------------------------------------------------------ reading
def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """Loads and checks `shards_dir/manifest.json`."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise MissingError(
            f"{path} not found: {shards_dir} is not a shard folder; run `drseg shard --ddr-root DIR --out "
            f"{shards_dir}` first"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); re-run `drseg shard --overwrite`") from exc
    if not isinstance(manifest, dict) or manifest.get("tool") != "hpc_drseg" or "splits" not in manifest:
        raise InputError(f"{path} was not written by `drseg shard`; re-run `drseg shard --overwrite`")
    if manifest.get("format") != FORMAT or manifest.get("lesions") != list(LESIONS):
        raise InputError(
            f"{path}: shard format {manifest.get('format')} with lesions {manifest.get('lesions')} does not match "
            f"this hpc_drseg ({FORMAT}, {list(LESIONS)}); re-run `drseg shard --overwrite`"
        )
    _check_manifest_types(manifest, path)
    return manifest


class _FieldCheck(NamedTuple):
    expected: str
    """What the field must be, as the error says it."""
    ok: Callable[[Any], bool]


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_list_of(value: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and all(item(v) for v in value)


def _is_file_name(value: Any) -> bool:
    """A shard named in the manifest is a plain file name in the shard folder, never a path elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


# Every manifest field a reader uses (trainer, loaders, bench, report). The optional ones are absent from manifests
# of older versions and checked when present.
_TOP_FIELDS = {
    "image_px": _FieldCheck("a positive integer", lambda v: _is_int(v, 1)),
    "image_codec": _FieldCheck(f"one of {list(IMAGE_CODECS)}", lambda v: isinstance(v, str) and v in IMAGE_CODECS),
    "mask_resize": _FieldCheck("a string", lambda v: isinstance(v, str)),
    "samples_per_shard": _FieldCheck("a positive integer", lambda v: _is_int(v, 1)),
}
_OPTIONAL_TOP = ("image_codec", "mask_resize", "samples_per_shard")
_SPLIT_FIELDS = {
    "images": _FieldCheck("an integer >= 0", lambda v: _is_int(v, 0)),
    "shards": _FieldCheck("a list of shard file names", lambda v: _is_list_of(v, _is_file_name)),
    "shard_sizes": _FieldCheck("a list of integers >= 0", lambda v: _is_list_of(v, lambda n: _is_int(n, 0))),
    "ids": _FieldCheck("a list of strings", lambda v: _is_list_of(v, lambda i: isinstance(i, str))),
    "has_native": _FieldCheck("true or false", lambda v: isinstance(v, bool)),
}


def _field_error(path: Path, field: str, expected: str, value: Any) -> InputError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return InputError(
        f"{path}: field '{field}' must be {expected}, got {shown} ({type(value).__name__}); "
        "re-run `drseg shard --overwrite`"
    )


def _check_manifest_types(manifest: dict[str, Any], path: Path) -> None:
    """Every field a reader uses has the type and the consistency the writer gives it, so that a hand-edited or
    damaged manifest is one error naming the field and the file, not a TypeError deep inside a loader."""
    for field, check in _TOP_FIELDS.items():
        if field in manifest or field not in _OPTIONAL_TOP:
            value = manifest.get(field)
            if not check.ok(value):
                raise _field_error(path, field, check.expected, value)
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not all(isinstance(info, dict) for info in splits.values()):
        raise _field_error(path, "splits", "an object mapping each split to an object", splits)
    for split, info in splits.items():
        for field, check in _SPLIT_FIELDS.items():
            value = info.get(field)
            if not check.ok(value):
                raise _field_error(path, f"splits.{split}.{field}", check.expected, value)
        _check_split_counts(path, split, info)


def _check_split_counts(path: Path, split: str, info: dict[str, Any]) -> None:
    """One size per shard, one id per image, and the shard sizes add up to the images."""
    shards, sizes, ids, images = info["shards"], info["shard_sizes"], info["ids"], info["images"]
    if len(sizes) != len(shards) or sum(sizes) != images or len(ids) != images:
        raise InputError(
            f"{path}: split '{split}' lists {images} images, {len(ids)} ids and shard sizes {sizes} for "
            f"{len(shards)} shards; they must agree (one size per shard, summing to the images); re-run "
            "`drseg shard --overwrite`"
        )


def split_info(manifest: dict[str, Any], split: str, shards_dir: str | Path = "") -> dict[str, Any]:
    """The manifest entry of `split`, with an error that names the shard folder and lists the available splits."""
    splits = manifest["splits"]
    if split not in splits:
        where = f"the shards {shards_dir}" if str(shards_dir) else "these shards"
        raise InputError(
            f"split '{split}' is not in {where}; available: {sorted(splits) or 'none'} (check data.train_split / "
            f"data.val_split / eval.split, or shard a DDR tree that has lesion_segmentation/{split}/)"
        )
    return splits[split]


def shard_groups(shards_dir: str | Path, info: dict[str, Any]) -> list[tuple[Path, list[str]]]:
    """(shard path, its sample ids) of one split's manifest entry, in order; every shard file must exist."""
    groups, start = [], 0
    for name, size in zip(info["shards"], info["shard_sizes"]):
        path = Path(shards_dir) / name
        if not path.is_file():
            raise MissingError(
                f"shard {path} listed in {Path(shards_dir) / MANIFEST} is missing; re-run `drseg shard --overwrite`"
            )
        groups.append((path, info["ids"][start : start + size]))
        start += size
    return groups


def iter_shard_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Yields {'__key__': id, '<ext>': bytes, ...} per sample of one tar; a damaged file is an error naming it."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"shard {path} is unreadable or truncated ({exc}); re-run `drseg shard --overwrite`") from exc
    if sample:
        yield sample
