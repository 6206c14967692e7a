"""Sweeps: a sweep spec → validated trials (configuration × seed) → one submitit job array → status → summary.

Each array member is a checkpointable callable that trains and evaluates its trials in subprocesses (`drseg train`,
then `drseg eval`), so the trainer's own SIGUSR2/SIGTERM checkpointing and auto-resume apply and a crash stays inside
one trial. The only module that imports submitit. Layout: SWEEP_DIR/{sweep.yaml, trials.json, jobs.json, runs/<id>,
state/<id>.json, logs/<id>.log, submitit/%j, summary.md, summary.csv, plots/}.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any, Optional

import yaml

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.config import (
    ConfigError,
    SweepConfig,
    SweepExecutorConfig,
    SweepParam,
    config_to_dict,
    load_config,
    load_sweep_config,
    parse_overrides,
)

log = logging.getLogger(__name__)

# Exit status of `drseg train` stopped by a signal after checkpointing (train/signals.py EXIT_RESUMABLE). Repeated
# here so that this module and the array members never import torch.
EXIT_RESUMABLE = 75
TRIAL_STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED")
VAL_METRICS = ("val/mAP", "val/mIoU", "val/mDice")
TEST_METRICS = ("mAP", "mIoU")
# SLURM job states (sacct/squeue) of a member that has not started yet or will run again.
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
_ACTIVE = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
_SCHEDULER_TIMEOUT_S = 15
_UNSET = object()  # a key this configuration does not set (explicit points may set different keys)


# ------------------------------------------------------------------------------------------------------- trials
@dataclass
class Trial:
    id: str
    """c<configuration>-s<seed>, e.g. c003-s1."""
    config_id: str
    """Configuration shared by the trials that differ only in their seed."""
    seed: int
    params: dict[str, Any]
    """Swept key → value of this configuration."""
    overrides: list[str]
    """Everything passed to `drseg train` after the base config: fixed, swept, train.seed, train.run_dir."""
    run_dir: str
    config_hash: str
    """Hash of the resolved run config without seed/run_dir: equal hashes train the same configuration."""
    monitor: str
    monitor_mode: str


def _override(key: str, value: Any) -> str:
    """key=value in the flow-YAML form that parse_overrides reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _flat_params(overrides: list[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for item in overrides:
        node, key = parse_overrides([item]), item.partition("=")[0]
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    return flat


def _sample(param: SweepParam, rng: random.Random) -> Any:
    if param.dist == "choice":
        return param.values[rng.randrange(len(param.values))]
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    if param.dist == "loguniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return float(f"{value:.4g}")  # 4 significant digits: readable overrides and tables, same draw for a seed


def sweep_points(spec: SweepConfig) -> list[list[str]]:
    """The configurations as override lists: grid product, then random draws, then explicit points."""
    points = [
        [_override(key, value) for key, value in zip(spec.grid, values)] for values in product(*spec.grid.values())
    ] if spec.grid else []  # fmt: skip
    rng = random.Random(spec.random.seed)
    for _ in range(spec.random.trials):
        points.append([_override(p.key, _sample(p, rng)) for p in spec.random.params])
    points.extend(list(point) for point in spec.points)
    return points


def expand_trials(spec: SweepConfig, sweep_dir: str | Path) -> list[Trial]:
    """Every configuration × every seed, each validated with load_config (a bad key fails before any submission)."""
    sweep_dir = Path(sweep_dir).resolve()
    trials = []
    for index, point in enumerate(sweep_points(spec)):
        clash = set(_flat_params(point)) & set(_flat_params(spec.overrides))
        if clash:
            raise ConfigError(f"sweep {spec.name}: {sorted(clash)} is both swept and fixed in `overrides`; "
                              "keep it in one place")  # fmt: skip
        for seed in spec.seeds:
            trials.append(_make_trial(spec, f"c{index:03d}", point, seed, sweep_dir))
    return trials


def _make_trial(spec: SweepConfig, config_id: str, point: list[str], seed: int, sweep_dir: Path) -> Trial:
    trial_id = f"{config_id}-s{seed}"
    run_dir = sweep_dir / "runs" / trial_id
    overrides = [*spec.overrides, *point, f"train.seed={seed}", f"train.run_dir={run_dir}"]
    try:
        cfg = load_config(spec.base_config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"sweep {spec.name}, trial {trial_id} ({' '.join(point)}): {exc}") from exc
    resolved = config_to_dict(cfg)
    resolved.pop("name")
    resolved["train"].pop("seed")
    resolved["train"].pop("run_dir")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]
    return Trial(trial_id, config_id, seed, _flat_params(point), overrides, str(run_dir), digest,
                 cfg.train.monitor, cfg.train.monitor_mode)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- sweep dir
def prepare_sweep(spec: SweepConfig, resume: bool = False) -> tuple[Path, list[Trial]]:
    """Validates every trial, writes sweep.yaml + trials.json; returns the sweep dir and the trials to submit."""
    sweep_dir = Path(spec.sweep_dir or Path("sweeps") / spec.name).resolve()
    spec.sweep_dir, spec.workdir = str(sweep_dir), str(Path(spec.workdir or Path.cwd()).resolve())
    trials = expand_trials(spec, sweep_dir)
    exists = (sweep_dir / "trials.json").exists()
    if exists and not resume:
        raise FileExistsError(f"{sweep_dir} already holds a sweep; pass --resume to rerun its failed or "
                              "never-submitted trials, or set sweep_dir=<new folder>")  # fmt: skip
    if exists:
        trials = _trials_to_resume(sweep_dir, trials)
    # sweep.yaml first: a folder with trials.json is a sweep, and a sweep always has its sweep.yaml.
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(config_to_dict(spec), sort_keys=False))
    if not exists:
        _write_json(sweep_dir / "trials.json", {"sweep": spec.name, "trials": {t.id: _without_id(t) for t in trials}})
    return sweep_dir, trials


def _without_id(trial: Trial) -> dict[str, Any]:
    record = asdict(trial)
    record.pop("id")
    return record


def _trials_to_resume(sweep_dir: Path, trials: list[Trial]) -> list[Trial]:
    saved = load_trials(sweep_dir)
    if {t.id: t.overrides for t in trials} != {t.id: t.overrides for t in saved.values()}:
        raise ValueError(f"{sweep_dir}/trials.json lists other trials than this sweep spec; resume with the spec "
                         "that made it, or start a new sweep_dir")  # fmt: skip
    status = {row["trial"]: row for row in sweep_status(sweep_dir)}
    todo = [t for t in trials if status[t.id]["state"] == "FAILED" or not status[t.id]["job"]]
    for trial in todo:  # a stale FAILED record would otherwise hide the new job's state
        record = read_trial_state(sweep_dir, trial.id)
        if record:
            _write_json(_state_path(sweep_dir, trial.id), {**record, "status": "PENDING", "updated": _now()})
    return todo


def load_trials(sweep_dir: str | Path) -> dict[str, Trial]:
    path = Path(sweep_dir) / "trials.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {sweep_dir} a sweep folder made by `drseg sweep`?")
    records = json.loads(path.read_text())["trials"]
    return {trial_id: Trial(id=trial_id, **record) for trial_id, record in records.items()}


def load_sweep(sweep_dir: str | Path) -> tuple[SweepConfig, dict[str, Trial]]:
    trials = load_trials(sweep_dir)
    return load_sweep_config(Path(sweep_dir) / "sweep.yaml"), trials


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(_finite(payload), indent=2) + "\n")


def _finite(node: Any) -> Any:
    """Strict JSON has no NaN: a missing metric is written as null."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_finite(v) for v in node]
    return None if isinstance(node, float) and not math.isfinite(node) else node


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _state_path(sweep_dir: Path, trial_id: str) -> Path:
    return sweep_dir / "state" / f"{trial_id}.json"


def read_trial_state(sweep_dir: str | Path, trial_id: str) -> dict[str, Any]:
    path = _state_path(Path(sweep_dir), trial_id)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


# ------------------------------------------------------------------------------------------------ array members
class SweepMember:
    """One job-array member: trains then evaluates its trials, each in its own process, all at once.

    Several trials (executor.trials_per_gpu × GPUs) run concurrently, each on one GPU. On SIGUSR2 (preemption, or the
    time limit − signal_delay_s) submitit calls checkpoint(): the running trainers checkpoint (they get the signal
    too, and it is forwarded to them) and the member requeues itself; the requeued member skips completed trials and
    the trainers resume from RUN/checkpoints/last.pt.
    """

    def __init__(self, sweep_dir: str | Path, poll_s: float = 0.5, job: Optional[str] = None) -> None:
        self.sweep_dir = str(Path(sweep_dir).resolve())
        self.poll_s = poll_s
        self.job = job  # recorded in the trial states; None = ask submitit's job environment
        self._runs: list[_TrialRun] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runs"] = []  # live processes stay with this process; a requeued member starts its own
        return state

    def __call__(self, trial_ids: list[str]) -> dict[str, dict[str, Any]]:
        spec, trials = load_sweep(self.sweep_dir)
        env = _child_env(spec.executor, len(trial_ids))
        job = self.job or _current_job_id()
        self._runs = [_TrialRun(trials[t], spec, Path(self.sweep_dir), env, i, job) for i, t in enumerate(trial_ids)]
        try:
            todo = [run for run in self._runs if run.record.get("status") != "COMPLETED"]
            for run in todo:
                run.start_train()
            while any(run.proc is not None for run in todo):
                for run in todo:
                    run.advance()
                time.sleep(self.poll_s)
        finally:
            _stop_processes(self._runs, signal.SIGTERM, grace_s=60)
        return self._finish()

    def _finish(self) -> dict[str, dict[str, Any]]:
        results = {run.trial.id: run.record for run in self._runs}
        if any(r.get("status") == "STOPPED" for r in results.values()) and _requeue_handler_installed():
            # A trainer stopped resumably without this process being signalled (e.g. SIGTERM to the trainer alone):
            # raise the signal submitit listens to, so that its checkpoint()/requeue path runs.
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(30)  # the handler requeues and exits while we sleep
        failed = {k: r.get("error", r.get("status")) for k, r in results.items() if r.get("status") != "COMPLETED"}
        if failed:
            raise TrialsFailed(f"{len(failed)} of {len(results)} trial(s) did not complete: {failed}")
        return results

    def checkpoint(self, trial_ids: list[str]) -> Any:
        """Called by submitit on SIGUSR2: let the trainers checkpoint, then resubmit this same member."""
        import submitit

        spec = load_sweep_config(Path(self.sweep_dir) / "sweep.yaml")
        grace_s = max(10, spec.executor.signal_delay_s - 30)
        _stop_processes(self._runs, signal.SIGUSR2, grace_s=grace_s, stopping=True)
        return submitit.helpers.DelayedSubmission(SweepMember(self.sweep_dir, self.poll_s), trial_ids)


class TrialsFailed(RuntimeError):
    """Some trials of an array member failed; it still ran all of them (the message names each)."""


def _requeue_handler_installed() -> bool:
    handler = signal.getsignal(signal.SIGUSR2)
    return callable(handler) and "submitit" in getattr(handler, "__module__", "")


def _child_env(executor: SweepExecutorConfig, concurrent: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if concurrent > 1 and "OMP_NUM_THREADS" not in env:
        # Packed trials share the member's cores; without this each would start one thread per core.
        cores = int(env.get("SLURM_CPUS_PER_TASK", 0)) or os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // concurrent))
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: if the member dies (OOM killer, SIGKILL), the trainer gets SIGTERM and
    checkpoints instead of running on as an orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class _TrialRun:
    """One trial of a member: train → eval → COMPLETED, or STOPPED (resumable) / FAILED; state in state/<id>.json."""

    def __init__(self, trial: Trial, spec: SweepConfig, sweep_dir: Path, env: dict[str, str], slot: int,
                 job: str) -> None:  # fmt: skip
        self.trial, self.spec, self.sweep_dir, self.job = trial, spec, sweep_dir, job
        self.env = _gpu_env(env, slot)
        self.record = read_trial_state(sweep_dir, trial.id)
        self.proc: Optional[subprocess.Popen] = None
        self.phase = ""
        self.log_path = sweep_dir / "logs" / f"{trial.id}.log"
        self.stopping = False

    def start_train(self) -> None:
        base = ["--config", self.spec.base_config] if self.spec.base_config else []
        self.record.update(status="RUNNING", attempts=self.record.get("attempts", 0) + 1, job=self.job,
                           host=socket.gethostname(), pid=os.getpid(), started=_now(), error=None)  # fmt: skip
        self._start("train", [*base, *self.trial.overrides])

    def _start(self, phase: str, args: list[str]) -> None:
        self.phase = phase
        self.record.update(phase=phase, updated=_now())
        self.save()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log_file:
            log_file.write(f"\n===== {_now()} {phase} (attempt {self.record['attempts']}) =====\n")
            log_file.flush()
            cmd = [sys.executable, "-m", "hpc_drseg", phase, *args]
            self.proc = subprocess.Popen(cmd, cwd=self.spec.workdir, env=self.env, stdout=log_file,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # fmt: skip

    def advance(self) -> None:
        """Polls the running process; on its exit moves to the next phase or a final state."""
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return
        self.proc = None
        self.record[f"{self.phase}_exit"] = code
        if code == 0 and self.phase == "train" and not self.stopping:
            ev = self.spec.eval
            self._start("eval", ["--run", self.trial.run_dir, "--split", ev.split, "--protocol", ev.protocol,
                                 "--checkpoint", ev.checkpoint])  # fmt: skip
        elif code == 0 and self.phase == "eval":
            metrics = trial_metrics(Path(self.trial.run_dir), self.spec.eval.split, self.trial.monitor,
                                    self.trial.monitor_mode)  # fmt: skip
            self._end("COMPLETED", metrics=metrics)
        elif code == EXIT_RESUMABLE or self.stopping:
            self._end("STOPPED", error=f"{self.phase} stopped by a signal (exit {code}); resumes when rerun")
        else:
            self._end("FAILED", error=f"{self.phase} exited with {code}: {_tail(self.log_path)}")

    def _end(self, status: str, **fields: Any) -> None:
        self.record.update(status=status, updated=_now(), **fields)
        self.save()

    def save(self) -> None:
        _write_json(_state_path(self.sweep_dir, self.trial.id), {"id": self.trial.id, **self.record})


def _gpu_env(env: dict[str, str], slot: int) -> dict[str, str]:
    """Trial `slot` of a member with several GPUs gets one of them (round robin); with one GPU all share it."""
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > 1:
        env = {**env, "CUDA_VISIBLE_DEVICES": visible[slot % len(visible)]}
    return env


def _stop_processes(runs: list[_TrialRun], sig: int, grace_s: float, stopping: bool = False) -> None:
    """Sends `sig` to every live trial process, waits up to grace_s for them to checkpoint, then kills the rest."""
    live = [run for run in runs if run.proc is not None and run.proc.poll() is None]
    for run in live:
        run.stopping = run.stopping or stopping
        run.proc.send_signal(sig)
    deadline = time.monotonic() + grace_s
    while any(run.proc.poll() is None for run in live) and time.monotonic() < deadline:
        time.sleep(0.2)
    for run in live:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.stopping = True
        run.advance()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    text = [line.strip() for line in text if line.strip() and not line.startswith("=====")]
    return " | ".join(text[-lines:])[-600:]


def _current_job_id() -> str:
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not inside a submitit job: the debug executor
        return f"debug-{os.getpid()}"


# ---------------------------------------------------------------------------------------------------- metrics
def trial_metrics(run_dir: Path, split: str, monitor: str, monitor_mode: str) -> dict[str, float]:
    """Validation metrics at the best epoch (by `monitor`, RUN/metrics.csv) and test metrics (RUN/eval_<split>.json)."""
    metrics: dict[str, float] = {}
    rows = _read_csv(run_dir / "metrics.csv")
    scored = [row for row in rows if _number(row.get(monitor)) == _number(row.get(monitor))]  # drop NaN/missing
    if scored:
        pick = max if monitor_mode == "max" else min
        best = pick(scored, key=lambda row: _number(row[monitor]))
        metrics.update({name: _number(best.get(name)) for name in VAL_METRICS})
        metrics["best_epoch"] = _number(best.get("epoch"))
    path = run_dir / f"eval_{split}.json"
    if path.is_file():
        for protocol, values in json.loads(path.read_text())["protocols"].items():
            for name in TEST_METRICS:
                metrics[f"{split}/{protocol}/{name}"] = _number(values.get(name))
    return metrics


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------------- submission
def member_groups(trials: list[Trial], executor: SweepExecutorConfig) -> list[list[str]]:
    """Trial ids per array member: trials_per_gpu × GPUs trials each, in order (a configuration's seeds together)."""
    size = executor.trials_per_gpu * max(1, executor.gpus_per_node)
    ids = [t.id for t in trials]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def submit_sweep(sweep_dir: Path, spec: SweepConfig, trials: list[Trial]) -> dict[str, Any]:
    """Runs (debug, local: waits) or submits (slurm: one job array) the trials; appends the record to jobs.json."""
    groups = member_groups(trials, spec.executor)
    member = SweepMember(sweep_dir)
    record: dict[str, Any] = {"executor": spec.executor.kind, "submitted_at": _now(), "members": []}
    started = time.perf_counter()
    if spec.executor.kind == "slurm":
        jobs = _slurm_executor(sweep_dir, spec).map_array(member, groups)
        record["array_id"] = jobs[0].job_id.split("_")[0]
        record["members"] = [{"job": job.job_id, "trials": group} for job, group in zip(jobs, groups)]
        record["submit_s"] = round(time.perf_counter() - started, 3)
        _append_submission(sweep_dir, record)
    elif spec.executor.kind == "local":
        _run_local(sweep_dir, spec, member, groups, record)
    else:
        _run_debug(sweep_dir, member, groups, record)
    return record


def _slurm_executor(sweep_dir: Path, spec: SweepConfig) -> Any:
    import submitit

    ex = spec.executor
    executor = submitit.SlurmExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=ex.max_num_timeout)
    params: dict[str, Any] = dict(job_name=f"drseg-{spec.name}", time=ex.timeout_min, nodes=1, ntasks_per_node=1,
                                  cpus_per_task=ex.cpus_per_task, array_parallelism=ex.slurm_array_parallelism,
                                  signal_delay_s=ex.signal_delay_s, stderr_to_stdout=True)  # fmt: skip
    optional = {"partition": ex.partition, "gpus_per_node": ex.gpus_per_node or None,
                "mem": f"{ex.mem_gb}G" if ex.mem_gb else None, "setup": ex.setup or None,
                "additional_parameters": ex.slurm_additional_parameters or None}  # fmt: skip
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def _run_local(sweep_dir: Path, spec: SweepConfig, member: SweepMember, groups: list[list[str]],
               record: dict[str, Any]) -> None:  # fmt: skip
    """LocalExecutor starts every member at once: submit waves of slurm_array_parallelism and wait for each."""
    import submitit

    ex = spec.executor
    executor = submitit.LocalExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=ex.max_num_timeout)
    executor.update_parameters(timeout_min=ex.timeout_min, gpus_per_node=ex.gpus_per_node,
                               signal_delay_s=ex.signal_delay_s, **({"setup": ex.setup} if ex.setup else {}))
    started = time.perf_counter()
    for first in range(0, len(groups), ex.slurm_array_parallelism):
        wave = groups[first : first + ex.slurm_array_parallelism]
        jobs = executor.map_array(member, wave)
        record["members"] += [{"job": job.job_id, "trials": group} for job, group in zip(jobs, wave)]
        record["submit_s"] = round(time.perf_counter() - started, 3)
        _append_submission(sweep_dir, record, replace_last=first > 0)
        for job in jobs:
            job.wait()


def _run_debug(sweep_dir: Path, member: SweepMember, groups: list[list[str]], record: dict[str, Any]) -> None:
    record["members"] = [{"job": f"debug-{os.getpid()}-{i}", "trials": g} for i, g in enumerate(groups)]
    record["submit_s"] = 0.0
    _append_submission(sweep_dir, record)
    for entry in record["members"]:
        try:
            SweepMember(sweep_dir, member.poll_s, job=entry["job"])(entry["trials"])
        except TrialsFailed as exc:
            log.warning("%s", exc)


def _append_submission(sweep_dir: Path, record: dict[str, Any], replace_last: bool = False) -> None:
    path = sweep_dir / "jobs.json"
    history = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    if replace_last:
        history["submissions"].pop()
    history["submissions"].append(record)
    _write_json(path, history)


def run_sweep(config: str | Path, overrides: Optional[list[str]] = None, executor: Optional[str] = None,
              sweep_dir: Optional[str] = None, resume: bool = False, wait: bool = False) -> dict[str, Any]:  # fmt: skip
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


# ------------------------------------------------------------------------------------------------------ status
def sweep_status(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial: state (PENDING/RUNNING/COMPLETED/FAILED), member job, job state and a detail."""
    sweep_dir = Path(sweep_dir)
    spec, trials = load_sweep(sweep_dir)
    job_of, kind_of = _latest_jobs(sweep_dir)
    job_states = _job_states(sweep_dir, job_of, kind_of)
    rows = []
    for trial in trials.values():
        job = job_of.get(trial.id, "")
        record = read_trial_state(sweep_dir, trial.id)
        state, detail = _trial_state(record, job_states.get(job), spec.eval.rank_by)
        rows.append({"trial": trial.id, "config": trial.config_id, "seed": trial.seed, "state": state,
                     "job": job, "job_state": job_states.get(job) or "", "detail": detail})  # fmt: skip
    return rows


def _latest_jobs(sweep_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    path = sweep_dir / "jobs.json"
    job_of, kind_of = {}, {}
    for record in json.loads(path.read_text())["submissions"] if path.is_file() else []:
        for member in record["members"]:
            kind_of[member["job"]] = record["executor"]
            job_of.update({trial_id: member["job"] for trial_id in member["trials"]})
    return job_of, kind_of


def _job_states(sweep_dir: Path, job_of: dict[str, str], kind_of: dict[str, str]) -> dict[str, str]:
    """Member job → state: result pickle first (final), then sacct, then squeue (SLURM) or the process (local)."""
    from submitit.core.utils import JobPaths

    jobs = set(job_of.values())
    states: dict[str, str] = {}
    for job in jobs:
        if kind_of.get(job) == "debug":
            continue
        outcome = _pickled_outcome(JobPaths(sweep_dir / "submitit" / "%j", job_id=job).result_pickle)
        if outcome:
            states[job] = outcome
        elif kind_of.get(job) == "local":
            states[job] = "RUNNING" if _pid_alive(int(job)) else "GONE"
    slurm = {job for job in jobs if kind_of.get(job) == "slurm" and job not in states}
    if slurm:
        states.update(_slurm_states(slurm))
    return states


def _pickled_outcome(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    import pickle

    try:
        with open(path, "rb") as handle:
            kind = pickle.load(handle)[0]
    except Exception:  # a pickle being written, or of a class this process cannot import: decide from elsewhere
        return None
    return "COMPLETED" if kind == "success" else "FAILED"


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
    except PermissionError:
        return True
    return True


def _trial_state(record: dict[str, Any], job_state: Optional[str], rank_by: str) -> tuple[str, str]:
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


# ----------------------------------------------------------------------------------------------------- collect
def collect_sweep(sweep_dir: str | Path, rank_by: Optional[str] = None) -> dict[str, Path]:
    """SWEEP_DIR/summary.md + summary.csv (one row per configuration, mean ± std over seeds, ranked) and plots/."""
    sweep_dir = Path(sweep_dir)
    spec, trials = load_sweep(sweep_dir)
    states = {row["trial"]: row["state"] for row in sweep_status(sweep_dir)}
    metric_names = [*VAL_METRICS, *(f"{spec.eval.split}/{p}/{m}" for p in ("paper", "standard") for m in TEST_METRICS)]
    rank_by = rank_by or spec.eval.rank_by
    if rank_by not in metric_names:
        raise ValueError(f"rank_by: got {rank_by!r}; choose one of {metric_names}")
    keys = _swept_keys(trials)
    rows = _summary_rows(trials, states, metric_names, keys, spec.eval.split)
    sign = -1.0 if spec.eval.rank_mode == "max" else 1.0
    rows.sort(key=lambda row: (math.isnan(row[rank_by][0]), sign * _nan_to(row[rank_by][0], 0.0)))
    paths = {"md": sweep_dir / "summary.md", "csv": sweep_dir / "summary.csv"}
    atomic_write_text(paths["csv"], _summary_csv(rows, keys, metric_names))
    atomic_write_text(paths["md"], _summary_md(spec, rows, keys, metric_names, rank_by, states))
    for key in keys:
        setting = [row for row in rows if key in row["params"]]  # explicit points may leave a key at its default
        if all(_is_number(row["params"][key]) for row in setting):
            paths[f"plot:{key}"] = _plot(sweep_dir, setting, key, rank_by)
    return paths


def _swept_keys(trials: dict[str, Trial]) -> list[str]:
    keys: list[str] = []
    for trial in trials.values():
        keys.extend(k for k in trial.params if k not in keys)
    return keys


def _summary_rows(trials: dict[str, Trial], states: dict[str, str], metric_names: list[str], keys: list[str],
                  split: str) -> list[dict[str, Any]]:  # fmt: skip
    by_config: dict[str, list[Trial]] = {}
    for trial in trials.values():
        by_config.setdefault(trial.config_id, []).append(trial)
    rows = []
    for config_id, group in by_config.items():
        done = [t for t in group if states[t.id] == "COMPLETED"]
        values = [trial_metrics(Path(t.run_dir), split, t.monitor, t.monitor_mode) for t in done]
        row: dict[str, Any] = {"config": config_id, "params": group[0].params, "hash": group[0].config_hash,
                               "n_seeds": len(done), "n_failed": sum(states[t.id] == "FAILED" for t in group),
                               "n_pending": sum(states[t.id] in ("PENDING", "RUNNING") for t in group)}  # fmt: skip
        for name in metric_names:
            row[name] = _mean_std([v.get(name, math.nan) for v in values])
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n − 1) over seeds, ignoring NaN; std is NaN for fewer than 2 values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan, 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)), len(finite)


def _nan_to(value: float, fill: float) -> float:
    return fill if math.isnan(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt_value(value: Any) -> str:
    if value is _UNSET:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _fmt_mean_std(stats: tuple[float, float, int]) -> str:
    mean, std, _ = stats
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _summary_csv(rows: list[dict[str, Any]], keys: list[str], metric_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "config", *keys, "n_seeds", "n_failed", "n_pending", "config_hash",
                     *(f"{name}_{part}" for name in metric_names for part in ("mean", "std"))])  # fmt: skip
    for rank, row in enumerate(rows, 1):
        stats = [v for name in metric_names for v in row[name][:2]]
        writer.writerow([rank, row["config"], *(_fmt_value(row["params"].get(k, _UNSET)) for k in keys), row["n_seeds"],
                         row["n_failed"], row["n_pending"], row["hash"],
                         *("" if math.isnan(v) else f"{v:.6g}" for v in stats)])  # fmt: skip
    return buffer.getvalue()


def _summary_md(spec: SweepConfig, rows: list[dict[str, Any]], keys: list[str], metric_names: list[str],
                rank_by: str, states: dict[str, str]) -> str:  # fmt: skip
    header = ["rank", "config", *keys, "n_seeds", "n_failed", *metric_names]
    lines = [
        f"# Sweep {spec.name}: {len(rows)} configurations × seeds {spec.seeds}",
        "",
        f"Ranked by **{rank_by}** ({spec.eval.rank_mode}); mean ± sample std over the completed seeds. Validation "
        f"metrics are those of the best epoch by each run's train.monitor; `{spec.eval.split}/<protocol>/…` come "
        f"from `drseg eval` (paper and standard protocols). Base config: `{spec.base_config}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), row["config"], *(_fmt_value(row["params"].get(k, _UNSET)) for k in keys),
                 str(row["n_seeds"]), str(row["n_failed"]), *(_fmt_mean_std(row[m]) for m in metric_names)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(v == s for v in states.values()) for s in TRIAL_STATES}
    lines += ["", f"Trials: {', '.join(f'{n} {s}' for s, n in counts.items() if n)} (details: drseg sweep status)."]
    return "\n".join(lines) + "\n"


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], key: str, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((float(r["params"][key]), r[metric][0], _nan_to(r[metric][1], 0.0)) for r in rows
                    if not math.isnan(r[metric][0]))  # fmt: skip
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if points:
        xs, means, stds = zip(*points)
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3)
        if min(xs) > 0 and max(xs) / min(xs) > 20:  # learning-rate-like keys read better on a log axis
            ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = sweep_dir / "plots" / f"{metric.replace('/', '_')}_vs_{key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
