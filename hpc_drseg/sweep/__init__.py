"""Sweeps: a sweep spec → validated trials (configuration × seed) → one submitit job array → status → summary.

Modules, each importing only those above it: spec (trials from a spec) · store (the sweep folder's files) · metrics
(a trial's numbers) · member (the array member running `drseg train`/`drseg eval`) · status (trial and job states) ·
prepare (write the folder, pick trials) · summary (summary.md/.csv, plots) · submit (executors, run_sweep).
Importing this package imports neither submitit nor torch.
"""

from hpc_drseg.sweep.member import SweepMember, TrialsFailed
from hpc_drseg.sweep.metrics import trial_metrics
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.spec import Trial, expand_trials, sweep_points
from hpc_drseg.sweep.status import TRIAL_STATES, format_status, sweep_status, wait_for_sweep
from hpc_drseg.sweep.store import load_sweep, load_trials, read_trial_state
from hpc_drseg.sweep.submit import format_run, member_groups, run_sweep, submit_sweep
from hpc_drseg.sweep.summary import collect_sweep

__all__ = [
    "TRIAL_STATES",
    "SweepMember",
    "Trial",
    "TrialsFailed",
    "collect_sweep",
    "expand_trials",
    "format_run",
    "format_status",
    "load_sweep",
    "load_trials",
    "member_groups",
    "prepare_sweep",
    "read_trial_state",
    "run_sweep",
    "submit_sweep",
    "sweep_points",
    "sweep_status",
    "trial_metrics",
    "wait_for_sweep",
]
