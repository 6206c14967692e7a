"""`drseg sweep run`: prepare the sweep folder, then run its members (debug: in this process; local: as submitit
jobs on this machine, waiting for them) or submit them as one SLURM job array; each submission goes to jobs.json."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.config import SweepConfig, SweepExecutorConfig, load_sweep_config
from hpc_drseg.sweep.member import SweepMember, TrialsFailed
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.spec import Trial
from hpc_drseg.sweep.status import wait_for_sweep
from hpc_drseg.sweep.store import append_submission, load_trials, utc_now
from hpc_drseg.sweep.summary import collect_sweep

log = logging.getLogger(__name__)


def member_groups(trials: list[Trial], executor: SweepExecutorConfig) -> list[list[str]]:
    """Trial ids per array member: trials_per_gpu × GPUs trials each, in order (a configuration's seeds together)."""
    size = executor.trials_per_gpu * max(1, executor.gpus_per_node)
    ids = [t.id for t in trials]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def submit_sweep(sweep_dir: Path, spec: SweepConfig, trials: list[Trial]) -> dict[str, Any]:
    """Runs (debug, local: waits) or submits (slurm: one job array) the trials; appends the record to jobs.json."""
    groups = member_groups(trials, spec.executor)
    member = SweepMember(sweep_dir)
    record: dict[str, Any] = {"executor": spec.executor.kind, "submitted_at": utc_now(), "members": []}
    if spec.executor.kind == "slurm":
        _submit_slurm(sweep_dir, spec, member, groups, record)
    elif spec.executor.kind == "local":
        _run_local(sweep_dir, spec, member, groups, record)
    else:
        _run_debug(sweep_dir, member, groups, record)
    return record


def _submit_slurm(
    sweep_dir: Path, spec: SweepConfig, member: SweepMember, groups: list[list[str]], record: dict[str, Any]
) -> None:
    started = time.perf_counter()
    jobs = _slurm_executor(sweep_dir, spec).map_array(member, groups)
    record["array_id"] = jobs[0].job_id.split("_")[0]
    record["members"] = [{"job": job.job_id, "trials": group} for job, group in zip(jobs, groups)]
    record["submit_s"] = round(time.perf_counter() - started, 3)
    append_submission(sweep_dir, record)


def _slurm_executor(sweep_dir: Path, spec: SweepConfig) -> Any:
    import submitit

    ex = spec.executor
    executor = submitit.SlurmExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=ex.max_num_timeout)
    params: dict[str, Any] = {
        "job_name": f"drseg-{spec.name}",
        "time": ex.timeout_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": ex.cpus_per_task,
        "array_parallelism": ex.slurm_array_parallelism,
        "signal_delay_s": ex.signal_delay_s,
        "stderr_to_stdout": True,
    }
    optional = {
        "partition": ex.partition,
        "gpus_per_node": ex.gpus_per_node or None,
        "mem": f"{ex.mem_gb}G" if ex.mem_gb else None,
        "setup": ex.setup or None,
        "additional_parameters": ex.slurm_additional_parameters or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def _run_local(
    sweep_dir: Path, spec: SweepConfig, member: SweepMember, groups: list[list[str]], record: dict[str, Any]
) -> None:
    """LocalExecutor starts every member at once: submit waves of slurm_array_parallelism and wait for each."""
    import submitit

    ex = spec.executor
    executor = submitit.LocalExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=ex.max_num_timeout)
    executor.update_parameters(
        timeout_min=ex.timeout_min,
        gpus_per_node=ex.gpus_per_node,
        signal_delay_s=ex.signal_delay_s,
        **({"setup": ex.setup} if ex.setup else {}),
    )
    started = time.perf_counter()
    for first in range(0, len(groups), ex.slurm_array_parallelism):
        wave = groups[first : first + ex.slurm_array_parallelism]
        jobs = executor.map_array(member, wave)
        record["members"] += [{"job": job.job_id, "trials": group} for job, group in zip(jobs, wave)]
        record["submit_s"] = round(time.perf_counter() - started, 3)
        append_submission(sweep_dir, record, replace_last=first > 0)
        for job in jobs:
            job.wait()


def _run_debug(sweep_dir: Path, member: SweepMember, groups: list[list[str]], record: dict[str, Any]) -> None:
    """Members one after the other in this process: no submitit job, no requeue; failures are logged."""
    record["members"] = [{"job": f"debug-{os.getpid()}-{i}", "trials": g} for i, g in enumerate(groups)]
    record["submit_s"] = 0.0
    append_submission(sweep_dir, record)
    for entry in record["members"]:
        try:
            SweepMember(sweep_dir, member.poll_s, job=entry["job"])(entry["trials"])
        except TrialsFailed as exc:
            log.warning("%s", exc)


def run_sweep(
    config: str | Path,
    overrides: Optional[list[str]] = None,
    executor: Optional[str] = None,
    sweep_dir: Optional[str] = None,
    resume: bool = False,
    wait: bool = False,
) -> dict[str, Any]:
    """`drseg sweep run`: validate, write the sweep dir, submit; debug/local (and slurm with wait) also collect."""
    extra = [f"executor.kind={executor}"] if executor else []
    extra += [f"sweep_dir={sweep_dir}"] if sweep_dir else []
    spec = load_sweep_config(config, [*(overrides or []), *extra])
    started = time.perf_counter()
    path, trials = prepare_sweep(spec, resume=resume)
    result: dict[str, Any] = {"sweep_dir": str(path), "trials": len(load_trials(path)), "submitted": len(trials)}
    if not trials:
        return result
    result.update(submit_sweep(path, spec, trials))
    if spec.executor.kind != "slurm" or wait:
        wait_for_sweep(path, poll_s=5.0)
        result["summary"] = str(collect_sweep(path)["md"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def format_run(result: dict[str, Any]) -> str:
    """One line about a run_sweep result (what was submitted where, how fast)."""
    text = f"{result['sweep_dir']}: {result['trials']} trials, {result['submitted']} submitted"
    if result.get("members"):
        text += f" as {len(result['members'])} {result['executor']} member(s)"
        text += f" (job array {result['array_id']})" if result.get("array_id") else ""
        text += f", submit {result['submit_s']:.2f} s"
    if "wall_s" in result:
        text += f", wall {result['wall_s']:.1f} s"
    return text
