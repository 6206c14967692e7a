"""Per-rank reading pipeline on real shards: batch format, every epoch a seeded permutation padded to equal steps on
every rank, the same batches for any worker count, cheap mid-epoch skip, eval samples exactly once across ranks ×
workers, clear errors on damaged shards and on shards that disagree with their manifest."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hpc_drseg.constants import LESIONS
from hpc_drseg.data import samples, stream
from hpc_drseg.data.ddr import find_samples, read_sample
from hpc_drseg.data.manifest import iter_shard_samples, read_manifest, shard_groups
from hpc_drseg.data.pipeline import Batch, build_eval_loader, build_train_loader, decode_sample, steps_per_epoch


def _train(shards_dir: Path, **overrides) -> list[Batch]:
    args = dict(split="train", batch_size=2, rank=0, world_size=1, seed=0, epoch=0, num_workers=0)
    args.update(overrides)
    return list(build_train_loader(shards_dir, **args))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.ids == y.ids and torch.equal(x.image, y.image) and torch.equal(x.mask, y.mask) for x, y in zip(a, b)
    )


def _stored(shards_dir: Path, split: str) -> dict:
    info = read_manifest(shards_dir)["splits"][split]
    return {
        raw["__key__"]: decode_sample(raw, path)
        for path, _ in shard_groups(shards_dir, info)
        for raw in iter_shard_samples(path)
    }


@pytest.mark.parametrize(
    "images, batch, world, steps",
    [(383, 4, 1, 96), (383, 4, 2, 48), (757, 4, 8, 24), (8, 4, 2, 1), (1, 4, 4, 1), (9, 2, 2, 3)],
)
def test_steps_per_epoch(images: int, batch: int, world: int, steps: int) -> None:
    assert steps_per_epoch(images, batch, world) == steps


def test_steps_per_epoch_rejects_zero() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        steps_per_epoch(10, 0, 1)


def test_train_batches_hold_uint8_images_and_binary_mask_planes(shards_dir: Path) -> None:
    loader = build_train_loader(shards_dir, "train", 2, rank=0, world_size=1, seed=0, epoch=0, num_workers=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 4  # 8 images / (2 × 1)
    stored = _stored(shards_dir, "train")
    for batch in batches:
        assert isinstance(batch, Batch) and batch.native_masks is None
        assert batch.image.shape == (2, 3, 128, 128) and batch.image.dtype == torch.uint8
        assert batch.mask.shape == (2, len(LESIONS), 128, 128) and batch.mask.dtype == torch.uint8
        assert set(batch.mask.unique().tolist()) <= {0, 1}
        for i, sample_id in enumerate(batch.ids):
            np.testing.assert_array_equal(batch.image[i].permute(1, 2, 0).numpy(), stored[sample_id].image)
            np.testing.assert_array_equal(batch.mask[i].permute(1, 2, 0).numpy(), stored[sample_id].mask)
    assert any(batch.mask.any() for batch in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_arguments_same_batches_other_epoch_other_order(shards_dir: Path, num_workers: int) -> None:
    first = _train(shards_dir, num_workers=num_workers, steps=6)
    assert _same(first, _train(shards_dir, num_workers=num_workers, steps=6))
    order = [b.ids for b in first]
    assert order != [b.ids for b in _train(shards_dir, num_workers=num_workers, steps=6, epoch=1)]
    assert order != [b.ids for b in _train(shards_dir, num_workers=num_workers, steps=6, seed=1)]


def test_two_ranks_two_workers_get_equal_steps(shards_dir: Path) -> None:
    for subset, steps in ((0, 2), (5, 2), (3, 1)):  # ceil(images / (2 × 2)); uneven subsets too
        per_rank = [_train(shards_dir, rank=rank, world_size=2, num_workers=2, subset=subset) for rank in range(2)]
        assert [len(batches) for batches in per_rank] == [steps, steps]
        assert all(len(b.ids) == 2 for batches in per_rank for b in batches)
    rank0, rank1 = (_train(shards_dir, rank=r, world_size=2, num_workers=2, steps=3) for r in range(2))
    assert [b.ids for b in rank0] != [b.ids for b in rank1]


def test_subset_uses_only_the_first_ids(shards_dir: Path) -> None:
    first3 = read_manifest(shards_dir)["splits"]["train"]["ids"][:3]
    batches = _train(shards_dir, subset=3, steps=5)
    assert len(batches) == 5
    assert {sample_id for b in batches for sample_id in b.ids} == set(first3)
    assert len(build_train_loader(shards_dir, "train", 2, 0, 1, 0, 0, 0, subset=3)) == 2


class _Invert:
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return 255 - image, mask[::-1, :, :]


class _RandomFlip:
    """Owns its generator, like the albumentations-based Augment; reseed() makes workers reproducible."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng()

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.rng.random() < 0.5:
            return image[:, ::-1], mask[:, ::-1]
        return image, mask


def _global_rng_noise(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (image // 2 + np.random.randint(0, 100, image.shape)).astype(np.uint8), mask


def test_augment_is_applied_to_image_and_mask(shards_dir: Path) -> None:
    plain, inverted = _train(shards_dir), _train(shards_dir, augment=_Invert())
    assert [b.ids for b in plain] == [b.ids for b in inverted]
    for p, a in zip(plain, inverted):
        assert torch.equal(a.image, 255 - p.image) and torch.equal(a.mask, p.mask.flip(2))


@pytest.mark.parametrize("augment", [_RandomFlip, lambda: _global_rng_noise], ids=["reseed", "global-rng"])
def test_random_augment_is_reproducible_in_workers(shards_dir: Path, augment) -> None:
    one = _train(shards_dir, num_workers=2, steps=4, augment=augment())
    assert _same(one, _train(shards_dir, num_workers=2, steps=4, augment=augment()))
    plain = _train(shards_dir, num_workers=2, steps=4)
    assert not _same(one, plain), "the augmentation changed nothing"


def test_augment_must_keep_shapes(shards_dir: Path) -> None:
    with pytest.raises(ValueError, match="augment changed the shapes"):
        _train(shards_dir, augment=lambda image, mask: (image[:64], mask[:64]))


# ------------------------------------------------------------------------------------------- epoch contract
def _ids(batches: list[Batch]) -> list[str]:
    return [sample_id for batch in batches for sample_id in batch.ids]


def _padded_order(per_rank: list[list[Batch]]) -> list[str]:
    """The global order the ranks took their ids from: entry i went to rank i mod world (DistributedSampler)."""
    flat = [_ids(batches) for batches in per_rank]
    return [flat[i % len(flat)][i // len(flat)] for i in range(sum(map(len, flat)))]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_one_rank_epoch_visits_every_training_id_once(shards_dir: Path, epoch: int) -> None:
    expected = read_manifest(shards_dir)["splits"]["train"]["ids"]
    assert sorted(_ids(_train(shards_dir, epoch=epoch))) == expected
    # 8 ids in batches of 3: one padded pass of 9, the 9th repeats the permutation's first id.
    order = _ids(_train(shards_dir, epoch=epoch, batch_size=3))
    assert len(order) == 9 and sorted(order[:8]) == expected and order[8] == order[0]


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 2), (3, 0), (3, 1)])
def test_ranks_split_one_padded_permutation(shards_dir: Path, world: int, workers: int) -> None:
    expected = read_manifest(shards_dir)["splits"]["train"]["ids"]
    per_rank = [_train(shards_dir, rank=rank, world_size=world, num_workers=workers) for rank in range(world)]
    steps = steps_per_epoch(len(expected), 2, world)
    assert [len(batches) for batches in per_rank] == [steps] * world
    assert all(len(batch.ids) == 2 for batches in per_rank for batch in batches)
    order = _padded_order(per_rank)
    assert len(order) == steps * 2 * world  # 8 for 2 ranks, 12 for 3: 4 padding entries
    assert sorted(order[: len(expected)]) == expected  # every id once ...
    assert order[len(expected) :] == order[: len(order) - len(expected)]  # ... then the first ones again
    assert Counter(order) == Counter(expected + order[: len(order) - len(expected)])


def test_permutation_is_fixed_by_seed_and_epoch(shards_dir: Path) -> None:
    orders = {(seed, epoch): _ids(_train(shards_dir, seed=seed, epoch=epoch)) for seed in (0, 1) for epoch in (0, 1)}
    assert len({tuple(order) for order in orders.values()}) == 4
    assert _ids(_train(shards_dir, seed=1, epoch=1, num_workers=2)) == orders[1, 1]


@pytest.mark.parametrize(
    "augment", [_RandomFlip, lambda: _global_rng_noise, lambda: None], ids=["reseed", "global", "none"]
)
def test_batches_do_not_depend_on_the_number_of_workers(shards_dir: Path, augment) -> None:
    for extra in ({}, {"rank": 1, "world_size": 3}, {"steps": 7}):  # padding; further permutations in one epoch
        runs = [_train(shards_dir, num_workers=workers, augment=augment(), **extra) for workers in (0, 1, 2)]
        assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])


def test_start_batch_yields_exactly_the_tail_of_the_epoch(shards_dir: Path) -> None:
    for workers, steps in ((0, None), (2, 7)):
        full = _train(shards_dir, augment=_RandomFlip(), num_workers=workers, steps=steps)
        for start in range(len(full) + 1):
            loader = build_train_loader(
                shards_dir, "train", 2, 0, 1, 0, 0, workers, _RandomFlip(), steps, start_batch=start
            )
            tail = list(loader)
            assert len(loader) == len(tail) == len(full) - start and _same(tail, full[start:])


def test_start_batch_decodes_only_the_remaining_samples(shards_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real = stream.decode_sample
    monkeypatch.setattr(stream, "decode_sample", lambda raw, *a: decoded.append(raw["__key__"]) or real(raw, *a))
    tail = _train(shards_dir, start_batch=3)
    assert len(tail) == 1 and decoded == tail[0].ids


def test_steps_per_epoch_cuts_or_extends_the_permutation(shards_dir: Path) -> None:
    expected = read_manifest(shards_dir)["splits"]["train"]["ids"]
    one_pass = _train(shards_dir)
    assert _same(_train(shards_dir, steps=2), one_pass[:2])  # fewer steps: a prefix of the epoch's permutation
    longer = _ids(_train(shards_dir, steps=7))  # more: the epoch goes on into a second permutation
    assert longer[:8] == _ids(one_pass) and len(set(longer[8:])) == 6  # 6 distinct ids: a second permutation's
    assert set(longer[8:]) <= set(expected) and longer[8:] != longer[:6]  # prefix, not the first one again


def test_training_leaves_the_callers_random_state_alone(shards_dir: Path) -> None:
    np.random.seed(7)
    torch.manual_seed(7)
    _train(shards_dir, augment=_global_rng_noise)
    after = np.random.random(), torch.rand(1).item()
    np.random.seed(7)
    torch.manual_seed(7)
    assert after == (np.random.random(), torch.rand(1).item())


def test_workers_read_only_the_shards_of_their_samples(shards_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = samples.iter_shard_samples
    monkeypatch.setattr(samples, "iter_shard_samples", lambda path: read.append(path.name) or real(path))
    _train(shards_dir, subset=3)  # ids 0, 1 in shard 0, id 2 in shard 1: shards 2 and 3 are never opened
    assert sorted(read) == ["train-000000.tar", "train-000001.tar"]


# ---------------------------------------------------------------------------------------------------- eval
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on a 2-core CI box
@pytest.mark.parametrize(
    "split, world, workers",
    [("train", 2, 2), ("train", 3, 2), ("train", 1, 3), ("test", 2, 2), ("test", 3, 0), ("valid", 5, 2)],
)
def test_eval_yields_every_sample_exactly_once(shards_dir: Path, split: str, world: int, workers: int) -> None:
    expected = read_manifest(shards_dir)["splits"][split]["ids"]
    seen: Counter[str] = Counter()
    for rank in range(world):
        loader = build_eval_loader(shards_dir, split, 3, rank, world, workers, with_native=split != "train")
        batches = list(loader)
        assert len(loader) == len(batches) and loader.num_samples == sum(len(b.ids) for b in batches)
        assert sorted(loader.ids) == sorted(i for b in batches for i in b.ids)
        seen.update(i for b in batches for i in b.ids)
    assert sorted(seen) == expected and set(seen.values()) == {1}


def test_eval_native_masks_are_the_source_masks(ddr_root: Path, shards_dir: Path) -> None:
    source = {files.id: read_sample(files).masks for files in find_samples(ddr_root, "test")}
    for rank in range(2):
        for batch in build_eval_loader(shards_dir, "test", 2, rank, 2, num_workers=2):
            assert len(batch.native_masks) == len(batch.ids) == batch.image.shape[0]
            for sample_id, native in zip(batch.ids, batch.native_masks):
                assert isinstance(native, np.ndarray) and native.dtype == np.uint8
                np.testing.assert_array_equal(native, source[sample_id].transpose(2, 0, 1))


def test_single_rank_eval_batches_are_consecutive_in_id_order(shards_dir: Path) -> None:
    batches = list(build_eval_loader(shards_dir, "train", 3, 0, 1, num_workers=0, with_native=False))
    assert [len(b.ids) for b in batches] == [3, 3, 2]
    assert [i for b in batches for i in b.ids] == read_manifest(shards_dir)["splits"]["train"]["ids"]


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 0), (2, 2), (3, 1), (5, 2)])
def test_eval_batches_are_the_single_process_batches_for_any_ranks_and_workers(
    shards_dir: Path, world: int, workers: int
) -> None:
    """The paper protocol scores per batch: a rank or worker must never batch across another's share."""
    single = [tuple(b.ids) for b in build_eval_loader(shards_dir, "train", 3, 0, 1, 0, with_native=False)]
    assert [len(ids) for ids in single] == [3, 3, 2]  # 8 ids in shards of 2: batches straddle shard boundaries
    batches, sizes = [], []
    for rank in range(world):
        loader = build_eval_loader(shards_dir, "train", 3, rank, world, workers, with_native=False)
        mine = [tuple(b.ids) for b in loader]
        batches += mine
        sizes.append(len(mine))
    assert sorted(batches) == sorted(single)
    assert max(sizes) - min(sizes) <= 1  # contiguous near-equal shares of whole batches


def test_eval_without_native_masks_in_the_shards_is_refused(shards_dir: Path) -> None:
    with pytest.raises(ValueError, match="with_native=False"):
        build_eval_loader(shards_dir, "train", 2, 0, 1, 0)


# -------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def damaged(shards_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    for name in ("test-000001.tar", "train-000002.tar"):
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2 + 100])
    return copy


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_an_error_naming_the_file(damaged: Path, num_workers: int) -> None:
    with pytest.raises(ValueError, match=r"test-000001\.tar is unreadable or truncated"):
        list(build_eval_loader(damaged, "test", 2, 0, 1, num_workers))
    with pytest.raises(ValueError, match=r"train-000002\.tar is unreadable or truncated"):
        _train(damaged, num_workers=num_workers, steps=8)


def test_missing_manifest_or_shard_file(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `drseg shard"):
        build_eval_loader(tmp_path, "test", 2, 0, 1, 0)
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar listed in .* is missing"):
        build_train_loader(copy, "train", 2, 0, 1, 0, 0, 0)


def test_bad_rank_or_split(shards_dir: Path) -> None:
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        build_train_loader(shards_dir, "train", 2, rank=2, world_size=2, seed=0, epoch=0, num_workers=0)
    with pytest.raises(ValueError, match="split 'training'"):
        build_eval_loader(shards_dir, "training", 2, 0, 1, 0)


def test_workers_do_not_deadlock_when_the_parent_used_opencv_threads(shards_dir: Path) -> None:
    # cv2.setNumThreads(1) in a forked worker hangs forever once the parent has run OpenCV's thread pool (OpenCV 5,
    # pthreads): the trainer's process does, e.g. when the standard protocol resizes probabilities. Own process, so
    # a hang is a timeout here rather than a stuck test session.
    script = f"""
import cv2, numpy as np
from hpc_drseg.data.pipeline import build_eval_loader, build_train_loader
big = np.zeros((2000, 2000, 3), np.uint8)
for _ in range(3):
    cv2.resize(big, (512, 512), interpolation=cv2.INTER_AREA)
for _ in range(3):
    n = sum(len(b.ids) for b in build_eval_loader({str(shards_dir)!r}, "test", 2, 0, 1, 2))
    n += sum(len(b.ids) for b in build_train_loader({str(shards_dir)!r}, "train", 2, 0, 1, 0, 0, 2))
print("samples", n)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["samples", "12"]


# ------------------------------------------------------------------------------------- shards vs their manifest
def _copy(shards_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards_dir, tmp_path / "shards"))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_shard(path: Path, change) -> None:
    """Writes shard `path` again with change(list of raw samples) → raw samples."""
    samples = change(list(iter_shard_samples(path)))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for raw in samples:
            for ext, data in raw.items():
                if ext != "__key__":
                    member = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


def _shrunk(raw: dict) -> dict:
    """The sample with its image and mask at half their side."""
    out = dict(raw)
    for ext in ("image.png", "mask.png"):
        array = cv2.imdecode(np.frombuffer(raw[ext], np.uint8), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(array, (array.shape[1] // 2, array.shape[0] // 2), interpolation=cv2.INTER_NEAREST)
        out[ext] = cv2.imencode(".png", small)[1].tobytes()
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_refuses_a_shard_whose_ids_differ_from_the_manifest(shards_dir, tmp_path, num_workers):
    copy = _copy(shards_dir, tmp_path)
    real = read_manifest(copy)["splits"]["test"]["ids"][1]
    _edit_manifest(copy, lambda m: m["splits"]["test"]["ids"].__setitem__(1, "renamed"))
    with pytest.raises(ValueError) as error:
        list(build_eval_loader(copy, "test", 2, 0, 1, num_workers))
    message = str(error.value)
    assert f"test-000000.tar holds sample '{real}' at position 1 where {copy / 'manifest.json'} lists 'renamed'" in (
        message
    )
    assert "\n" not in message  # also when a loader worker raised it


def test_eval_finds_a_sample_the_manifest_does_not_list(shards_dir, tmp_path):
    copy = _copy(shards_dir, tmp_path)
    extra = read_manifest(copy)["splits"]["test"]["ids"][1]

    def forget(manifest: dict) -> None:  # the manifest lists only the first sample of test-000000.tar
        info = manifest["splits"]["test"]
        info["ids"].remove(extra)
        info["shard_sizes"][0] -= 1
        info["images"] -= 1

    _edit_manifest(copy, forget)
    with pytest.raises(ValueError, match=rf"holds sample '{extra}' at position 1 where .* lists only 1 samples"):
        list(build_eval_loader(copy, "test", 4, 0, 1, 0))


def test_eval_and_training_find_a_shard_with_fewer_samples(shards_dir, tmp_path):
    copy = _copy(shards_dir, tmp_path)
    for name in ("test-000001.tar", "train-000003.tar"):
        _rewrite_shard(copy / name, lambda samples: samples[:1])
    missing = read_manifest(copy)["splits"]["test"]["ids"][3]
    with pytest.raises(ValueError, match=rf"test-000001\.tar ends after 1 samples .* \(first missing: '{missing}'\)"):
        list(build_eval_loader(copy, "test", 2, 0, 1, 0))
    with pytest.raises(ValueError, match=r"train-000003\.tar ends after 1 samples"):
        _train(copy)


@pytest.mark.parametrize("split", ["train", "test"])
def test_images_at_another_size_than_the_manifest_are_refused(shards_dir, tmp_path, split):
    copy = _copy(shards_dir, tmp_path)
    for name in read_manifest(copy)["splits"][split]["shards"]:
        _rewrite_shard(copy / name, lambda samples: [_shrunk(raw) for raw in samples])
    pattern = rf"shard {copy}/{split}-00000\d\.tar: sample '[^']+' is 64×64 px but .* says image_px=128"
    with pytest.raises(ValueError, match=pattern):
        list(_train(copy) if split == "train" else build_eval_loader(copy, split, 2, 0, 1, 0))
