"""The run's training stream (data/pipeline.py TrainBatches over data/stream.py's TrainStream): every epoch the
one-epoch loader's batches, one DataLoader for all epochs, mid-epoch resume, and the batch layout (uint8 NHWC memory
viewed as NCHW), pinned on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data.test_pipeline import _RandomFlip, _same, _train

from hpc_drseg.data import pipeline
from hpc_drseg.data.pipeline import build_eval_loader, build_train_batches


def _run_batches(shards_dir: Path, **overrides):
    args = dict(split="train", batch_size=2, rank=0, world_size=1, seed=0, num_workers=0)
    args.update(overrides)
    return build_train_batches(shards_dir, **args)


@pytest.mark.parametrize("workers", [0, 2])
def test_run_stream_gives_every_epoch_the_one_epoch_loaders_batches(shards_dir: Path, workers: int) -> None:
    for extra in ({}, {"rank": 1, "world_size": 3, "steps": 3}):
        stream = _run_batches(shards_dir, num_workers=workers, augment=_RandomFlip(), **extra)
        for epoch in range(3):
            expected = _train(shards_dir, num_workers=0, augment=_RandomFlip(), epoch=epoch, **extra)
            got = list(stream.epoch(epoch))
            assert _same(got, expected) and [(b.epoch, b.step) for b in got] == [(epoch, k) for k in range(len(got))]
        stream.close()


def test_run_stream_keeps_its_workers_across_epochs_and_restarts_only_when_asked(
    shards_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    real = pipeline._run
    monkeypatch.setattr(pipeline, "_run", lambda stream, *args: started.append(stream.first) or real(stream, *args))
    stream = _run_batches(shards_dir, num_workers=2, end_epoch=3)
    first = [list(stream.epoch(epoch)) for epoch in range(3)]
    assert started == [0]  # one DataLoader, its workers serving all three epochs
    tail = list(stream.epoch(1, start=2))  # another position (the trainer never asks): a new stream there
    assert started == [0, 6] and _same(tail, first[1][2:])
    stream.close()


def test_run_stream_resumes_mid_epoch_and_goes_on_into_the_next(shards_dir: Path) -> None:
    reference = _run_batches(shards_dir, augment=_RandomFlip())
    full = [list(reference.epoch(epoch)) for epoch in range(2)]
    resumed = _run_batches(shards_dir, num_workers=2, augment=_RandomFlip())
    assert _same(list(resumed.epoch(0, start=3)), full[0][3:]) and _same(list(resumed.epoch(1)), full[1])
    resumed.close()


def test_batches_are_uint8_nhwc_memory_viewed_as_nchw(shards_dir: Path) -> None:
    """No transpose on the CPU: image and mask are channels-last views of stacked (B, H, W, C) arrays."""
    train = _train(shards_dir)[0]
    evaluation = next(iter(build_eval_loader(shards_dir, "valid", 2, 0, 1, 0)))
    for batch in (train, evaluation):
        for tensor in (batch.image, batch.mask):
            assert tensor.dtype == torch.uint8 and tensor.is_contiguous(memory_format=torch.channels_last)
            assert tensor.permute(0, 2, 3, 1).is_contiguous()


# ---------------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_pinned_batches_keep_their_layout_on_the_way_to_the_gpu(shards_dir: Path) -> None:
    stream = _run_batches(shards_dir, num_workers=1, pin_memory=True)
    batch = next(stream.epoch(0))
    assert batch.image.is_pinned() and batch.mask.is_pinned()
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    image = batch.image.to("cuda", non_blocking=True)
    assert image.is_contiguous(memory_format=torch.channels_last) and torch.equal(image.cpu(), batch.image)
    stream.close()
