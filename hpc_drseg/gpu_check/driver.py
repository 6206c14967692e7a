"""`drseg bench gpu --out DIR`: every GPU figure the project needs in one command, sized for a short GPU lease.

The parts of plan.PARTS run in order, each in a worker process of its own (worker.py) that appends its rows to
DIR/results.jsonl as it measures them. One overall deadline: a part gets what is left of it (at most its own cap) and
is killed at that limit; a part is skipped, with the reason, when too little is left, when an import it needs is
missing, in a dry run when it needs CUDA, or when the data it runs on could not be made. Each part's status row
follows its figures; DIR/parts.log holds every worker's output, DIR/summary.txt the table printed at the end.
Standard library only: the driver itself never imports torch, so it starts at once and survives any part.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.errors import InputError
from hpc_drseg.gpu_check.context import STATUS_SUFFIX
from hpc_drseg.gpu_check.plan import DEFAULT_DEADLINE_S, PART_NAMES, PARTS, Part
from hpc_drseg.gpu_check.results import RESULTS_NAME, append_row, format_summary, read_rows

LOG_NAME, SUMMARY_NAME = "parts.log", "summary.txt"
KILL_GRACE_S = 10.0  # SIGTERM first (the trainer checkpoints and DataLoader workers exit), SIGKILL after this


class Run:
    """One `drseg bench gpu` run: the output folder, the clock and what earlier parts found out."""

    def __init__(self, out: Path, deadline_s: float, dry_run: bool, log: Callable[[str], None]) -> None:
        self.out, self.dry_run, self.log = out, dry_run, log
        self.results = out / RESULTS_NAME
        self.started = time.time()
        self.until = self.started + deadline_s
        self.no_cuda: Optional[str] = None
        self.no_data: Optional[str] = None
        self.failed = 0

    def left_s(self) -> float:
        return self.until - time.time()

    def part_row(self, part: str, status: str, seconds: float, reason: str = "") -> None:
        append_row(self.results, {"kind": "part", "part": part, "status": status, "seconds": seconds, "reason": reason})
        self.log(f"[{time.time() - self.started:6.1f} s] {part}: {status}{f' ({reason})' if reason else ''}")


def missing_imports(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def skip_reason(run: Run, part: Part) -> Optional[str]:
    """Why `part` must not start now, or None."""
    if part.gpu_only and run.dry_run:
        return "dry run: needs CUDA"
    if run.no_cuda and part.name != "environment":
        return run.no_cuda
    if part.needs_data and run.no_data:
        return run.no_data
    missing = missing_imports(part.needs)
    if missing:
        return f"missing import {', '.join(missing)} (carry the wheels: bash launch/gpu_wheels.sh)"
    if run.left_s() < part.min_s:
        return f"deadline: {max(run.left_s(), 0):.0f} s left, the part needs at least {part.min_s:.0f} s"
    return None


def _stop(process: subprocess.Popen) -> None:
    """Ends the worker's whole process group (DataLoader workers, compile workers, pytest)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_worker(run: Run, part: Part, work: Path, limit_s: float) -> tuple[str, str]:
    """(status, reason) of one part run in its worker process, killed after `limit_s`."""
    command = [sys.executable, "-m", "hpc_drseg.gpu_check.worker", part.name, "--results", str(run.results)]
    command += ["--work", str(work), "--until", f"{time.time() + limit_s:.3f}"] + (["--dry-run"] * run.dry_run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    if run.dry_run:
        # one compute thread: OpenMP threads spinning on an oversubscribed CPU (CI, a shared machine) can make
        # tiny steps 10-100x slower; a dry run proves the machinery, its figures mean nothing anyway
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(run.out / LOG_NAME, "a") as log:
        log.write(f"\n===== {part.name} (limit {limit_s:.0f} s): {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = process.wait(limit_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            return "timed_out", f"killed at its limit of {limit_s:.0f} s (rows measured before are kept)"
        except BaseException:
            _stop(process)
            raise
    status_file = work / f"{part.name}{STATUS_SUFFIX}"
    if status_file.is_file():
        status = json.loads(status_file.read_text())
        return status["status"], status["reason"]
    if returncode == 0:
        return "ok", ""
    return "failed", f"worker exit status {returncode} (see {LOG_NAME})"


def _after(run: Run, part: Part, status: str, reason: str) -> None:
    """What later parts learn from this one."""
    if status != "ok" and status != "skipped":
        run.failed += 1
    if part.name == "data" and status != "ok":
        run.no_data = f"no synthetic data: the data part {status}"
    if part.name == "environment" and not run.dry_run:
        env = [row for row in read_rows(run.results) if row.get("kind") == "environment"]
        if not env:  # full-size parts on a CPU would only run into their limits: no CUDA seen, no GPU parts
            run.no_cuda = f"the environment part {status} without reporting a CUDA device"
        elif not env[-1].get("cuda_available"):
            run.no_cuda = "no CUDA device (torch.cuda.is_available() is False): use --dry-run on a CPU"


def part_limit(run: Run, part: Part, later: list[Part]) -> float:
    """What is left of the deadline, less the least time of each later part that will run (so one slow part cannot
    starve the rest), at most the part's own cap."""
    reserve = sum(p.min_s for p in later if not (p.gpu_only and run.dry_run))
    return min(part.cap_s, run.left_s() - reserve)


def run_part(run: Run, part: Part, work: Path, later: list[Part]) -> None:
    reason = skip_reason(run, part)
    limit = part_limit(run, part, later)
    if reason is None and limit < part.min_s:
        reason = (
            f"deadline: {max(limit, 0):.0f} s left for it after the later parts' least times, {part.min_s:.0f} s needed"
        )
    if reason is not None:
        run.part_row(part.name, "skipped", 0.0, reason)
        return
    run.log(f"[{time.time() - run.started:6.1f} s] {part.name}: running (limit {limit:.0f} s)")
    started = time.perf_counter()
    status, reason = run_worker(run, part, work, limit)
    run.part_row(part.name, status, time.perf_counter() - started, reason)
    _after(run, part, status, reason)


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM (an outer `timeout`) ends the run like Ctrl-C: the running part is stopped, the summary written."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_gpu_check(
    out: str | Path,
    deadline_s: float = DEFAULT_DEADLINE_S,
    dry_run: bool = False,
    parts: tuple[str, ...] = PART_NAMES,
    log: Callable[[str], None] = print,
) -> int:
    """Runs the parts named in `parts` (in plan order; the environment always, the data when a part needs it) into
    OUT; returns 0 when none failed or timed out, else 1 (also when a full run found no CUDA device)."""
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        raise InputError(f"--parts: unknown {unknown}; choose from {','.join(PART_NAMES)}")
    if deadline_s <= 0:
        raise InputError(f"--deadline-s: got {deadline_s}; give the seconds the whole check may take, e.g. 510")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_NAME, LOG_NAME, SUMMARY_NAME):  # this command's own files from an earlier run
        (out / name).unlink(missing_ok=True)
    wanted = set(parts) | {"environment"}  # always: it is what says whether there is a GPU to measure
    if any(part.needs_data for part in PARTS if part.name in wanted):
        wanted.add("data")  # the shards those parts run on
    parts = tuple(name for name in PART_NAMES if name in wanted)
    run = Run(out, deadline_s, dry_run, log)
    append_row(run.results, {"kind": "run", "dry_run": dry_run, "deadline_s": deadline_s, "parts": list(parts)})
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="drseg-gpu-check-") as work, _terminated_as_interrupt():
        try:
            selected = [part for part in PARTS if part.name in parts]
            for index, part in enumerate(selected):
                run_part(run, part, Path(work), selected[index + 1 :])
        except KeyboardInterrupt:
            interrupted = True
            run.part_row("run", "interrupted", time.time() - run.started, "stopped by a signal")
    summary = format_summary(read_rows(run.results))
    atomic_write_text(out / SUMMARY_NAME, summary + "\n")
    log(summary)
    log(f"rows: {run.results}; worker output: {out / LOG_NAME}; {time.time() - run.started:.0f} s in all")
    return 130 if interrupted else (1 if run.failed or run.no_cuda else 0)  # no CUDA: nothing was measured
