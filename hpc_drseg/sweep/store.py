"""The sweep folder's own files: SWEEP_DIR/{sweep.yaml, trials.json, jobs.json, state/<id>.json}.

state/<id>.json is written only by the member running that trial; jobs.json lists every submission's members. Beside
them: runs/<id>, logs/<id>.log, submitit/%j, summary.md, summary.csv, plots/.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from hpc_drseg.atomic import atomic_write_json, atomic_write_text
from hpc_drseg.config import SweepConfig, config_to_dict, load_sweep_config
from hpc_drseg.errors import MissingError
from hpc_drseg.sweep.spec import Trial


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- sweep.yaml, trials.json
def save_spec(sweep_dir: Path, spec: SweepConfig) -> None:
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(config_to_dict(spec), sort_keys=False))


def save_trials(sweep_dir: Path, name: str, trials: list[Trial]) -> None:
    atomic_write_json(sweep_dir / "trials.json", {"sweep": name, "trials": {t.id: _without_id(t) for t in trials}})


def _without_id(trial: Trial) -> dict[str, Any]:
    record = asdict(trial)
    record.pop("id")
    return record


def load_trials(sweep_dir: str | Path) -> dict[str, Trial]:
    path = Path(sweep_dir) / "trials.json"
    if not path.is_file():
        raise MissingError(f"{path} not found: is {sweep_dir} a sweep folder made by `drseg sweep`?")
    records = json.loads(path.read_text())["trials"]
    return {trial_id: Trial(id=trial_id, **record) for trial_id, record in records.items()}


def load_sweep(sweep_dir: str | Path) -> tuple[SweepConfig, dict[str, Trial]]:
    trials = load_trials(sweep_dir)
    return load_sweep_config(Path(sweep_dir) / "sweep.yaml"), trials


# ------------------------------------------------------------------------------------------- state/<id>.json
def state_path(sweep_dir: Path, trial_id: str) -> Path:
    return sweep_dir / "state" / f"{trial_id}.json"


def read_trial_state(sweep_dir: str | Path, trial_id: str) -> dict[str, Any]:
    """The trial's state record as its member last wrote it; {} before a member has started it."""
    path = state_path(Path(sweep_dir), trial_id)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def write_trial_state(sweep_dir: Path, trial_id: str, record: dict[str, Any]) -> None:
    atomic_write_json(state_path(sweep_dir, trial_id), record)


# --------------------------------------------------------------------------------------------------- jobs.json
def latest_jobs(sweep_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Trial → the member job that ran it last, and member job → its executor kind (slurm, local, debug)."""
    path = sweep_dir / "jobs.json"
    job_of, kind_of = {}, {}
    for record in json.loads(path.read_text())["submissions"] if path.is_file() else []:
        for member in record["members"]:
            kind_of[member["job"]] = record["executor"]
            job_of.update({trial_id: member["job"] for trial_id in member["trials"]})
    return job_of, kind_of


def append_submission(sweep_dir: Path, record: dict[str, Any], replace_last: bool = False) -> None:
    """Adds a submission to jobs.json; replace_last updates the one a wave of local members is still adding to."""
    path = sweep_dir / "jobs.json"
    history = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    if replace_last:
        history["submissions"].pop()
    history["submissions"].append(record)
    atomic_write_json(path, history)
