"""Trial states from the member's state files and the member job's state; a dead member process reads FAILED."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from sweep_testkit import write_spec

from hpc_drseg.config import load_sweep_config
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.status import _trial_state, sweep_status


@pytest.mark.parametrize(
    "record, job_state, state",
    [
        ({}, None, "PENDING"),
        ({}, "PENDING", "PENDING"),
        ({"status": "STOPPED"}, "REQUEUED", "PENDING"),  # preempted and requeued
        ({}, "RUNNING", "PENDING"),  # its member runs, the trial has not started yet
        ({"status": "RUNNING", "phase": "train"}, "RUNNING", "RUNNING"),
        ({"status": "COMPLETED", "metrics": {"val/mAP": 0.5}}, "COMPLETED", "COMPLETED"),
        ({"status": "FAILED", "error": "train exited with 1"}, "FAILED", "FAILED"),
        ({"status": "RUNNING", "phase": "train"}, "FAILED", "FAILED"),  # the member crashed under the trial
        ({"status": "RUNNING", "phase": "eval"}, "CANCELLED", "FAILED"),
        ({}, "OUT_OF_MEMORY", "FAILED"),
        ({}, "GONE", "FAILED"),
        ({"status": "STOPPED"}, None, "FAILED"),  # debug executor: nothing will requeue it
    ],
)
def test_trial_state_from_record_and_job(record, job_state, state):
    assert _trial_state(record, job_state, "val/mAP")[0] == state


def test_status_reports_a_dead_member_process_failed(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5]}, seeds=[0, 1]))
    sweep_dir, _ = prepare_sweep(spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state_dir = sweep_dir / "state"
    state_dir.mkdir()
    host = os.uname().nodename
    for trial_id, pid in (("c000-s0", dead.pid), ("c000-s1", os.getpid())):
        record = {"status": "RUNNING", "phase": "train", "host": host, "pid": pid}
        (state_dir / f"{trial_id}.json").write_text(json.dumps(record))
    started = time.perf_counter()
    rows = {row["trial"]: row for row in sweep_status(sweep_dir)}
    assert time.perf_counter() - started < 5
    assert rows["c000-s0"]["state"] == "FAILED" and str(dead.pid) in rows["c000-s0"]["detail"]
    assert rows["c000-s1"]["state"] == "RUNNING"
