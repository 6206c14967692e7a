"""First step of `drseg sweep run`: validate every trial, write the sweep folder, pick the trials to submit.

A new sweep submits all its trials; --resume reruns only the failed and the never-submitted ones of the same spec.
"""

from __future__ import annotations

from pathlib import Path

from hpc_drseg.config import SweepConfig
from hpc_drseg.errors import ExistsError, InputError
from hpc_drseg.sweep.spec import Trial, expand_trials
from hpc_drseg.sweep.status import sweep_status
from hpc_drseg.sweep.store import load_trials, read_trial_state, save_spec, save_trials, utc_now, write_trial_state


def prepare_sweep(spec: SweepConfig, resume: bool = False) -> tuple[Path, list[Trial]]:
    """Validates every trial, writes sweep.yaml + trials.json; returns the sweep dir and the trials to submit."""
    sweep_dir = Path(spec.sweep_dir or Path("sweeps") / spec.name).resolve()
    spec.sweep_dir, spec.workdir = str(sweep_dir), str(Path(spec.workdir or Path.cwd()).resolve())
    trials = expand_trials(spec, sweep_dir)
    exists = (sweep_dir / "trials.json").exists()
    if exists and not resume:
        raise ExistsError(
            f"{sweep_dir} already holds a sweep; pass --resume to rerun its failed or never-submitted trials, "
            "or set sweep_dir=<new folder>"
        )
    if exists:
        trials = _trials_to_resume(sweep_dir, trials)
    # sweep.yaml first: a folder with trials.json is a sweep, and a sweep always has its sweep.yaml.
    save_spec(sweep_dir, spec)
    if not exists:
        save_trials(sweep_dir, spec.name, trials)
    return sweep_dir, trials


def _trials_to_resume(sweep_dir: Path, trials: list[Trial]) -> list[Trial]:
    saved = load_trials(sweep_dir)
    if {t.id: t.overrides for t in trials} != {t.id: t.overrides for t in saved.values()}:
        raise InputError(
            f"{sweep_dir}/trials.json lists other trials than this sweep spec; resume with the spec that made it, "
            "or start a new sweep_dir"
        )
    status = {row["trial"]: row for row in sweep_status(sweep_dir)}
    todo = [t for t in trials if status[t.id]["state"] == "FAILED" or not status[t.id]["job"]]
    for trial in todo:  # a stale FAILED record would otherwise hide the new job's state
        record = read_trial_state(sweep_dir, trial.id)
        if record:
            write_trial_state(sweep_dir, trial.id, {**record, "status": "PENDING", "updated": utc_now()})
    return todo
