"""`drseg sweep` on a real local SLURM cluster (tests/slurm/conftest.py): a submitit job array of 2 loss weights × 2
seeds → summary.md with 2 rows of mean ± std; a member killed mid-training is reported FAILED within seconds; a member
signalled USR2 (preemption / time limit) checkpoints, requeues itself and completes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpc_drseg.sweep import collect_sweep, read_trial_state, run_sweep, sweep_status, wait_for_sweep

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
TINY = ["model.name=unet", "model.unet_base_width=8", "train.max_epochs=1", "eval.score_bits=8"]
# The local cluster has no GPUs and 2 CPUs per node: one CPU per member.
# The array runs 2 members at a time, which leaves room for the crash and preemption sweeps beside it.
EXECUTOR = {
    "kind": "slurm",
    "gpus_per_node": 0,
    "cpus_per_task": 1,
    "timeout_min": 15,
    "signal_delay_s": 60,
    "slurm_array_parallelism": 2,
}
SWEEP_TIMEOUT_S = 600
FAILED_WITHIN_S = 15


def write_spec(folder: Path, name: str, **fields) -> Path:
    spec = {"name": name, "base_config": str(DEBUG_YAML), "sweep_dir": str(folder / name), "executor": EXECUTOR}
    spec.update(fields)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_status(cluster, sweep_dir: Path) -> str:
    """`drseg sweep status` as a user runs it (its own process, SLURM_CONF from the environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "hpc_drseg", "sweep", "status", str(sweep_dir)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def sweeps(slurm_cluster, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Submits the 2 × 2 loss-weight sweep and a one-trial sweep that trains long enough to be killed."""
    folder = tmp_path_factory.mktemp("slurm_sweeps")
    fixed = [f"data.shards={shards_dir}", *TINY]
    loss = write_spec(
        folder,
        "loss",
        overrides=[*fixed, "train.steps_per_epoch=1"],
        seeds=[0, 1],
        grid={"loss.weights.dice": [0.5, 2.0]},
    )
    crash = write_spec(
        folder, "crash", overrides=[*fixed, "train.steps_per_epoch=400"], seeds=[0], grid={"loss.weights.bce": [0.5]}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))  # submitit's sbatch and sacct read it
        patch.chdir(folder)
        started = time.perf_counter()
        loss_run = run_sweep(loss)
        crash_run = run_sweep(crash)
        yield {"loss": loss_run, "crash": crash_run, "started": started, "folder": folder, "fixed": fixed}


def test_sweep_is_one_job_array(sweeps, slurm_cluster):
    loss = sweeps["loss"]
    assert loss["executor"] == "slurm" and loss["submitted"] == 4
    jobs = [member["job"] for member in loss["members"]]
    assert jobs == [f"{loss['array_id']}_{i}" for i in range(4)]  # one array, one member per trial
    array = slurm_cluster.run(["scontrol", "show", "job", loss["array_id"]]).stdout
    assert "ArrayTaskThrottle=2" in array  # slurm_array_parallelism
    print(f"submit of the 4-member array: {loss['submit_s']:.2f} s")


def test_crashed_member_is_reported_failed_within_seconds(sweeps, slurm_cluster):
    sweep_dir = Path(sweeps["crash"]["sweep_dir"])
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    record: dict = {}
    while time.monotonic() < deadline:  # until the member's trainer is in its loop (it wrote the run's config.yaml)
        record = read_trial_state(sweep_dir, "c000-s0")
        if record.get("phase") == "train" and (sweep_dir / "runs" / "c000-s0" / "config.yaml").exists():
            break
        time.sleep(0.5)
    assert record.get("status") == "RUNNING", record
    assert "RUNNING" in cli_status(slurm_cluster, sweep_dir)
    os.kill(record["pid"], signal.SIGKILL)  # the member process dies as under the OOM killer
    killed = time.monotonic()
    out = ""
    while time.monotonic() - killed < 60:
        out = cli_status(slurm_cluster, sweep_dir)
        if "FAILED" in out:
            break
        time.sleep(0.5)
    seen_after_s = time.monotonic() - killed
    print(f"killed member reported FAILED after {seen_after_s:.1f} s:\n{out}")
    assert "c000-s0  FAILED" in out and "member ended" in out
    assert seen_after_s < FAILED_WITHIN_S


def test_preempted_member_requeues_and_resumes(sweeps, slurm_cluster):
    overrides = [*sweeps["fixed"], "train.steps_per_epoch=12", "train.checkpoint_every_steps=1"]
    spec = write_spec(sweeps["folder"], "preempt", overrides=overrides, seeds=[0], grid={"loss.weights.focal": [1.0]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
        result = run_sweep(spec)
    sweep_dir, job = Path(result["sweep_dir"]), result["members"][0]["job"]
    last = sweep_dir / "runs" / "c000-s0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), cli_status(slurm_cluster, sweep_dir)
    slurm_cluster.run(["scancel", "--signal=USR2", job])  # what SLURM sends before preemption or the time limit
    signalled = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
        rows = wait_for_sweep(sweep_dir, poll_s=1.0, timeout_s=SWEEP_TIMEOUT_S)
    print(f"preempted member completed {time.monotonic() - signalled:.1f} s after USR2")
    assert rows[0]["state"] == "COMPLETED", rows
    record = read_trial_state(sweep_dir, "c000-s0")
    assert record["attempts"] == 2 and record["job"] == job
    log = (sweep_dir / "logs" / "c000-s0.log").read_text()
    assert "stopped by SIGUSR2" in log
    resumed_step = int(log.split("resumed ")[1].split("step ")[1].split()[0])
    assert 0 < resumed_step < 12  # resumed mid-epoch from the checkpoint written on the signal
    assert (sweep_dir / "runs" / "c000-s0" / "metrics.csv").read_text().splitlines()[1].split(",")[1] == "12"
    assert slurm_cluster.wait_state(job, timeout_s=60) == "COMPLETED"


def test_sweep_completes_and_summary_has_mean_and_std(sweeps, slurm_cluster):
    sweep_dir = Path(sweeps["loss"]["sweep_dir"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
        rows = wait_for_sweep(sweep_dir, poll_s=2.0, timeout_s=SWEEP_TIMEOUT_S)
        wall_s = time.perf_counter() - sweeps["started"]
        assert {row["state"] for row in rows} == {"COMPLETED"}, rows
        paths = collect_sweep(sweep_dir)
        states = {row["trial"]: row["state"] for row in sweep_status(sweep_dir)}
    md = paths["md"].read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    print(f"4-trial sweep wall time (submit → all COMPLETED): {wall_s:.1f} s\n{md}")
    assert len(table) == 2
    assert all(" ± " in line and "| 2 | 0 |" in line for line in table)
    assert {line.split(" | ")[2] for line in table} == {"0.5", "2"}
    assert len(states) == 4 and paths["csv"].is_file()
    for member in sweeps["loss"]["members"]:  # a member returns right after writing its last trial's state
        assert slurm_cluster.wait_state(member["job"], timeout_s=60) == "COMPLETED"
