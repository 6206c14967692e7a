"""Samples and batches of the WebDataset shards written by data/shards.py: decoding a raw tar sample, checking a shard
against its manifest while it is read, and stacking samples into a Batch.

Every sample read must be the one the manifest lists at its place in its shard (so a shard that holds other, fewer or
more samples is an error naming it and the id), and every image and mask must be at the manifest's image_px.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from hpc_drseg.config.choices import IMAGE_CODECS
from hpc_drseg.data.encoding import decode_image, decode_png, unpack_masks
from hpc_drseg.data.manifest import MANIFEST, iter_shard_samples
from hpc_drseg.errors import InputError


class Batch(NamedTuple):
    """One batch of images and their lesion masks.

    Layout: `image` and `mask` are indexed (B, C, H, W) but stored NHWC, i.e. in torch.channels_last memory format:
    each is a permuted view of the (B, H, W, C) array the samples were stacked into, never copied into NCHW. So a
    pinned host copy, the copy to the device and a channels-last model all keep that layout without a transpose;
    `x.contiguous()` gives the NCHW layout where it is wanted. The worker pipeline yields them on the CPU (pinned when
    training on CUDA), the on-device augmentation on the training device.
    """

    image: torch.Tensor
    """(B, 3, H, W) uint8 RGB, channels-last memory; normalisation happens on the device (data/normalize.py)."""
    mask: torch.Tensor
    """(B, 4, H, W) uint8 0/1 in LESIONS order, channels-last memory."""
    ids: list[str]
    native_masks: Optional[list[np.ndarray]]
    """Evaluation only: per image (4, h, w) uint8 0/1 at native resolution; None for training batches."""
    epoch: int = -1
    """Training only: the epoch this batch belongs to (-1 for evaluation batches)."""
    step: int = -1
    """Training only: its index in the epoch (the trainer checks it against its own position)."""


class Sample(NamedTuple):
    id: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    mask: np.ndarray
    """(H, W, 4) uint8 0/1."""
    native: Optional[np.ndarray]
    """(4, h, w) uint8 0/1 or None."""


def decode_sample(
    raw: dict[str, Any], shard: Path, with_native: bool = False, image_px: Optional[int] = None
) -> Sample:
    """Raw tar sample {'__key__', 'image.png' or 'image.npy', 'mask.png', ...} → Sample; masks stay H×W bit planes.

    `image_px`: the manifest's side; an image or mask of another size is an error naming the shard and the key
    (without augmentation nothing else would notice: it would train or be scored at the wrong size).
    """
    key = raw["__key__"]
    codec = next((c for c in IMAGE_CODECS if f"image.{c}" in raw), None)
    needed = ("mask.png",) + (("native.png",) if with_native else ())
    absent = [ext for ext in needed if ext not in raw] + ([] if codec else [f"image.{IMAGE_CODECS[0]}"])
    if absent:
        raise InputError(
            f"shard {shard}: sample '{key}' lacks {absent} (has {sorted(k for k in raw if k != '__key__')}); "
            "re-run `drseg shard --overwrite`"
        )
    image = decode_image(raw[f"image.{codec}"], codec, f"shard {shard}: {key}.image.{codec}")
    name = f"shard {shard}: {key}.mask.png"
    mask = unpack_masks(decode_png(raw["mask.png"], name), name=name)
    if mask.shape[:2] != image.shape[:2]:
        raise InputError(f"shard {shard}: sample '{key}' has image {image.shape} and mask {mask.shape}; re-shard")
    if image_px is not None and image.shape[:2] != (image_px, image_px):
        height, width = image.shape[:2]
        raise InputError(
            f"shard {shard}: sample '{key}' is {width}×{height} px but {shard.parent / MANIFEST} says image_px="
            f"{image_px}; the shards and their manifest disagree: re-run `drseg shard --overwrite`"
        )
    native = None
    if with_native:
        name = f"shard {shard}: {key}.native.png"
        native = unpack_masks(decode_png(raw["native.png"], name), channels_first=True, name=name)
    return Sample(key, image, mask, native)


def checked_samples(path: Path, expected: list[str], count: int) -> Iterator[dict[str, Any]]:
    """The first `count` raw samples of shard `path`, each checked to be the one its manifest lists at that place
    (`expected`: the manifest's ids of this shard, in order). With count = len(expected) the shard is read to its
    end, so a sample after the listed ones is found too; with fewer, reading stops after the last one needed."""
    position = 0
    if count <= 0:
        return
    with contextlib.closing(iter_shard_samples(path)) as samples:
        for raw in samples:
            if position >= len(expected) or raw["__key__"] != expected[position]:
                raise _unlisted_sample(path, position, raw["__key__"], expected)
            position += 1
            yield raw
            if position == count < len(expected):
                return
    if position < count:
        raise InputError(
            f"shard {path} ends after {position} samples but {path.parent / MANIFEST} lists {len(expected)} in it "
            f"(first missing: '{expected[position]}'); re-run `drseg shard --overwrite`"
        )


def _unlisted_sample(path: Path, position: int, key: str, expected: list[str]) -> InputError:
    listed = f"'{expected[position]}'" if position < len(expected) else f"only {len(expected)} samples"
    return InputError(
        f"shard {path} holds sample '{key}' at position {position} where {path.parent / MANIFEST} lists {listed}; "
        "the shards and their manifest disagree: re-run `drseg shard --overwrite`"
    )


def channels_last_view(nhwc: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) → the same memory indexed (B, C, H, W): channels-last, no copy."""
    return nhwc.permute(0, 3, 1, 2)


def collate(samples: list[Sample], with_native: bool = False, epoch: int = -1, step: int = -1) -> Batch:
    """Stacks (H, W, C) arrays into one (B, H, W, C) array each and views it as (B, C, H, W): one copy per tensor
    (the stack), none for the layout (see Batch)."""
    image = channels_last_view(torch.from_numpy(np.stack([s.image for s in samples])))
    mask = channels_last_view(torch.from_numpy(np.stack([s.mask for s in samples])))
    natives = [s.native for s in samples] if with_native else None
    return Batch(image, mask, [s.id for s in samples], natives, epoch, step)
