"""Running sweeps without SLURM: member packing, real debug and local sweeps end to end, the CLI, --resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from sweep_testkit import TINY, write_spec

from hpc_drseg.cli import main
from hpc_drseg.config import load_sweep_config
from hpc_drseg.sweep import prepare_sweep, read_trial_state, run_sweep, sweep_status
from hpc_drseg.sweep.spec import expand_trials
from hpc_drseg.sweep.submit import member_groups


def test_member_groups_pack_trials_per_gpu(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5, 1.0, 2.0]}, seeds=[0, 1]))
    trials = expand_trials(spec, tmp_path / "sweep")
    assert member_groups(trials, spec.executor) == [[t.id] for t in trials]
    spec.executor.trials_per_gpu = 2
    assert member_groups(trials, spec.executor) == [
        ["c000-s0", "c000-s1"],
        ["c001-s0", "c001-s1"],
        ["c002-s0", "c002-s1"],
    ]
    spec.executor.gpus_per_node = 2
    assert [len(g) for g in member_groups(trials, spec.executor)] == [4, 2]


@pytest.fixture(scope="module")
def debug_sweep(shards_dir, tmp_path_factory):
    """2 loss weights × 2 seeds that train and evaluate for real, plus one configuration whose trainer fails."""
    folder = tmp_path_factory.mktemp("debug_sweep")
    path = write_spec(
        folder,
        overrides=[f"data.shards={shards_dir}", *TINY],
        seeds=[0, 1],
        grid={"loss.weights.dice": [0.5, 2.0]},
        points=[["data.image_px=256"]],
        executor={"kind": "debug", "trials_per_gpu": 2},
    )
    started = time.perf_counter()
    result = run_sweep(path)
    result["test_wall_s"] = time.perf_counter() - started
    return result


@pytest.mark.slow
def test_debug_sweep_end_to_end(debug_sweep):
    sweep_dir = Path(debug_sweep["sweep_dir"])
    assert debug_sweep["submitted"] == 6 and len(debug_sweep["members"]) == 3  # two trials packed per member
    rows = {row["trial"]: row for row in sweep_status(sweep_dir)}
    assert {t: r["state"] for t, r in rows.items()} == {
        "c000-s0": "COMPLETED",
        "c000-s1": "COMPLETED",
        "c001-s0": "COMPLETED",
        "c001-s1": "COMPLETED",
        "c002-s0": "FAILED",
        "c002-s1": "FAILED",
    }
    assert "data.image_px=256" in rows["c002-s0"]["detail"]  # the trainer's own error message
    for trial_id in ("c000-s0", "c001-s1"):
        run_dir = sweep_dir / "runs" / trial_id
        assert (run_dir / "eval_test.json").is_file() and (run_dir / "metrics.csv").is_file()
        assert read_trial_state(sweep_dir, trial_id)["metrics"]["test/paper/mAP"] >= 0
    config = yaml.safe_load((sweep_dir / "runs" / "c001-s1" / "config.yaml").read_text())
    assert config["loss"]["weights"]["dice"] == 2.0 and config["train"]["seed"] == 1
    md = (sweep_dir / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 3
    assert sum(" ± " in row and "| 2 | 0 |" in row for row in rows) == 2  # two configurations: mean ± std of 2 seeds
    assert any("| 256 | 0 | 2 | n/a |" in row for row in rows)  # the failing configuration, counted
    assert (sweep_dir / "plots" / "val_mAP_vs_loss.weights.dice.png").is_file()
    print(f"debug sweep of 6 trials: {debug_sweep['test_wall_s']:.1f} s")


@pytest.mark.slow
def test_cli_status_and_collect(debug_sweep, capsys):
    sweep_dir = debug_sweep["sweep_dir"]
    assert main(["sweep", "status", sweep_dir]) == 0
    out = capsys.readouterr().out
    assert "6 trials: 4 COMPLETED, 2 FAILED" in out and "c002-s1  FAILED" in out
    assert main(["sweep", "collect", sweep_dir, "--rank-by", "test/standard/mIoU"]) == 0
    assert "Ranked by **test/standard/mIoU**" in capsys.readouterr().out
    assert main(["sweep", "status"]) == 2
    assert "usage: drseg sweep status SWEEP_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_reruns_only_failed_trials(debug_sweep, shards_dir):
    sweep_dir = Path(debug_sweep["sweep_dir"])
    spec = load_sweep_config(sweep_dir.parent / "spec.yaml")
    _, todo = prepare_sweep(spec, resume=True)
    assert [t.id for t in todo] == ["c002-s0", "c002-s1"]
    assert read_trial_state(sweep_dir, "c002-s0")["status"] == "PENDING"


def test_cli_run_needs_config(capsys):
    assert main(["sweep", "run"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_local_executor_runs_members_as_submitit_jobs(shards_dir, tmp_path, capsys):
    """The local executor: members are submitit jobs (pickled callable, own process, result pickle). This trial's
    trainer fails fast, so the member ends having failed its only trial: status reads FAILED from the trial's state
    file, and the job state FAILED from that file plus the member's ended process (it never unpickles the result).
    (Preemption → checkpoint → requeue → resume is tested on a real cluster in tests/slurm/test_sweep_slurm.py.)"""
    path = write_spec(
        tmp_path,
        overrides=[f"data.shards={shards_dir}", *TINY],
        points=[["data.image_px=256"]],
        executor={"kind": "debug", "timeout_min": 5},
    )
    assert main(["sweep", "--config", str(path), "--executor", "local", "name=local_test"]) == 0
    sweep_dir = tmp_path / "sweep"
    assert f"{sweep_dir}: 1 trials, 1 submitted as 1 local member(s)" in capsys.readouterr().out
    (member,) = json.loads((sweep_dir / "jobs.json").read_text())["submissions"][0]["members"]
    assert load_sweep_config(sweep_dir / "sweep.yaml").name == "local_test"
    assert (sweep_dir / "submitit" / member["job"] / f"{member['job']}_0_result.pkl").is_file()
    (row,) = sweep_status(sweep_dir)
    assert (row["state"], row["job_state"]) == ("FAILED", "FAILED")
    assert "data.image_px=256" in row["detail"]
    record = read_trial_state(sweep_dir, "c000-s0")
    assert record["job"] == member["job"] and record["pid"] != os.getpid()  # ran in the member's own process
