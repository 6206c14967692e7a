"""The decoded training set on the training device: uint8 images (N, H, W, 3) and bit-packed masks (N, H, W), read
once from the shards with the same readers and manifest checks as the loader workers (data/samples.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from hpc_drseg.data.encoding import pack_masks
from hpc_drseg.data.samples import checked_samples, decode_sample
from hpc_drseg.data.stream import TrainData

_READ_THREADS = 8  # PNG decoding releases the GIL: shards are read in parallel threads


class DeviceTrainSet(NamedTuple):
    ids: list[str]
    """Sample index → id, as TrainData.ids."""
    images: torch.Tensor
    """(N, H, W, 3) uint8 RGB on the device."""
    masks: torch.Tensor
    """(N, H, W) uint8, bit i = lesion i (LESIONS order) on the device: a quarter of the unpacked planes' memory."""


def _read_shard(data: TrainData, shard: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(sample index, image, packed mask) of this shard's training samples; every sample up to the last of them is
    checked against the manifest as it is read."""
    listed, members = data.listed[shard], data.members[shard]
    wanted = {data.ids[i]: i for i in members}
    count = max(listed.index(sample_id) for sample_id in wanted) + 1
    out = []
    for raw in checked_samples(data.paths[shard], listed, count):
        index = wanted.get(raw["__key__"])
        if index is not None:
            sample = decode_sample(raw, data.paths[shard], False, data.image_px)
            out.append((index, sample.image, pack_masks(sample.mask)))
    return out


def load_train_set(data: TrainData, device: torch.device) -> DeviceTrainSet:
    """Reads and decodes every training sample once and moves the set to `device` (one copy per tensor)."""
    side = data.image_px
    images = np.empty((len(data.ids), side, side, 3), np.uint8)
    masks = np.empty((len(data.ids), side, side), np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, len(data.paths)))) as pool:
        for part in pool.map(lambda shard: _read_shard(data, shard), range(len(data.paths))):
            for index, image, mask in part:
                images[index], masks[index] = image, mask
    return DeviceTrainSet(list(data.ids), torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device))
