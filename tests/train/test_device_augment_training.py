"""`drseg train` with data.augment.where=device (the paper preset augmented on the training device): two identical
CPU runs end with bit-identical weights, and a run stopped mid-epoch and resumed ends bit-identical to them."""

from __future__ import annotations

from pathlib import Path

import pytest
from train.test_trainer import DEBUG_YAML, assert_same_weights, final_weights, overrides

from hpc_drseg.config import load_config
from hpc_drseg.data.device_augment.batches import DeviceBatches
from hpc_drseg.train.trainer import Trainer, train

# The test_trainer settings (paper preset), one epoch of 2 steps: four short runs stay fast.
DEVICE = ["data.augment.where=device", "train.steps_per_epoch=2", "train.max_epochs=1"]


def _config(shards_dir: Path, run_dir: Path, *extra: str):
    return load_config(DEBUG_YAML, overrides(shards_dir, run_dir, *DEVICE, *extra))


@pytest.fixture(scope="module")
def device_run(shards_dir, tmp_path_factory) -> Path:
    """One uninterrupted epoch of 2 steps, augmented on the device."""
    run_dir = tmp_path_factory.mktemp("device") / "run"
    result = train(_config(shards_dir, run_dir))
    assert result.exit_code == 0 and result.progress.global_step == 2
    return run_dir


def test_trainer_augments_on_the_device_with_the_paper_preset(shards_dir, tmp_path):
    trainer = Trainer(_config(shards_dir, tmp_path / "run"))
    try:
        assert isinstance(trainer.train_batches, DeviceBatches) and trainer.train_batches.augment is not None
        batch = next(iter(trainer._train_batches(0)))
        assert batch.image.device == trainer.accelerator.device and (batch.epoch, batch.step) == (0, 0)
    finally:
        trainer.logger.close()


def test_two_identical_runs_end_bit_identical(shards_dir, tmp_path, device_run):
    again = tmp_path / "run"
    assert train(_config(shards_dir, again)).exit_code == 0
    assert_same_weights(final_weights(again), final_weights(device_run))
    assert "where: device" in (device_run / "config.yaml").read_text()


def test_stop_mid_epoch_and_resume_is_bit_identical(shards_dir, tmp_path, device_run):
    run_dir = tmp_path / "run"
    first = train(_config(shards_dir, run_dir, "train.max_steps=1"))
    assert first.exit_code == 0 and (first.progress.epoch, first.progress.step_in_epoch) == (0, 1)
    second = train(_config(shards_dir, run_dir))
    assert second.progress.global_step == 2
    assert_same_weights(final_weights(run_dir), final_weights(device_run))
