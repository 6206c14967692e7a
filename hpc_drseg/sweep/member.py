"""The job-array member: a checkpointable callable that trains then evaluates its trials, each in its own process.

Trials run as `drseg train` then `drseg eval` subprocesses, so the trainer's own SIGUSR2/SIGTERM checkpointing and
auto-resume apply and a crash stays inside one trial. Never imports torch; submitit only where it is needed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.config import SweepConfig, SweepExecutorConfig, load_sweep_config
from hpc_drseg.constants import EXIT_RESUMABLE
from hpc_drseg.host import usable_cores
from hpc_drseg.sweep.metrics import trial_metrics
from hpc_drseg.sweep.spec import Trial
from hpc_drseg.sweep.store import load_sweep, read_trial_state, utc_now, write_trial_state


class TrialsFailed(RuntimeError):
    """Some trials of an array member failed; it still ran all of them (the message names each)."""


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
        sweep_dir = Path(self.sweep_dir)
        self._runs = [_TrialRun(trials[t], spec, sweep_dir, env, slot, job) for slot, t in enumerate(trial_ids)]
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
        stopped = any(r.get("status") == "STOPPED" for r in results.values())
        if stopped and _requeue_handler_installed() and not _job_is_ending():
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


def _current_job_id() -> str:
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not inside a submitit job: the debug executor
        return f"debug-{os.getpid()}"


def _job_is_ending() -> bool:
    """True when SLURM is already ending this job: after `scancel` it is COMPLETING (or gone) while its processes get
    SIGTERM, and a requeue would undo the user's cancel. The pre-timeout signal, preemption notices and
    `scancel --signal` leave it RUNNING, and only those may requeue."""
    job = os.environ.get("SLURM_JOB_ID")  # an array task has its own job id, which squeue accepts
    if not job:
        return False  # not a SLURM job (local or debug executor): nothing can cancel it behind our back
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False  # the scheduler cannot tell: keep the resumable behaviour
    states = done.stdout.split()
    return done.returncode != 0 or not states or states[0] != "RUNNING"


def _requeue_handler_installed() -> bool:
    handler = signal.getsignal(signal.SIGUSR2)
    return callable(handler) and "submitit" in getattr(handler, "__module__", "")


def _child_env(executor: SweepExecutorConfig, concurrent: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if concurrent > 1 and "OMP_NUM_THREADS" not in env:
        # Packed trials share the member's cores; without this each would start one thread per core.
        cores = int(env.get("SLURM_CPUS_PER_TASK", 0)) or usable_cores()
        env["OMP_NUM_THREADS"] = str(max(1, cores // concurrent))
    return env


def _gpu_env(env: dict[str, str], slot: int) -> dict[str, str]:
    """Trial `slot` of a member with several GPUs gets one of them (round robin); with one GPU all share it."""
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > 1:
        env = {**env, "CUDA_VISIBLE_DEVICES": visible[slot % len(visible)]}
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: if the member dies (OOM killer, SIGKILL), the trainer gets SIGTERM and
    checkpoints instead of running on as an orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class _TrialRun:
    """One trial of a member: train → eval → COMPLETED, or STOPPED (resumable) / FAILED; state in state/<id>.json."""

    def __init__(
        self, trial: Trial, spec: SweepConfig, sweep_dir: Path, env: dict[str, str], slot: int, job: str
    ) -> None:
        self.trial, self.spec, self.sweep_dir, self.job = trial, spec, sweep_dir, job
        self.env = _gpu_env(env, slot)
        self.record = read_trial_state(sweep_dir, trial.id)
        self.proc: Optional[subprocess.Popen] = None
        self.phase = ""
        self.log_path = sweep_dir / "logs" / f"{trial.id}.log"
        self.stopping = False

    def start_train(self) -> None:
        base = ["--config", self.spec.base_config] if self.spec.base_config else []
        self.record.update(
            status="RUNNING",
            attempts=self.record.get("attempts", 0) + 1,
            job=self.job,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=utc_now(),
            error=None,
        )
        self._start("train", [*base, *self.trial.overrides])

    def _start(self, phase: str, args: list[str]) -> None:
        self.phase = phase
        self.record.update(phase=phase, updated=utc_now())
        self.save()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log_file:
            log_file.write(f"\n===== {utc_now()} {phase} (attempt {self.record['attempts']}) =====\n")
            log_file.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpc_drseg", phase, *args],
                cwd=self.spec.workdir,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def advance(self) -> None:
        """Polls the running process; on its exit moves to the next phase or a final state."""
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return
        self.proc = None
        self.record[f"{self.phase}_exit"] = code
        if code == 0 and self.phase == "train" and not self.stopping:
            self._start("eval", self._eval_args())
        elif code == 0 and self.phase == "eval":
            trial = self.trial
            metrics = trial_metrics(Path(trial.run_dir), self.spec.eval.split, trial.monitor, trial.monitor_mode)
            self._end("COMPLETED", metrics=metrics)
        elif code == EXIT_RESUMABLE or self.stopping:
            self._end("STOPPED", error=f"{self.phase} stopped by a signal (exit {code}); resumes when rerun")
        else:
            self._end("FAILED", error=f"{self.phase} exited with {code}: {_tail(self.log_path)}")

    def _eval_args(self) -> list[str]:
        ev = self.spec.eval
        flags = {
            "--run": self.trial.run_dir,
            "--split": ev.split,
            "--protocol": ev.protocol,
            "--checkpoint": ev.checkpoint,
        }
        return [word for pair in flags.items() for word in pair]

    def _end(self, status: str, **fields: Any) -> None:
        self.record.update(status=status, updated=utc_now(), **fields)
        self.save()

    def save(self) -> None:
        write_trial_state(self.sweep_dir, self.trial.id, {"id": self.trial.id, **self.record})


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
    """The last lines of a trial's log (its error message, usually), without the phase banners."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    text = [line.strip() for line in text if line.strip() and not line.startswith("=====")]
    return " | ".join(text[-lines:])[-600:]
