"""One rank's training batches, epoch after epoch: each epoch is a seeded permutation of the training set, padded to
the same number of whole batches on every rank (DDP would hang otherwise) as torch's DistributedSampler does, and
each sample's augmentation is seeded by its place in the epoch. A batch therefore depends only on (seed, epoch, rank,
batch index): any number of loader workers gives the same batches, and a resumed run skips consumed ones unread.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hpc_drseg.data.manifest import shard_groups
from hpc_drseg.data.samples import Batch, Sample, checked_samples, collate, decode_sample
from hpc_drseg.errors import InputError

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per epoch: the images divided by the global batch, rounded up (at least 1)."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("world_size", world_size)):
        if value < 1:
            raise InputError(f"steps_per_epoch: {name} must be >= 1, got {value}")
    return max(1, math.ceil(num_images / (batch_size * world_size)))


def epoch_batches(
    num_ids: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, pass_index: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One rank's batches of one pass over `num_ids` samples: (sample indices, positions), both (steps, batch_size).

    As torch's DistributedSampler(shuffle=True, drop_last=False) followed by batching on each rank: one permutation
    of all ids drawn from (seed, epoch, pass_index), shared by every rank and independent of the loader workers, is
    padded by repeating its first ids up to steps_per_epoch · batch_size · world_size entries (DDP needs the same
    number of whole batches on every rank; nothing is dropped), and rank r takes every world_size-th entry from r.
    A position is the entry's index in the padded order plus pass_index · its length: unique within an epoch, it
    seeds the sample's augmentation (`sample_seed`), so padding duplicates are augmented differently.
    """
    steps = steps_per_epoch(num_ids, batch_size, world_size)
    padded = steps * batch_size * world_size
    order = np.resize(np.random.default_rng([seed, epoch, pass_index]).permutation(num_ids), padded)  # cyclic
    places = np.arange(rank, padded, world_size)
    return order[places].reshape(steps, batch_size), (places + pass_index * padded).reshape(steps, batch_size)


def batch_rows(num_ids: int, order: Order, epoch: int, batch: int) -> tuple[list[int], list[int]]:
    """(sample indices, positions) of batch `batch` of `epoch` for order.rank: batch k is batch k mod S of pass k // S,
    S = steps_per_epoch (train.steps_per_epoch may cut an epoch short or take it on into further permutations)."""
    per_pass = steps_per_epoch(num_ids, order.batch_size, order.world_size)
    indices, positions = epoch_batches(num_ids, *order, epoch, batch // per_pass)
    return indices[batch % per_pass].tolist(), positions[batch % per_pass].tolist()


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the augmentation of the sample at `position` of an epoch (see `epoch_batches`).

    It depends on nothing else (not the rank's worker count, not the batches before it), so a sample is augmented
    identically with any number of workers, and a resumed epoch can skip batches without augmenting them.
    """
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def _seeded(seed: int, augment: Augment) -> Iterator[None]:
    """Seeds the augmentation's own generators (through an optional `reseed(seed)` method) and the global random,
    numpy and torch CPU generators for one sample, then restores the global ones: the result depends on `seed` alone
    in any process, and the trainer's process (num_workers = 0) keeps its RNG stream (dropout, exact resume)."""
    reseed = getattr(augment, "reseed", None)
    if callable(reseed):
        reseed(seed)
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


class Order(NamedTuple):
    """What fixes one rank's batches besides the epoch: `epoch_batches`' arguments between num_ids and epoch."""

    batch_size: int
    rank: int
    world_size: int
    seed: int


class TrainData(NamedTuple):
    """The samples trained on: ids (index = sample index), the shard of each, each shard's path and members, every
    id the manifest lists in each shard (in order: what reading checks), and the manifest's image_px."""

    ids: list[str]
    shard_of: list[int]
    paths: list[Path]
    members: list[list[int]]
    listed: list[list[str]]
    image_px: int


def train_data(folder: Path, info: dict[str, Any], subset: int, image_px: int) -> TrainData:
    """The split's samples, or with `subset` > 0 only its first `subset` in id order (a fixed subset: debug runs)."""
    count = info["images"] if subset <= 0 else min(subset, info["images"])
    data = TrainData([], [], [], [], [], image_px)
    for path, group_ids in shard_groups(folder, info):
        taken = group_ids[: count - len(data.ids)]
        if not taken:
            break
        data.members.append(list(range(len(data.ids), len(data.ids) + len(taken))))
        data.shard_of.extend([len(data.paths)] * len(taken))
        data.paths.append(path)
        data.listed.append(group_ids)
        data.ids.extend(taken)
    return data


class RawSamples:
    """Undecoded samples of one worker for one pass, read from the tar shards when a batch first needs them.

    A tar shard is a stream: reaching a sample means reading all those before it. So when a batch needs a sample not
    read yet, the worker reads its shard up to the last sample it still needs from it, keeps the raw bytes of every
    sample of that shard its later batches use, and drops a sample after its last use (padding may use one twice).
    Cost per pass: a worker reads each shard that holds one of its samples at most once, so at most the whole split
    (DDR's 383 training images at 512 px: a few hundred MB, mostly from the page cache that all ranks and workers
    of a node share; all of them together read at most ranks × workers times the split), and holds at most its own
    share of the split's bytes undecoded (split / (ranks × workers); under 100 MB per worker for DDR at 512 px with
    2 workers). Only this worker's samples are decoded and augmented, one batch at a time.
    """

    def __init__(self, data: TrainData, uses: Counter[int]) -> None:
        self.data, self.uses, self.cache = data, uses, {}

    def take(self, index: int) -> tuple[dict[str, Any], Path]:
        """The raw tar sample with sample index `index` and the shard it came from."""
        if index not in self.cache:
            self._read(self.data.shard_of[index])
        raw = self.cache[index]
        self.uses[index] -= 1
        if self.uses[index] == 0:
            del self.cache[index]
        return raw, self.data.paths[self.data.shard_of[index]]

    def _read(self, shard: int) -> None:
        """Caches every sample of `shard` still to be used, reading no further than the last of them (the rest of the
        shard holds nothing this worker needs in this pass)."""
        ids, listed = self.data.ids, self.data.listed[shard]
        wanted = {ids[i]: i for i in self.data.members[shard] if self.uses[i] > 0 and i not in self.cache}
        count = max(listed.index(sample_id) for sample_id in wanted) + 1
        for raw in checked_samples(self.data.paths[shard], listed, count):
            index = wanted.get(raw["__key__"])
            if index is not None:
                self.cache[index] = raw


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader process running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """One rank's batches at run positions `first`, `first` + 1, … (up to `stop`, or without end when None), run
    position g being batch g mod `steps` of epoch g // `steps`; DataLoader worker w of W makes positions first + w,
    first + w + W, …

    torch's DataLoader takes one batch from each worker in turn, so it yields the rank's batches in order, across
    epoch boundaries too: workers that live for the whole run go on into the next epoch while the trainer validates.
    """

    def __init__(
        self, data: TrainData, order: Order, steps: int, first: int, stop: Optional[int], augment: Optional[Augment]
    ) -> None:
        super().__init__()
        self.data, self.order, self.steps, self.augment = data, order, steps, augment
        self.first, self.stop = first, stop

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        if get_worker_info() is not None:
            cv2.setNumThreads(0)  # serial OpenCV in workers; 1 can deadlock a fork whose parent used the pool
        per_pass = steps_per_epoch(len(self.data.ids), self.order.batch_size, self.order.world_size)
        mine = itertools.count(self.first + worker, workers)
        if self.stop is not None:
            mine = itertools.takewhile(lambda g: g < self.stop, mine)
        # One group per (epoch, pass): within it the worker reads each shard it needs once (RawSamples).
        for (epoch, _), group in itertools.groupby(mine, key=lambda g: (g // self.steps, g % self.steps // per_pass)):
            yield from self._batches(epoch, [g % self.steps for g in group])

    def _batches(self, epoch: int, batches: list[int]) -> Iterator[Batch]:
        rows = [batch_rows(len(self.data.ids), self.order, epoch, batch) for batch in batches]
        raw = RawSamples(self.data, Counter(i for indices, _ in rows for i in indices))
        for batch, (indices, positions) in zip(batches, rows):
            samples = [self._sample(epoch, *raw.take(i), place) for i, place in zip(indices, positions)]
            yield collate(samples, epoch=epoch, step=batch)

    def _sample(self, epoch: int, raw: dict[str, Any], shard: Path, position: int) -> Sample:
        sample = decode_sample(raw, shard, False, self.data.image_px)
        if self.augment is None:
            return sample
        with _seeded(sample_seed(self.order.seed, epoch, position), self.augment):
            return _augmented(sample, self.augment)


def _augmented(sample: Sample, augment: Augment) -> Sample:
    image, mask = augment(sample.image, sample.mask)
    if image.shape != sample.image.shape or mask.shape != sample.mask.shape:
        raise ValueError(
            f"augment changed the shapes of sample '{sample.id}': image {sample.image.shape} → {image.shape}, "
            f"mask {sample.mask.shape} → {mask.shape}; it must keep them"
        )
    return Sample(sample.id, np.ascontiguousarray(image), np.ascontiguousarray(mask), None)
