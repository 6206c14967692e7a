"""On-device training batches (data/device_augment/batches.py, store.py) on real shards: the same samples per batch
as the worker path, the same decoded pixels without augmentation, a batch fixed by (seed, epoch, rank, batch) so a
resumed epoch is bit-identical, and the manifest checks of the worker path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hpc_drseg.config import AugmentConfig
from hpc_drseg.data.device_augment.batches import build_device_batches
from hpc_drseg.data.manifest import read_manifest
from hpc_drseg.data.pipeline import build_train_loader
from hpc_drseg.errors import InputError

CPU = torch.device("cpu")


def _device(shards_dir: Path, preset: str = "paper", **overrides):
    args = dict(split="train", batch_size=2, rank=0, world_size=1, seed=0, augment=AugmentConfig(preset=preset))
    args.update(overrides)
    return build_device_batches(shards_dir, device=CPU, **args)


@pytest.mark.parametrize("rank, world, steps", [(0, 1, None), (1, 3, 5)])
def test_batches_hold_the_worker_paths_samples_and_pixels(shards_dir: Path, rank: int, world: int, steps) -> None:
    device = _device(shards_dir, preset="none", rank=rank, world_size=world, steps=steps)
    for epoch in (0, 1):
        workers = list(build_train_loader(shards_dir, "train", 2, rank, world, 0, epoch, 0, steps=steps))
        batches = list(device.epoch(epoch))
        assert [b.ids for b in batches] == [b.ids for b in workers]
        for got, expected in zip(batches, workers):
            assert torch.equal(got.image, expected.image) and torch.equal(got.mask, expected.mask)
            assert got.image.is_contiguous(memory_format=torch.channels_last) and got.image.dtype == torch.uint8


def test_augmented_batches_are_fixed_by_seed_epoch_rank_and_batch(shards_dir: Path) -> None:
    full = list(_device(shards_dir).epoch(1))
    resumed = list(_device(shards_dir).epoch(1, start=2))
    for got, expected in zip(resumed, full[2:]):
        assert torch.equal(got.image, expected.image) and torch.equal(got.mask, expected.mask)
    plain = list(_device(shards_dir, preset="none").epoch(1))
    assert any(not torch.equal(a.image, p.image) for a, p in zip(full, plain)), "the augmentation changed nothing"
    assert all(set(b.mask.unique().tolist()) <= {0, 1} for b in full)
    other_seed = list(_device(shards_dir, seed=1).epoch(1))
    assert not all(torch.equal(a.image, b.image) for a, b in zip(full, other_seed))


def test_the_callers_random_state_is_left_alone(shards_dir: Path) -> None:
    batches = _device(shards_dir)
    torch.manual_seed(7)
    list(batches.epoch(0))
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1))


def test_a_shard_that_disagrees_with_its_manifest_is_refused(shards_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    listed = read_manifest(copy)["splits"]["train"]["shards"]
    first, second = (copy / name for name in listed[:2])
    first.write_bytes(second.read_bytes())  # shard 0 now holds shard 1's samples
    with pytest.raises(InputError, match="the shards and their manifest disagree"):
        _device(copy)
