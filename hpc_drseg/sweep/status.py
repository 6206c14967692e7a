"""`drseg sweep status`: each trial's state from its state file (written by its member) and its member job's state.

Job states come from sacct/squeue (slurm) or whether the member's process is alive (local). Read-only: nothing in the
sweep folder is unpickled or executed, so checking a shared sweep folder is safe.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.sweep.store import latest_jobs, load_sweep, read_trial_state

log = logging.getLogger(__name__)

TRIAL_STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED")
# SLURM job states (sacct/squeue) of a member that has not started yet or will run again.
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
_ACTIVE = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
_FINAL_RECORDS = {"COMPLETED", "FAILED", "STOPPED"}
_SCHEDULER_TIMEOUT_S = 15


def sweep_status(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial: state (PENDING/RUNNING/COMPLETED/FAILED), member job, job state and a detail."""
    sweep_dir = Path(sweep_dir)
    spec, trials = load_sweep(sweep_dir)
    job_of, kind_of = latest_jobs(sweep_dir)
    records = {trial_id: read_trial_state(sweep_dir, trial_id) for trial_id in trials}
    job_states = _job_states(job_of, kind_of, records)
    rows = []
    for trial in trials.values():
        job = job_of.get(trial.id, "")
        state, detail = _trial_state(records[trial.id], job_states.get(job), spec.eval.rank_by)
        row = {"trial": trial.id, "config": trial.config_id, "seed": trial.seed, "state": state, "job": job}
        rows.append({**row, "job_state": job_states.get(job) or "", "detail": detail})
    return rows


def _job_states(job_of: dict[str, str], kind_of: dict[str, str], records: dict[str, dict]) -> dict[str, str]:
    """Member job → state: sacct, then squeue (slurm), or the member's process (local). A member gone from both
    reports what its trials' state files say. Debug members ran inside `drseg sweep run`: they have none."""
    jobs = {job for job in job_of.values() if kind_of.get(job) != "debug"}
    states = {job: "RUNNING" if _pid_alive(int(job)) else "GONE" for job in jobs if kind_of.get(job) == "local"}
    slurm = {job for job in jobs if kind_of.get(job) == "slurm"}
    if slurm:
        states.update(_slurm_states(slurm))
    gone = [job for job, state in states.items() if state == "GONE"]
    for job in gone:
        states[job] = _gone_member_state(job, [records.get(t, {}) for t, j in job_of.items() if j == job])
    return states


def _gone_member_state(job: str, records: list[dict[str, Any]]) -> str:
    """A member that has ended: COMPLETED when it completed all its trials, FAILED when it finished all of them
    otherwise (it then raised TrialsFailed), GONE when it died before finishing one."""
    statuses = [record.get("status") if record.get("job") == job else None for record in records]
    if all(status == "COMPLETED" for status in statuses):
        return "COMPLETED"
    return "FAILED" if all(status in _FINAL_RECORDS for status in statuses) else "GONE"


def _slurm_states(jobs: set[str]) -> dict[str, str]:
    """sacct (needs accounting) for all array ids at once; squeue for the rest; a job in neither is GONE."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    arrays = sorted({job.split("_")[0] for job in jobs})
    states: dict[str, str] = {}
    sacct = _scheduler_output(["sacct", "-o", "JobID,State", "--parsable2", *[f"-j{a}" for a in arrays]])
    for job, info in SlurmInfoWatcher().read_info(sacct or "").items():
        if job in jobs and info.get("State"):
            states[job] = info["State"].split()[0]  # "CANCELLED by 0" → CANCELLED
    missing = jobs - set(states)
    if missing:
        squeue = _scheduler_output(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
        for line in (squeue or "").splitlines():
            job, _, state = line.strip().partition("|")
            if job in missing:
                states[job] = state
        if squeue is not None:  # squeue answered: a member it does not list has left the queue
            states.update({job: "GONE" for job in missing if job not in states})
    return states


def _scheduler_output(cmd: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_SCHEDULER_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: %s", cmd[0], exc)
        return None
    return done.stdout if done.returncode == 0 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def _trial_state(record: dict[str, Any], job_state: Optional[str], rank_by: str) -> tuple[str, str]:
    """(state, detail) of a trial from its state record and its member job's state (None: no job state known)."""
    status = record.get("status")
    if status == "COMPLETED":
        value = record.get("metrics", {}).get(rank_by)
        return "COMPLETED", f"{rank_by}={value:.4f}" if isinstance(value, float) else ""
    if status == "FAILED":
        return "FAILED", record.get("error") or ""
    if job_state in _ACTIVE:
        return ("RUNNING", record.get("phase", "")) if status == "RUNNING" else ("PENDING", "waiting in its member")
    if job_state in _WAITING:
        return "PENDING", f"job {job_state.lower()}" + (" (requeued)" if status else "")
    if job_state is not None:
        return "FAILED", f"member ended ({job_state}) without finishing this trial" + _error_suffix(record)
    if status == "RUNNING" and record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"])):
        return "FAILED", f"member process {record['pid']} died during {record.get('phase', '?')}"
    if status == "STOPPED":
        return "FAILED", (record.get("error") or "stopped") + "; rerun with drseg sweep run --resume"
    return ("RUNNING", record.get("phase", "")) if status == "RUNNING" else ("PENDING", "")


def _error_suffix(record: dict[str, Any]) -> str:
    return f": {record['error']}" if record.get("error") else ""


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status rows as an aligned table, then one line of counts per state."""
    header = ("trial", "state", "job", "job_state", "detail")
    table = [header] + [tuple(str(row[k]) for k in header) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in table]
    counts = {s: sum(row["state"] == s for row in rows) for s in TRIAL_STATES}
    lines.append(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def wait_for_sweep(sweep_dir: str | Path, poll_s: float = 5.0, timeout_s: Optional[float] = None) -> list[dict]:
    """Polls sweep_status until every trial is COMPLETED or FAILED (or timeout_s passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        rows = sweep_status(sweep_dir)
        if all(row["state"] in ("COMPLETED", "FAILED") for row in rows):
            return rows
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{sweep_dir}: not finished after {timeout_s:.0f} s:\n{format_status(rows)}")
        time.sleep(poll_s)
