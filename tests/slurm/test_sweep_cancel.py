"""`scancel` of a sweep's job array cancels it: its members stop their trainers (which checkpoint and exit resumable)
but do not requeue themselves, so the array ends CANCELLED and never runs again; only the pre-timeout signal and
preemption requeue (tests/slurm/test_sweep_slurm.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from hpc_drseg.sweep import read_trial_state, run_sweep

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
TRAINING_S = 600  # a member's trainer reaches its loop well within this on a busy 2-core machine
EXECUTOR = {"kind": "slurm", "gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 15, "signal_delay_s": 60}


def sacct_state(cluster, job: str) -> str:
    """The state of the job's latest run as sacct prints it, e.g. "CANCELLED by 0"; "" when unknown."""
    lines = cluster.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def test_scancel_cancels_a_sweep_member(slurm_cluster, shards_dir: Path, tmp_path: Path):
    overrides = [
        f"data.shards={shards_dir}",
        "model.name=unet",
        "model.unet_base_width=8",
        "train.max_epochs=1",
        "train.steps_per_epoch=400",
        "eval.score_bits=8",
    ]
    spec = {
        "name": "cancel",
        "base_config": str(DEBUG_YAML),
        "sweep_dir": str(tmp_path / "cancel"),
        "executor": EXECUTOR,
        "overrides": overrides,
        "seeds": [0],
        "grid": {"loss.weights.dice": [1.0]},
    }
    path = tmp_path / "cancel.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
        patch.chdir(tmp_path)
        result = run_sweep(path)
    sweep_dir, job = Path(result["sweep_dir"]), result["members"][0]["job"]
    run_config = sweep_dir / "runs" / "c000-s0" / "config.yaml"
    deadline = time.monotonic() + TRAINING_S
    while not run_config.exists() and time.monotonic() < deadline:  # the trainer is in its loop
        time.sleep(0.5)
    assert run_config.exists(), read_trial_state(sweep_dir, "c000-s0")
    slurm_cluster.run(["scancel", job])
    cancelled = time.monotonic()
    state = ""
    while time.monotonic() - cancelled < 180 and not state.startswith("CANCELLED"):
        state = sacct_state(slurm_cluster, job)
        time.sleep(0.5)
    assert state.startswith("CANCELLED"), state
    print(f"member ended CANCELLED {time.monotonic() - cancelled:.1f} s after scancel")
    queued = "?"
    while time.monotonic() - cancelled < 180 and queued:  # COMPLETING while its processes end, then gone
        queued = slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip()
        assert queued in ("", "COMPLETING", "RUNNING"), f"the cancelled member is queued again: {queued}"
        time.sleep(0.5)
    assert queued == "", f"the cancelled member is still {queued}"
    assert sacct_state(slurm_cluster, job).startswith("CANCELLED")
    assert read_trial_state(sweep_dir, "c000-s0")["attempts"] == 1
