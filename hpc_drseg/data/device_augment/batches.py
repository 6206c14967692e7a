"""One rank's training batches augmented on the training device: the same samples per batch as the worker path
(data/stream.py's seeded, padded epoch permutations), the augmentation drawn from a generator seeded by
(seed, epoch, rank, batch). So a batch depends on those alone, and a resumed run goes on bit-identically."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hpc_drseg.config import AugmentConfig
from hpc_drseg.data.device_augment.store import DeviceTrainSet, load_train_set
from hpc_drseg.data.device_augment.transform import DeviceAugment, build_device_augment, unpack
from hpc_drseg.data.pipeline import load_train_data
from hpc_drseg.data.samples import Batch, channels_last_view
from hpc_drseg.data.stream import Order, epoch_batches, steps_per_epoch
from hpc_drseg.errors import InputError

_TABLE_STEPS = 256  # batches whose sample indices go to the device in one copy


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """A 63-bit seed for the augmentation of batch `batch` of `epoch` on `rank`, from nothing else."""
    state = np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class DeviceBatches:
    """TrainBatches' interface (`epoch(e, start)`, `close()`, `steps`, `num_images`) for the on-device path: each
    batch gathers its samples from the device-resident set and augments them there, in the trainer's process."""

    def __init__(self, train_set: DeviceTrainSet, order: Order, steps: int, augment: Optional[DeviceAugment]) -> None:
        self.train_set, self.order, self.steps, self.augment = train_set, order, steps, augment
        self.num_images = len(train_set.ids)
        self.device = train_set.images.device
        self.generator = torch.Generator(device=self.device)  # private: the trainer's RNG stream stays untouched
        self._table: Optional[tuple[int, int, list[list[int]], torch.Tensor]] = None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start`..steps-1 of `epoch`."""
        if epoch < 0 or not 0 <= start <= self.steps:
            raise InputError(f"epoch {epoch}, start batch {start}: need epoch >= 0 and 0 <= start <= {self.steps}")
        return (self.batch(epoch, step) for step in range(start, self.steps))

    def batch(self, epoch: int, step: int) -> Batch:
        indices, index = self._rows(epoch, step)
        image = self.train_set.images.index_select(0, index)
        packed = self.train_set.masks.index_select(0, index)
        ids = [self.train_set.ids[i] for i in indices]
        if self.augment is None:
            return Batch(channels_last_view(image), unpack(packed), ids, None, epoch, step)
        self.generator.manual_seed(batch_seed(self.order.seed, epoch, self.order.rank, step))
        image, mask = self.augment(image, packed, self.generator)
        return Batch(image, mask, ids, None, epoch, step)

    def _rows(self, epoch: int, step: int) -> tuple[list[int], torch.Tensor]:
        """Batch `step`'s sample indices: as a host list (its ids) and on the device (the gather). They come from a
        table of the next _TABLE_STEPS batches made when a batch is not in it: one small host-to-device copy per
        table (per epoch, with DDR's 96 steps), not one per step, which would wait for the device."""
        table = self._table
        if table is None or table[0] != epoch or not table[1] <= step < table[1] + len(table[2]):
            per_pass = steps_per_epoch(self.num_images, self.order.batch_size, self.order.world_size)
            rows: list[list[int]] = []
            for k in range(step, min(self.steps, step + _TABLE_STEPS)):
                if k == step or k % per_pass == 0:
                    indices = epoch_batches(self.num_images, *self.order, epoch, k // per_pass)[0]
                rows.append(indices[k % per_pass].tolist())
            table = self._table = (epoch, step, rows, torch.tensor(rows, dtype=torch.long).to(self.device))
        return table[2][step - table[1]], table[3][step - table[1]]

    def close(self) -> None:
        """Nothing runs in the background; the set stays on the device until this object is dropped."""


def build_device_batches(
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    augment: AugmentConfig,
    device: torch.device,
    steps: Optional[int] = None,
    subset: int = 0,
) -> DeviceBatches:
    """The whole training split (or its first `subset` samples) decoded onto `device`, batched as the worker path
    batches it (same arguments as pipeline.build_train_batches) and augmented there with `augment`'s preset."""
    if batch_size < 1 or seed < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise InputError(
            f"device batches: got batch_size={batch_size}, seed={seed}, rank={rank}, world_size={world_size}; need "
            "batch_size >= 1, seed >= 0 and 0 <= rank < world_size"
        )
    data = load_train_data(shards_dir, split, subset)
    steps = steps_per_epoch(len(data.ids), batch_size, world_size) if steps is None else steps
    if steps < 1:
        raise InputError(f"steps={steps}: need steps >= 1 (or None for one pass over the images)")
    device = torch.device(device)
    train_set = load_train_set(data, device)
    transform = build_device_augment(augment, data.image_px, device)
    return DeviceBatches(train_set, Order(batch_size, rank, world_size, seed), steps, transform)
