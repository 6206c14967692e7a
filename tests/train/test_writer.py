"""Checkpoints written in the background: the snapshot cannot change after it is taken, writes commit in order,
and a failed write surfaces in the training thread."""

from __future__ import annotations

import threading

import pytest
import torch

from hpc_drseg.config import load_config
from hpc_drseg.train.checkpoint import Checkpointer
from hpc_drseg.train.trainer import train
from hpc_drseg.train.writer import BackgroundWriter, snapshot

from .test_trainer import DEBUG_YAML, overrides


def test_snapshot_copies_even_tensors_already_in_host_memory():
    weight = torch.zeros(3)
    state = {"model": {"w": weight}, "optimizer": [({"exp_avg": weight},)], "step": 4}
    copied = snapshot(state)
    weight.add_(1.0)  # the next optimiser step, in place
    assert torch.equal(copied["model"]["w"], torch.zeros(3))
    assert torch.equal(copied["optimizer"][0][0]["exp_avg"], torch.zeros(3))
    assert copied["step"] == 4


def test_writes_run_one_at_a_time_in_order_and_errors_reach_the_caller():
    writer, order, release = BackgroundWriter(), [], threading.Event()
    writer.submit(lambda: (release.wait(10), order.append(1)))
    assert writer.busy
    release.set()
    writer.submit(lambda: order.append(2))  # waits for the first
    writer.wait()
    assert order == [1, 2] and not writer.busy

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    writer.submit(disk_full)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once


def test_checkpoint_every_epochs_writes_last_pt_every_nth_epoch_and_at_the_end(shards_dir, tmp_path, monkeypatch):
    commits: list[tuple[int, bool, bool]] = []
    real = Checkpointer._commit

    def commit(self, state, last, best):
        commits.append((state["progress"]["epoch"], last, best))
        real(self, state, last, best)

    monkeypatch.setattr(Checkpointer, "_commit", commit)
    extra = ("train.max_epochs=3", "train.checkpoint_every_epochs=2", "train.steps_per_epoch=1")
    result = train(load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", *extra)))
    assert result.exit_code == 0
    # Progress counts finished epochs: last.pt after epoch 1 (the 2nd) and epoch 2 (the last); best.pt when improved.
    assert [epoch for epoch, last, _ in commits if last] == [2, 3]
    assert commits[0][2], "epoch 0 is always the best so far"
