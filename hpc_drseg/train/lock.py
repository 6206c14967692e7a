"""The run-folder lock: one training writes a run folder at a time.

Rank 0 of a training holds an exclusive `fcntl.flock` on RUN/.lock from before it writes anything until it ends, and
keeps its host, process id and start time in the file so that a second training started on the same folder can say
whose it is. The kernel drops an flock when its process dies (SIGKILL, OOM, a lost node once its lease expires on a
network file system), so a lock file left by a dead process is simply taken over; its stale content is overwritten.
A clean release empties the file first: a lock file with content but no lock is the trace of a holder that died.
Standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.errors import DrsegError, ExistsError

log = logging.getLogger("hpc_drseg.train")

LOCK_NAME = ".lock"
_HOLDER_BYTES = 4096  # far more than the one JSON line a holder writes
# A file system that has no flock (Lustre mounted without -o flock answers ENOSYS, some NFS set-ups ENOLCK):
# training goes on unlocked with a warning rather than not at all.
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


class RunLock:
    """A held run-folder lock; `release()` ends it (closing the file without it ends it too, so does the process)."""

    def __init__(self, path: Path, fd: Optional[int], previous: Optional[dict[str, Any]]) -> None:
        self.path, self._fd = path, fd
        self.previous = previous
        """What a holder that died without releasing left in the file (None if nothing): host, pid, since."""
        # An unreleased lock (a Trainer dropped without fit(), an exception in between) closes with its object.
        self._closer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Takes the lock of `run_dir` (creating the folder) without waiting; ExistsError naming the holder if another
        process has it."""
        path = lock_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ExistsError(_held_message(Path(run_dir), path, holder)) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise
            log.warning("cannot lock %s (%s): nothing keeps a second training off this run folder", path, exc)
            return cls(path, None, None)
        previous = _read_holder(fd)
        _write_holder(fd)
        if previous:
            log.info("took over %s left by %s (that process ended without releasing it)", path, _describe(previous))
        return cls(path, fd, previous)

    def release(self) -> None:
        """Empties the file (while still holding the lock, so no new holder's content is erased) and unlocks it."""
        if self._closer is None or not self._closer.alive:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # also for forked loader workers sharing the open file
            self._closer()


def _write_holder(fd: int) -> None:
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)
    os.fsync(fd)  # a holder on another node reads it through the file system


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
    """The holder recorded in the lock file; None when it is empty (released, or just created); a dict with the raw
    text under "text" when it is not ours."""
    text = os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"text": text[:200]}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return f"a process that wrote {holder.get('text', holder)!r}"
    return f"PID {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


def _held_message(run_dir: Path, path: Path, holder: Optional[dict[str, Any]]) -> str:
    who = _describe(holder) if holder else "a process that has not yet written its host and PID"
    return (
        f"run folder {run_dir} is being trained by {who}, which holds {path}; two trainings would overwrite each "
        "other's checkpoints and logs: wait for it to end or stop it, or set train.run_dir to another folder"
    )


def lock_on_rank_0(run_dir: Path, is_main: bool, world: int) -> Optional[RunLock]:
    """Rank 0 takes RUN/.lock before anything is written; every rank learns whether it got it, so that a refusal
    stops all ranks at once instead of leaving the others waiting in their next collective."""
    from hpc_drseg.train.runtime import broadcast_from_rank_0

    lock, failure = None, None
    if is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except Exception as exc:  # whatever it is, the other ranks must hear of it
            failure = exc
    report = None if failure is None else (isinstance(failure, DrsegError), str(failure))
    refusal = broadcast_from_rank_0(report, world)
    if failure is not None:
        raise failure
    if refusal is not None:
        user_error, message = refusal
        if user_error:
            raise ExistsError(message)
        raise RuntimeError(f"rank 0 could not lock {run_dir}: {message}")
    return lock
