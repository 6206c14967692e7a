"""Per-rank loaders of the WebDataset shards written by data/shards.py: the training stream of a whole run (one
DataLoader whose workers live as long as the run and produce batches epoch after epoch, pinned when training on
CUDA), the one-epoch training loader, and an evaluation stream that yields every sample exactly once across ranks.
Never pass these loaders through accelerator.prepare (it would re-split or broadcast).

Batches (data/samples.py) hold uint8 images and masks in channels-last memory; data/stream.py fixes which samples
each rank's training batches hold and how they are augmented; docs/input-path.md describes the whole path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import cv2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_drseg.config import DataConfig, TrainConfig
from hpc_drseg.data.manifest import read_manifest, shard_groups, split_info
from hpc_drseg.data.samples import Batch, Sample, checked_samples, collate, decode_sample
from hpc_drseg.data.stream import Augment, Order, TrainData, TrainStream, steps_per_epoch, train_data, worker_slot
from hpc_drseg.errors import DrsegError, InputError

if TYPE_CHECKING:
    from hpc_drseg.data.device_augment.batches import DeviceBatches


def _run(stream: IterableDataset, num_workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Iterates a DataLoader over `stream` and always stops its workers on the way out (also when the consumer
    closes this generator, or drops it: a generator is closed when collected).

    Without the explicit shutdown, an error (or a consumer that stops early) would leave the workers to the garbage
    collector, and the next loader's workers would fork a copy of the half-dead one. `pin_memory`: batches arrive in
    page-locked memory (torch's pinning thread copies them there, keeping their channels-last strides), so the
    trainer's non_blocking copies to a CUDA device really overlap with compute.
    """
    # A private generator: DataLoader otherwise draws its base seed from the global torch RNG at every iter(), which
    # would shift the trainer's dropout stream and break exact mid-epoch resume. Samples are seeded by sample_seed.
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        yield from iterator
    except DrsegError as exc:
        clean = _one_line(exc)
        if clean is exc:
            raise
        raise clean from exc
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own cleanup (multi-process iterators only)
        if shutdown is not None:
            shutdown()


def _one_line(exc: DrsegError) -> DrsegError:
    """A user error raised in a loader worker, as its own one line: torch re-raises it in this process with the
    worker's whole traceback as the message ("Caught InputError in DataLoader worker process 0. Original Traceback
    ... hpc_drseg.errors.InputError: <message>")."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = text.rstrip().splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return type(exc)(last[len(name) :] if last.startswith(name) else last)


def _identity(batch: Batch) -> Batch:
    """collate_fn for batch_size=None; the default would turn the numpy native masks into tensors."""
    return batch


def _check_rank(rank: int, world_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if num_workers < 0:
        raise InputError(f"num_workers: got {num_workers}; it must be >= 0 (0 = read in the main process)")


class TrainLoader:
    """Iterable of one rank's Batches of one epoch from batch `start` on: the same count on every rank. Each
    iteration starts its own workers (the trainer uses TrainBatches, whose workers live for the run).

    `steps`: batches in the whole epoch; len() = the batches this loader yields, steps - start.
    """

    def __init__(self, stream: TrainStream, num_workers: int, num_images: int, start: int) -> None:
        self.stream, self.num_workers, self.num_images = stream, num_workers, num_images
        self.steps, self.start = stream.steps, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[Batch]:
        yield from _run(self.stream, min(self.num_workers, len(self)))


class TrainBatches:
    """One rank's training batches for a whole run, from ONE DataLoader whose workers live as long as this object:
    `epoch(e, start)` yields batches start..steps-1 of epoch e, and the workers are already making epoch e + 1's
    while the trainer validates. Batches are those of `build_train_loader` for the same arguments, bit for bit.

    The workers start at the first `epoch()` call, at the position asked for (a resumed run: its epoch and step);
    asking for any other position than the next one (the trainer never does) restarts them there. `close()` stops
    them; so does dropping this object.
    """

    def __init__(
        self,
        data: TrainData,
        order: Order,
        steps: int,
        num_workers: int,
        augment: Optional[Augment],
        pin_memory: bool = False,
        end_epoch: Optional[int] = None,
    ) -> None:
        self.data, self.order, self.steps, self.augment = data, order, steps, augment
        self.num_workers, self.pin_memory, self.end_epoch = num_workers, pin_memory, end_epoch
        self.num_images = len(data.ids)
        self._batches: Optional[Iterator[Batch]] = None
        self._next = -1  # run position (epoch · steps + step) of the next batch the workers deliver

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start`..steps-1 of `epoch`, each checked to be at its place in the run."""
        if epoch < 0 or not 0 <= start <= self.steps:
            raise InputError(f"epoch {epoch}, start batch {start}: need epoch >= 0 and 0 <= start <= {self.steps}")
        first = epoch * self.steps + start
        if self._batches is None or self._next != first:
            self._open(first)
        return self._take(epoch, start)

    def _open(self, first: int) -> None:
        self.close()
        stop = None if self.end_epoch is None else max(first, self.end_epoch * self.steps)
        stream = TrainStream(self.data, self.order, self.steps, first, stop, self.augment)
        workers = self.num_workers if stop is None else min(self.num_workers, stop - first)
        self._batches, self._next = _run(stream, workers, self.pin_memory), first

    def _take(self, epoch: int, start: int) -> Iterator[Batch]:
        for step in range(start, self.steps):
            try:
                batch = next(self._batches, None)
            except BaseException:
                self.close()  # a worker's error ended the DataLoader: a later epoch() starts a new one
                raise
            if batch is None or (batch.epoch, batch.step) != (epoch, step):
                got = "the end of the stream" if batch is None else f"epoch {batch.epoch} batch {batch.step}"
                raise RuntimeError(f"training stream out of step: expected epoch {epoch} batch {step}, got {got}")
            self._next += 1
            yield batch

    def close(self) -> None:
        """Stops the workers (the next `epoch()` starts new ones)."""
        if self._batches is not None:
            self._batches.close()
        self._batches, self._next = None, -1


def _check_rank(rank: int, world_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if num_workers < 0:
        raise InputError(f"num_workers: got {num_workers}; it must be >= 0 (0 = read in the main process)")


def load_train_data(shards_dir: str | Path, split: str, subset: int = 0) -> TrainData:
    """The training samples of `split` as the manifest lists them (the first `subset` only when > 0)."""
    manifest = read_manifest(shards_dir)
    info = split_info(manifest, split, shards_dir)
    data = train_data(Path(shards_dir), info, subset, manifest["image_px"])
    if not data.ids:
        raise InputError(f"split '{split}' in {shards_dir} holds no images to train on; re-run `drseg shard`")
    return data


def _check_train_arguments(batch_size: int, subset: int, seed: int, epoch: int, start_batch: int) -> None:
    if batch_size < 1 or subset < 0 or seed < 0 or epoch < 0 or start_batch < 0:
        raise InputError(
            f"training loader: got batch_size={batch_size}, subset={subset}, seed={seed}, epoch={epoch}, "
            f"start_batch={start_batch}; need batch_size >= 1 and subset, seed, epoch, start_batch >= 0"
        )


def _epoch_steps(data: TrainData, batch_size: int, world_size: int, steps: Optional[int], start_batch: int) -> int:
    steps = steps_per_epoch(len(data.ids), batch_size, world_size) if steps is None else steps
    if steps < 1 or start_batch > steps:
        raise InputError(
            f"steps={steps}, start_batch={start_batch}: need steps >= 1 (or None for one pass over the images) "
            "and start_batch <= steps"
        )
    return steps


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
    subset: int = 0,
    start_batch: int = 0,
) -> TrainLoader:
    """Training batches of this rank for one epoch: a permutation of the training ids from (seed, epoch), padded and
    split over ranks as torch's DistributedSampler does (see `epoch_batches`), in `steps` full batches (default
    steps_per_epoch of the split, or of `subset`; see `batch_rows` for other values). Another epoch or seed gives
    another permutation; the number of workers changes nothing.

    `subset` > 0 uses only the split's first `subset` samples (id order; debug runs). `augment` maps (image H×W×3,
    mask H×W×4) uint8 → the same; it is seeded per sample (`sample_seed`), through its `reseed(seed)` method if it
    has one and the global RNGs. `start_batch` > 0 skips the epoch's first batches without reading or augmenting
    them and yields exactly the rest (resuming mid-epoch).
    """
    _check_rank(rank, world_size, num_workers)
    _check_train_arguments(batch_size, subset, seed, epoch, start_batch)
    data = load_train_data(shards_dir, split, subset)
    steps = _epoch_steps(data, batch_size, world_size, steps, start_batch)
    order = Order(batch_size, rank, world_size, seed)
    stream = TrainStream(data, order, steps, epoch * steps + start_batch, (epoch + 1) * steps, augment)
    return TrainLoader(stream, num_workers, len(data.ids), start_batch)


def build_train_batches(
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    augment: Optional[Augment] = None,
    steps: Optional[int] = None,
    subset: int = 0,
    pin_memory: bool = False,
    end_epoch: Optional[int] = None,
) -> TrainBatches:
    """This rank's training batches for a whole run (see TrainBatches): the arguments as `build_train_loader`'s;
    `pin_memory` when training on CUDA; `end_epoch` (train.max_epochs) lets the workers stop after the last epoch."""
    _check_rank(rank, world_size, num_workers)
    _check_train_arguments(batch_size, subset, seed, 0, 0)
    data = load_train_data(shards_dir, split, subset)
    steps = _epoch_steps(data, batch_size, world_size, steps, 0)
    order = Order(batch_size, rank, world_size, seed)
    return TrainBatches(data, order, steps, num_workers, augment, pin_memory, end_epoch)


def build_run_batches(
    data: DataConfig, train: TrainConfig, device: torch.device, rank: int, world_size: int, steps: int
) -> TrainBatches | DeviceBatches:
    """The trainer's batches for a run, as `data.augment.where` says: loader workers that live for the run (pinned
    batches when `device` is CUDA; the workers stop after epoch train.max_epochs - 1), or the training set decoded
    onto `device` and augmented there. Either way batch k of epoch e holds the same samples; `epoch(e, start)`."""
    if data.augment.where == "device":
        from hpc_drseg.data.device_augment.batches import build_device_batches

        return build_device_batches(
            data.shards,
            data.train_split,
            train.batch_size,
            rank,
            world_size,
            train.seed,
            data.augment,
            device,
            steps,
            data.subset,
        )
    from hpc_drseg.data.augment import build_augment  # albumentations: only where the workers augment

    augment = build_augment(data.augment, data.image_px)
    pin = torch.device(device).type == "cuda"
    return build_train_batches(
        data.shards,
        data.train_split,
        train.batch_size,
        rank,
        world_size,
        train.seed,
        data.num_workers,
        augment,
        steps,
        data.subset,
        pin_memory=pin,
        end_epoch=train.max_epochs,
    )


# ----------------------------------------------------------------------------------------------- evaluation
class _Slot(NamedTuple):
    """What one DataLoader worker of this rank reads: shards (each with every id its manifest lists in it, in order),
    and the ids it yields from them (in order)."""

    shards: list[tuple[Path, list[str]]]
    ids: list[str]


class _EvalStream(IterableDataset):
    def __init__(self, slots: list[_Slot], batch_size: int, with_native: bool, image_px: int) -> None:
        super().__init__()
        self.slots, self.batch_size, self.with_native, self.image_px = slots, batch_size, with_native, image_px

    def __iter__(self) -> Iterator[Batch]:
        worker, _ = worker_slot()
        if get_worker_info() is not None:
            cv2.setNumThreads(0)
        slot = self.slots[worker]
        keep = frozenset(slot.ids)
        batch: list[Sample] = []
        for path, listed in slot.shards:
            # Read up to this slot's last sample of the shard (the rest belongs to the next slot), checking each
            # sample read against the manifest, skipped ones included.
            count = 1 + max(place for place, sample_id in enumerate(listed) if sample_id in keep)
            for raw in checked_samples(path, listed, count):
                if raw["__key__"] in keep:
                    batch.append(decode_sample(raw, path, self.with_native, self.image_px))
                if len(batch) == self.batch_size:
                    yield collate(batch, self.with_native)
                    batch = []
        if batch:
            yield collate(batch, self.with_native)


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
    ordered = [(shard, sample_id) for shard, (_, group_ids) in enumerate(groups) for sample_id in group_ids]
    first, stop = _share(math.ceil(len(ordered) / batch_size), rank, world_size)
    count = max(1, min(num_workers, stop - first))
    slots = []
    for worker in range(count):
        begin, end = (first + k for k in _share(stop - first, worker, count))
        part = ordered[begin * batch_size : end * batch_size]
        ids = [sample_id for _, sample_id in part]
        slots.append(_Slot([groups[shard] for shard in dict.fromkeys(shard for shard, _ in part)], ids))
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
        yield from _run(self.stream, self.num_workers)


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
    return EvalLoader(_EvalStream(slots, batch_size, with_native, manifest["image_px"]), workers)
