"""Per-rank reading of the WebDataset shards written by data/shards.py: an endless, seeded training stream cut to the
same number of steps on every rank (DDP would hang otherwise), and an evaluation stream that yields every sample
exactly once across ranks. Never pass these loaders through accelerator.prepare (it would re-split or broadcast).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_drseg.config.choices import IMAGE_CODECS
from hpc_drseg.data.shards import (
    decode_image,
    decode_png,
    iter_shard_samples,
    read_manifest,
    shard_groups,
    split_info,
    unpack_masks,
)
from hpc_drseg.errors import InputError

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Batch(NamedTuple):
    image: torch.Tensor
    """(B, 3, H, W) uint8 RGB; normalisation happens on the device in the trainer."""
    mask: torch.Tensor
    """(B, 4, H, W) uint8 0/1 in LESIONS order."""
    ids: list[str]
    native_masks: Optional[list[np.ndarray]]
    """Evaluation only: per image (4, h, w) uint8 0/1 at native resolution; None for training batches."""


class Sample(NamedTuple):
    id: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    mask: np.ndarray
    """(H, W, 4) uint8 0/1."""
    native: Optional[np.ndarray]
    """(4, h, w) uint8 0/1 or None."""


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per epoch: the images divided by the global batch, rounded up (at least 1)."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("world_size", world_size)):
        if value < 1:
            raise InputError(f"steps_per_epoch: {name} must be >= 1, got {value}")
    return max(1, math.ceil(num_images / (batch_size * world_size)))


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 63-bit seed, distinct per (seed, epoch, rank, worker), stable across runs and machines."""
    state = np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ------------------------------------------------------------------------------------------------- decoding
def decode_sample(raw: dict[str, Any], shard: Path, with_native: bool = False) -> Sample:
    """Raw tar sample {'__key__', 'image.png' or 'image.npy', 'mask.png', ...} → Sample; masks stay H×W bit planes."""
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
    native = None
    if with_native:
        name = f"shard {shard}: {key}.native.png"
        native = unpack_masks(decode_png(raw["native.png"], name), channels_first=True, name=name)
    return Sample(key, image, mask, native)


def collate(samples: list[Sample], with_native: bool = False) -> Batch:
    """Stacks (H, W, C) arrays into (B, C, H, W) uint8 tensors."""
    image = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    mask = torch.from_numpy(np.stack([s.mask for s in samples])).permute(0, 3, 1, 2).contiguous()
    natives = [s.native for s in samples] if with_native else None
    return Batch(image, mask, [s.id for s in samples], natives)


def _augmented(sample: Sample, augment: Optional[Augment]) -> Sample:
    if augment is None:
        return sample
    image, mask = augment(sample.image, sample.mask)
    if image.shape != sample.image.shape or mask.shape != sample.mask.shape:
        raise ValueError(
            f"augment changed the shapes of sample '{sample.id}': image {sample.image.shape} → {image.shape}, "
            f"mask {sample.mask.shape} → {mask.shape}; it must keep them"
        )
    return Sample(sample.id, np.ascontiguousarray(image), np.ascontiguousarray(mask), None)


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader process running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffled(samples: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keeps `buffer_size` items and yields a random one for each new one."""
    buffer: list[Any] = []
    for item in samples:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------------- training
class _TrainStream(IterableDataset):
    """Endless batches for one rank; each DataLoader worker derives its order from (seed, epoch, rank, worker).

    Shard order: pass p of the epoch draws one permutation of all shards from (seed, epoch, p), shared by every
    rank, and slot rank·workers + worker takes every slots-th shard of it, so ranks and workers read disjoint shards
    within a pass. With fewer shards than slots each slot draws its own permutation instead. A streaming buffer then
    shuffles samples across shards. (Like wds.ResampledShards(deterministic=True), but without replacement and with
    rank given explicitly rather than read from the environment.)
    """

    def __init__(
        self,
        paths: list[Path],
        keep_ids: Optional[frozenset[str]],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
        augment: Optional[Augment],
    ) -> None:
        super().__init__()
        self.paths, self.keep_ids, self.batch_size = paths, keep_ids, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_buffer, self.augment = shuffle_buffer, augment

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_slot()
        seed = stream_seed(self.seed, self.epoch, self.rank, worker)
        _seed_worker(seed, self.augment, in_worker=get_worker_info() is not None)
        samples = self._samples(self.rank * num_workers + worker, self.world_size * num_workers, worker)
        batch: list[Sample] = []
        for raw, shard in _shuffled(samples, self.shuffle_buffer, random.Random(seed)):
            batch.append(_augmented(decode_sample(raw, shard), self.augment))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []

    def _samples(self, slot: int, slots: int, worker: int) -> Iterator[tuple[dict[str, Any], Path]]:
        for shard_pass in itertools.count():
            if len(self.paths) >= slots:
                order = np.random.default_rng([self.seed, self.epoch, shard_pass]).permutation(len(self.paths))
                order = order[slot::slots]
            else:
                rng = np.random.default_rng([self.seed, self.epoch, shard_pass, self.rank, worker])
                order = rng.permutation(len(self.paths))
            count = 0
            for index in order:
                for raw in iter_shard_samples(self.paths[index]):
                    if self.keep_ids is None or raw["__key__"] in self.keep_ids:
                        count += 1
                        yield raw, self.paths[index]
            if count == 0:
                raise InputError(f"training shards {[str(self.paths[i]) for i in order]} hold no usable sample")


def _seed_worker(seed: int, augment: Optional[Augment], in_worker: bool) -> None:
    """Reseeds the augmentation (its own generators, via an optional `reseed(seed)` method) and, inside a DataLoader
    worker only, the global RNGs and OpenCV threads. The trainer's process keeps its global RNG state."""
    reseed = getattr(augment, "reseed", None)
    if callable(reseed):
        reseed(seed)
    if in_worker:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        cv2.setNumThreads(0)  # serial OpenCV in workers; 1 can deadlock a fork whose parent used the pool


class TrainLoader:
    """Iterable of exactly `steps` Batches (the same count on every rank); len() = steps."""

    def __init__(self, stream: _TrainStream, steps: int, num_workers: int, num_images: int) -> None:
        self.stream, self.steps, self.num_workers, self.num_images = stream, steps, num_workers, num_images

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        yield from _run(self.stream, self.num_workers, self.steps)


def _run(stream: IterableDataset, num_workers: int, limit: Optional[int]) -> Iterator[Batch]:
    """Iterates a DataLoader over `stream` (at most `limit` batches) and always stops its workers on the way out.

    Without the explicit shutdown, an error (or an endless training stream) would leave the workers to the garbage
    collector, and the next loader's workers would fork a copy of the half-dead one.
    """
    # A private generator: DataLoader otherwise draws its base seed from the global torch RNG at every iter(), which
    # would shift the trainer's dropout stream and break exact mid-epoch resume. Workers reseed from stream_seed.
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        yield from itertools.islice(iterator, limit)
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own cleanup (multi-process iterators only)
        if shutdown is not None:
            shutdown()


def _identity(batch: Batch) -> Batch:
    """collate_fn for batch_size=None; the default would turn the numpy native masks into tensors."""
    return batch


def _check_rank(rank: int, world_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if num_workers < 0:
        raise InputError(f"num_workers: got {num_workers}; it must be >= 0 (0 = read in the main process)")


def build_train_loader(
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    augment: Optional[Augment] = None,
    steps: Optional[int] = None,
    shuffle_buffer: int = 64,
    subset: int = 0,
) -> TrainLoader:
    """Training batches of this rank for one epoch: `steps` (default steps_per_epoch of the split, or of `subset`)
    full batches, reproducible from (seed, epoch, rank, num_workers); another epoch gives another order.

    `subset` > 0 uses only the split's first `subset` samples (id order; debug runs). `augment` maps (image H×W×3,
    mask H×W×4) uint8 → the same; if it has a `reseed(seed)` method it is reseeded per (seed, epoch, rank, worker).
    """
    _check_rank(rank, world_size, num_workers)
    if batch_size < 1 or shuffle_buffer < 1 or subset < 0 or seed < 0 or epoch < 0:
        raise InputError(
            f"build_train_loader: got batch_size={batch_size}, shuffle_buffer={shuffle_buffer}, subset={subset}, "
            f"seed={seed}, epoch={epoch}; need batch_size, shuffle_buffer >= 1 and subset, seed, epoch >= 0"
        )
    manifest = read_manifest(shards_dir)
    paths, keep_ids, num_images = _train_shards(Path(shards_dir), split_info(manifest, split, shards_dir), subset)
    steps = steps_per_epoch(num_images, batch_size, world_size) if steps is None else steps
    if steps < 1:
        raise InputError(f"steps: got {steps}; it must be >= 1 (or None for one pass over the images)")
    stream = _TrainStream(paths, keep_ids, batch_size, rank, world_size, seed, epoch, shuffle_buffer, augment)
    return TrainLoader(stream, steps, num_workers, num_images)


def _train_shards(folder: Path, info: dict[str, Any], subset: int) -> tuple[list[Path], Optional[frozenset], int]:
    """Shard paths, the ids to keep (None = all) and the number of images used."""
    groups = shard_groups(folder, info)
    if subset <= 0 or subset >= info["images"]:
        return [path for path, _ in groups], None, info["images"]
    keep = frozenset(info["ids"][:subset])
    return [path for path, ids in groups if keep.intersection(ids)], keep, subset


# ----------------------------------------------------------------------------------------------- evaluation
class _Slot(NamedTuple):
    """What one DataLoader worker of this rank reads: shards, and the ids it yields from them (in order)."""

    paths: list[Path]
    ids: list[str]


class _EvalStream(IterableDataset):
    def __init__(self, slots: list[_Slot], batch_size: int, with_native: bool) -> None:
        super().__init__()
        self.slots, self.batch_size, self.with_native = slots, batch_size, with_native

    def __iter__(self) -> Iterator[Batch]:
        worker, _ = _worker_slot()
        if get_worker_info() is not None:
            cv2.setNumThreads(0)
        slot = self.slots[worker]
        keep = frozenset(slot.ids)
        batch: list[Sample] = []
        left = len(slot.ids)
        for path in slot.paths:
            for raw in iter_shard_samples(path):
                if raw["__key__"] not in keep:
                    continue
                batch.append(decode_sample(raw, path, self.with_native))
                left -= 1
                if len(batch) == self.batch_size or left == 0:
                    yield collate(batch, self.with_native)
                    batch = []
                if left == 0:
                    return  # the rest of this shard belongs to the next slot: do not read it


def eval_slots(
    groups: list[tuple[Path, list[str]]], rank: int, world_size: int, num_workers: int, batch_size: int
) -> list[_Slot]:
    """Splits a split into its evaluation batches (consecutive runs of `batch_size` ids in shard order, the paper
    protocol's batches) and gives each rank a contiguous range of whole batches, then each of its workers a
    contiguous part of that range. So every sample is read exactly once over all ranks, and every batch any rank
    yields is a batch of the single-process loader: per-batch (paper protocol) metrics do not depend on the number
    of ranks or workers. A slot reads only the shards its range overlaps, skipping the other ids there; ranks differ
    by at most one batch, and a rank gets none when there are fewer batches than ranks.
    Returns one _Slot per DataLoader worker (one for num_workers = 0; fewer when the rank has fewer batches).
    """
    ordered = [(path, sample_id) for path, group_ids in groups for sample_id in group_ids]
    first, stop = _share(math.ceil(len(ordered) / batch_size), rank, world_size)
    count = max(1, min(num_workers, stop - first))
    slots = []
    for worker in range(count):
        begin, end = (first + k for k in _share(stop - first, worker, count))
        part = ordered[begin * batch_size : end * batch_size]
        ids = [sample_id for _, sample_id in part]
        slots.append(_Slot(list(dict.fromkeys(path for path, _ in part)), ids))
    return slots


def _share(total: int, part: int, parts: int) -> tuple[int, int]:
    """[begin, end) of the `part`-th of `parts` contiguous, near-equal pieces of range(total)."""
    return total * part // parts, total * (part + 1) // parts


class EvalLoader:
    """Iterable of this rank's evaluation Batches (last batch of each worker may be partial); len() = batches."""

    def __init__(self, stream: _EvalStream, num_workers: int) -> None:
        self.stream, self.num_workers = stream, num_workers
        self.ids = [sid for slot in stream.slots for sid in slot.ids]
        """The ids this rank yields (in slot order, not necessarily batch order)."""

    @property
    def num_samples(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return sum(math.ceil(len(slot.ids) / self.stream.batch_size) for slot in self.stream.slots)

    def __iter__(self) -> Iterator[Batch]:
        yield from _run(self.stream, self.num_workers, None)


def build_eval_loader(
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    with_native: bool = True,
) -> EvalLoader:
    """Evaluation batches of this rank, no shuffling, no augmentation, no padding duplicates.

    Whatever the ranks and workers, every batch is `batch_size` consecutive ids of the split in shard order (the
    paper protocol's batches of 4; only the split's last batch may be shorter); see `eval_slots`. The rank's batches
    arrive in id order with num_workers <= 1, interleaved across workers otherwise. `with_native` adds each image's
    native-resolution masks (valid/test shards only).
    """
    _check_rank(rank, world_size, num_workers)
    if batch_size < 1:
        raise InputError(f"batch_size: got {batch_size}; it must be >= 1")
    manifest = read_manifest(shards_dir)
    info = split_info(manifest, split, shards_dir)
    if with_native and not info.get("has_native"):
        raise InputError(
            f"split '{split}' in {shards_dir} was sharded without native-resolution masks (only "
            "valid/test get them); pass with_native=False"
        )
    slots = eval_slots(shard_groups(shards_dir, info), rank, world_size, num_workers, batch_size)
    workers = min(num_workers, len(slots)) if num_workers > 0 else 0
    return EvalLoader(_EvalStream(slots, batch_size, with_native), workers)
