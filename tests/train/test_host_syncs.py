"""A steady-state training step makes no host round trip: the project's code reads nothing back from the device
(and builds no host tensor for it) between the checks that run once per train.log_every_steps window."""

from __future__ import annotations

import pytest
from host_sync_counter import count_host_syncs

from hpc_drseg.config import load_config
from hpc_drseg.train.trainer import Trainer

from .test_trainer import DEBUG_YAML, overrides

WARM_UP, WINDOW = 3, 20


@pytest.mark.parametrize("where", ["workers", "device"])
def test_steady_state_steps_make_at_most_a_tenth_of_a_host_round_trip_each(shards_dir, tmp_path, where):
    settings = ["train.log_every_steps=1000", f"train.max_steps={WARM_UP + WINDOW}", "train.steps_per_epoch=100"]
    settings += ["data.num_workers=1", f"data.augment.where={where}", "train.checkpoint_every_steps=0"]
    trainer = Trainer(load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", *settings)))
    real_step, counting = trainer.train_step, {}

    def train_step(batch):
        # From the first steady-state step to the end of the window's last one, all the loop does counts.
        if trainer.progress.global_step == WARM_UP:
            counting["block"] = count_host_syncs(package="hpc_drseg")
            counting["counter"] = counting["block"].__enter__()
        terms = real_step(batch)
        if trainer.progress.global_step == WARM_UP + WINDOW - 1:
            counting.pop("block").__exit__(None, None, None)
        return terms

    trainer.train_step = train_step
    try:
        result = trainer.fit()
    finally:
        if "block" in counting:
            counting["block"].__exit__(None, None, None)
    assert result.progress.global_step == WARM_UP + WINDOW
    counter = counting["counter"]
    print(f"{where}: {counter.calls} host round trips in {WINDOW} steady-state steps: {counter.sites}")
    assert counter.calls <= 0.1 * WINDOW, counter.sites


@pytest.mark.gpu
def test_steady_state_steps_never_synchronise_on_cuda(shards_dir, tmp_path):
    """The same window on a GPU under CUDA's sync debug mode: any synchronising call raises."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings = ["train.log_every_steps=1000", f"train.max_steps={WARM_UP + WINDOW}", "train.steps_per_epoch=100"]
    settings += ["data.num_workers=1", "train.precision=bf16", "train.channels_last=true"]
    trainer = Trainer(load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", *settings)))
    real_step = trainer.train_step

    def train_step(batch):
        step = trainer.progress.global_step
        torch.cuda.set_sync_debug_mode("error" if WARM_UP <= step < WARM_UP + WINDOW - 1 else "default")
        try:
            return real_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = train_step
    assert trainer.fit().progress.global_step == WARM_UP + WINDOW
