"""How a sample is stored in a shard: lossless image codecs, the four lesion masks bit-packed into one PNG, the
native-resolution masks of the evaluation splits, and the per-sample JSON.

Sample `<id>`: `<id>.image.png` (or `.image.npy`, see IMAGE_CODECS) RGB at image_px², `<id>.mask.png` the 4 masks
bit-packed, `<id>.native.png` (valid/test) the same at native resolution, `<id>.json` {id, split, native_hw}.
"""

from __future__ import annotations

import io
import json
from typing import NamedTuple

import cv2
import numpy as np

from hpc_drseg.config.choices import MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import SampleFiles, read_sample
from hpc_drseg.data.resize import resize_image, resize_mask
from hpc_drseg.errors import InputError

NATIVE_SPLITS = ("valid", "test")  # the standard evaluation protocol scores these at native resolution
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


def encode_job(job: tuple[SampleFiles, str, int, bool, str, str]) -> EncodedSample:
    """encode_sample of one argument tuple: what a process pool maps over."""
    return encode_sample(*job)
