"""Per-rank reading of the WebDataset shards written by data/shards.py: training epochs that are seeded permutations
of the training set, padded to the same number of whole batches on every rank (DDP would hang otherwise), and an
evaluation stream that yields every sample exactly once across ranks. Never pass these loaders through
accelerator.prepare (it would re-split or broadcast).

Shards are checked against their manifest while they are read: every sample must be the one the manifest lists at
its place in its shard (so a shard that holds other, fewer or more samples is an error naming it and the id), and
every image and mask must be at the manifest's image_px. Nothing is scored or trained on that the manifest does not
describe.
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
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_drseg.config.choices import IMAGE_CODECS
from hpc_drseg.data.encoding import decode_image, decode_png, unpack_masks
from hpc_drseg.data.manifest import MANIFEST, iter_shard_samples, read_manifest, shard_groups, split_info
from hpc_drseg.errors import DrsegError, InputError

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


# ------------------------------------------------------------------------------------------------- decoding
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


# ------------------------------------------------------------------------------------------------- training
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


class _Order(NamedTuple):
    """What fixes one rank's batches in an epoch: `epoch_batches`' arguments between num_ids and pass_index."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int


class _TrainData(NamedTuple):
    """The samples trained on: ids (index = sample index), the shard of each, each shard's path and members, every
    id the manifest lists in each shard (in order: what reading checks), and the manifest's image_px."""

    ids: list[str]
    shard_of: list[int]
    paths: list[Path]
    members: list[list[int]]
    listed: list[list[str]]
    image_px: int


def _train_data(folder: Path, info: dict[str, Any], subset: int, image_px: int) -> _TrainData:
    """The split's samples, or with `subset` > 0 only its first `subset` in id order (a fixed subset: debug runs)."""
    count = info["images"] if subset <= 0 else min(subset, info["images"])
    data = _TrainData([], [], [], [], [], image_px)
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


class _RawSamples:
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

    def __init__(self, data: _TrainData, uses: Counter[int]) -> None:
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


class _TrainStream(IterableDataset):
    """Batches `start`..`steps`-1 of one rank's epoch; DataLoader worker w of W makes batches start+w, start+w+W, …

    torch's DataLoader takes one batch from each worker in turn, so it yields the rank's batches in order, and since
    a batch's ids and augmentation depend only on (seed, epoch, rank, batch), any worker count gives the same ones.
    Batch k of the epoch is batch k mod S of pass k // S, S = steps_per_epoch: `steps` <= S is a prefix of the
    epoch's permutation; `steps` > S (train.steps_per_epoch) goes on into further permutations of the same epoch.
    """

    def __init__(self, data: _TrainData, order: _Order, start: int, steps: int, augment: Optional[Augment]) -> None:
        super().__init__()
        self.data, self.order, self.start, self.steps, self.augment = data, order, start, steps, augment

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker_slot()
        if get_worker_info() is not None:
            cv2.setNumThreads(0)  # serial OpenCV in workers; 1 can deadlock a fork whose parent used the pool
        order = self.order
        per_pass = steps_per_epoch(len(self.data.ids), order.batch_size, order.world_size)
        mine = range(self.start + worker, self.steps, workers)
        for pass_index, batches in itertools.groupby(mine, key=lambda k: k // per_pass):
            indices, positions = epoch_batches(len(self.data.ids), *order, pass_index)
            rows = [k % per_pass for k in batches]
            yield from self._batches(indices[rows].tolist(), positions[rows].tolist())

    def _batches(self, indices: list[list[int]], positions: list[list[int]]) -> Iterator[Batch]:
        raw = _RawSamples(self.data, Counter(i for row in indices for i in row))
        for row, places in zip(indices, positions):
            yield collate([self._sample(*raw.take(i), place) for i, place in zip(row, places)])

    def _sample(self, raw: dict[str, Any], shard: Path, position: int) -> Sample:
        sample = decode_sample(raw, shard, False, self.data.image_px)
        if self.augment is None:
            return sample
        with _seeded(sample_seed(self.order.seed, self.order.epoch, position), self.augment):
            return _augmented(sample, self.augment)


class TrainLoader:
    """Iterable of one rank's Batches of one epoch from batch `start` on: the same count on every rank.

    `steps`: batches in the whole epoch; len() = the batches this loader yields, steps - start.
    """

    def __init__(self, stream: _TrainStream, num_workers: int, num_images: int) -> None:
        self.stream, self.num_workers, self.num_images = stream, num_workers, num_images
        self.steps, self.start = stream.steps, stream.start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[Batch]:
        yield from _run(self.stream, min(self.num_workers, len(self)))


def _run(stream: IterableDataset, num_workers: int) -> Iterator[Batch]:
    """Iterates a DataLoader over `stream` and always stops its workers on the way out.

    Without the explicit shutdown, an error (or a consumer that stops early) would leave the workers to the garbage
    collector, and the next loader's workers would fork a copy of the half-dead one.
    """
    # A private generator: DataLoader otherwise draws its base seed from the global torch RNG at every iter(), which
    # would shift the trainer's dropout stream and break exact mid-epoch resume. Samples are seeded by sample_seed.
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
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
    steps_per_epoch of the split, or of `subset`; see `_TrainStream` for other values). Another epoch or seed gives
    another permutation; the number of workers changes nothing.

    `subset` > 0 uses only the split's first `subset` samples (id order; debug runs). `augment` maps (image H×W×3,
    mask H×W×4) uint8 → the same; it is seeded per sample (`sample_seed`), through its `reseed(seed)` method if it
    has one and the global RNGs. `start_batch` > 0 skips the epoch's first batches without reading or augmenting
    them and yields exactly the rest (resuming mid-epoch).
    """
    _check_rank(rank, world_size, num_workers)
    if batch_size < 1 or subset < 0 or seed < 0 or epoch < 0 or start_batch < 0:
        raise InputError(
            f"build_train_loader: got batch_size={batch_size}, subset={subset}, seed={seed}, epoch={epoch}, "
            f"start_batch={start_batch}; need batch_size >= 1 and subset, seed, epoch, start_batch >= 0"
        )
    manifest = read_manifest(shards_dir)
    info = split_info(manifest, split, shards_dir)
    data = _train_data(Path(shards_dir), info, subset, manifest["image_px"])
    if not data.ids:
        raise InputError(f"split '{split}' in {shards_dir} holds no images to train on; re-run `drseg shard`")
    steps = steps_per_epoch(len(data.ids), batch_size, world_size) if steps is None else steps
    if steps < 1 or start_batch > steps:
        raise InputError(
            f"steps={steps}, start_batch={start_batch}: need steps >= 1 (or None for one pass over the images) "
            "and start_batch <= steps"
        )
    order = _Order(batch_size, rank, world_size, seed, epoch)
    return TrainLoader(_TrainStream(data, order, start_batch, steps, augment), num_workers, len(data.ids))


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
        worker, _ = _worker_slot()
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
