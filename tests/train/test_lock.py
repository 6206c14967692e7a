"""The run-folder lock: exclusive while held (also against another process), names its holder, is released cleanly,
and a lock file left by a process that died is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from hpc_drseg.errors import ExistsError
from hpc_drseg.train.lock import RunLock, lock_path

HOLD = """
import sys, time
from hpc_drseg.train.lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_holder_is_recorded_and_a_second_lock_is_refused_naming_it(tmp_path):
    lock = RunLock.acquire(tmp_path / "run")
    holder = json.loads(lock_path(tmp_path / "run").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
    # Another open file description conflicts with the held one, even in the same process.
    with pytest.raises(ExistsError, match=rf"being trained by PID {os.getpid()} on host .* \(since 20"):
        RunLock.acquire(tmp_path / "run")
    lock.release()
    assert lock_path(tmp_path / "run").read_text() == ""  # released cleanly: no holder to report
    again = RunLock.acquire(tmp_path / "run")
    assert again.previous is None
    again.release()
    again.release()  # a second release does nothing


def test_lock_held_by_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExistsError, match=f"PID {holder.pid} on host") as refused:
            RunLock.acquire(tmp_path)
        assert "\n" not in str(refused.value) and "train.run_dir" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock; its record is still in the file and gets replaced.
    lock = RunLock.acquire(tmp_path)
    assert lock.previous["pid"] == holder.pid
    assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_or_foreign_content_is_taken_over(tmp_path, caplog):
    lock_path(tmp_path).write_text("not json at all\n")
    with caplog.at_level("INFO", logger="hpc_drseg.train"):
        lock = RunLock.acquire(tmp_path)
    assert lock.previous == {"text": "not json at all"} and "took over" in caplog.text
    lock.release()


def test_dropping_an_unreleased_lock_frees_it(tmp_path):
    RunLock.acquire(tmp_path)  # not kept: its file closes with the object
    RunLock.acquire(tmp_path).release()
