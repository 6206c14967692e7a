"""Atomic writes: the target appears complete (and synced) or not at all; an old target survives a failed rewrite, a
full disk is one line naming the file; temporaries of killed writers are removed by the next writer of the same
target, and nothing else is; output folders never overlap their input nor replace a file or symlink."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hpc_drseg import atomic
from hpc_drseg.atomic import (
    HOST_TAG,
    NoSpaceError,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    make_temporary_folder,
    output_path,
    refuse_non_folder,
    refuse_overlap,
    remove_stale_temporaries,
    replace_folder,
    temporary_path,
)
from hpc_drseg.errors import ExistsError, InputError

# A writer killed by SIGKILL in the middle of a write: what a preempted job or the OOM killer leaves behind.
KILLED_WRITER = """
import os, signal, sys
from hpc_drseg.atomic import atomic_writer
with atomic_writer(sys.argv[1], "wb") as handle:
    handle.write(b"x" * 65536)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writes_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(target, "hello")
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert target.read_text() == "hello" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_failure_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "new.bin", "wb"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- syncing
@pytest.fixture
def sync_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records ("fsync", path) and ("replace", destination) in the order atomic.py calls them."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, destination) -> None:
        events.append(("replace", str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return events


def test_file_is_synced_before_the_rename_and_its_folder_after(tmp_path, sync_log):
    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"weights")
    (kind0, synced), *rest = sync_log
    assert kind0 == "fsync" and Path(synced).parent == tmp_path and Path(synced).name.startswith(".last.pt.")
    assert rest == [("replace", str(target)), ("fsync", str(tmp_path))]


def test_replace_folder_syncs_every_file_and_folder_before_the_rename(tmp_path, sync_log):
    out = tmp_path / "shards"
    tmp = make_temporary_folder(out)
    (tmp / "train-000000.tar").write_bytes(b"tar")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "manifest.json").write_text("{}")
    replace_folder(tmp, out)
    rename = sync_log.index(("replace", str(out)))
    synced_before = {Path(path).relative_to(tmp) for kind, path in sync_log[:rename] if path.startswith(str(tmp))}
    assert synced_before == {Path("train-000000.tar"), Path("sub/manifest.json"), Path("sub"), Path(".")}
    assert sync_log[rename + 1 :] == [("fsync", str(tmp_path))]


# ---------------------------------------------------------------------------------------------- disk full
def _full_after(handle, allowed: int, code: int = errno.ENOSPC) -> None:
    """Makes `handle.write` fail as a full disk once `allowed` bytes were written."""
    real_write, written = handle.write, [0]

    def write(data) -> int:
        if written[0] + len(data) > allowed:
            raise OSError(code, os.strerror(code))
        written[0] += len(data)
        return real_write(data)

    handle.write = write


def _disk_full_message(path: Path, what: str = "no space left on device") -> str:
    return rf"^{what} writing {re.escape(str(path))} \([0-9.]+ GB free\); free space or choose another --out$"


def test_disk_full_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(NoSpaceError, match=_disk_full_message(target)) as caught:
        with atomic_writer(target, "wb") as handle:
            _full_after(handle, 10)
            handle.write(b"0123456789")
            handle.write(b"and more")
    assert isinstance(caught.value, InputError)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_quota_exceeded_reads_as_such(tmp_path):
    with pytest.raises(NoSpaceError, match=_disk_full_message(tmp_path / "a.txt", "disk quota exceeded")):
        with atomic_writer(tmp_path / "a.txt", "wb") as handle:
            _full_after(handle, 0, errno.EDQUOT)
            handle.write(b"x")
    assert list(tmp_path.iterdir()) == []


def test_torch_save_on_a_full_disk_is_no_enforce_fail_traceback(tmp_path):
    """torch.save turns the OSError of the handle's write into "RuntimeError: [enforce fail …] unexpected pos"."""
    target = tmp_path / "last.pt"
    torch.save({"epoch": 1}, target)
    before = target.read_bytes()
    with pytest.raises(NoSpaceError, match=_disk_full_message(target)):
        with atomic_writer(target, "wb") as handle:
            _full_after(handle, 100)
            torch.save({"weights": torch.zeros(10_000)}, handle)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_other_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(OSError, match="Input/output error") as caught:
        with atomic_writer(tmp_path / "a.bin", "wb") as handle:
            _full_after(handle, 0, errno.EIO)
            handle.write(b"x")
    assert not isinstance(caught.value, NoSpaceError)


# -------------------------------------------------------------------------------------------- temporaries
def _age(path: Path, seconds: float = 600.0) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _user_file(path: Path) -> Path:
    path.write_text("the user's")
    return _age(path)


def _temporary(target: Path, host: str, pid: int, kind: str = "tmp", folder: bool = False) -> Path:
    """An aged temporary of `target` as `host`:`pid` names them (a folder as replace_folder's, or a file)."""
    path = target.parent / f".{target.name}.{host}.{pid}.{'4567cdef' if folder else '0123abcd'}.{kind}"
    if folder:
        path.mkdir()
        (path / "train-000000.tar").write_bytes(b"x")
    else:
        path.write_bytes(b"x" * 1000)
    return _age(path)


def test_temporary_names_carry_host_and_process(tmp_path):
    name = temporary_path(tmp_path / "last.pt").name
    assert re.fullmatch(rf"\.last\.pt\.{re.escape(HOST_TAG)}\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", name)
    assert "." not in HOST_TAG


def test_killed_writer_leaves_a_temporary_that_the_next_writer_removes(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous checkpoint")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert leftover.stat().st_size == 65536 and target.read_bytes() == b"previous checkpoint"
    assert remove_stale_temporaries(target) == []  # seconds old: a writer this host cannot see may still own it
    _age(leftover)
    assert remove_stale_temporaries(target) == [leftover]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    target, dead = tmp_path / "last.pt", _dead_pid()
    stale = [_temporary(target, HOST_TAG, dead), _temporary(target, HOST_TAG, dead, folder=True)]
    kept = [
        _temporary(target, HOST_TAG, os.getpid()),  # this process: a concurrent write of another thread
        _temporary(target, "otherhost", dead),  # another node: its writer may be alive there
        _temporary(tmp_path / "last.pt.bak", HOST_TAG, dead),  # another target with a longer name
        _temporary(tmp_path / "best.pt", HOST_TAG, dead),
        _user_file(tmp_path / ".last.pt.notes.tmp"),
        _user_file(tmp_path / f"last.pt.{HOST_TAG}.{dead}.0123abcd.tmp"),  # no leading dot: not ours
        _user_file(tmp_path / f".last.pt.{HOST_TAG}.{dead}.0123abcd.tmp.keep"),
        _user_file(tmp_path / ".last.pt.a1b2c3d4.tmp"),  # mkstemp style: no owner to check
    ]
    young = target.parent / f".{target.name}.{HOST_TAG}.{dead}.fedcba98.tmp"
    young.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(target)) == sorted(stale)
    assert all(p.exists() for p in [*kept, young])


def test_a_live_writer_keeps_its_temporary(tmp_path):
    target = tmp_path / "last.pt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _temporary(target, HOST_TAG, sleeper.pid)
        assert remove_stale_temporaries(target) == [] and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [live]


def test_exclusive_writer_removes_temporaries_of_other_hosts_too(tmp_path):
    target = tmp_path / "last.pt"
    other = _temporary(target, "node17", 4242)
    mine = _temporary(target, HOST_TAG, os.getpid())
    assert remove_stale_temporaries(target, exclusive=True) == [other]
    assert mine.exists()


def test_a_moved_aside_old_folder_is_kept_while_it_may_be_the_only_copy(tmp_path):
    out, dead = tmp_path / "shards", _dead_pid()
    old = _temporary(out, HOST_TAG, dead, kind="old", folder=True)
    assert remove_stale_temporaries(out) == [] and old.exists()  # killed between its two renames: keep it
    out.mkdir()
    assert remove_stale_temporaries(out) == [old]


def test_missing_folder_has_no_temporaries(tmp_path):
    assert remove_stale_temporaries(tmp_path / "absent" / "last.pt") == []


def test_checkpointer_removes_stale_checkpoint_temporaries_at_start(tmp_path):
    from hpc_drseg.config import load_config
    from hpc_drseg.train.checkpoint import Checkpointer, checkpoint_path, rng_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last, best = checkpoint_path(run, "last"), checkpoint_path(run, "best")
    killed = [_temporary(last, "node03", 4242), _temporary(best, HOST_TAG, _dead_pid())]
    other_rank = _temporary(rng_path(run, 1), "node04", 4243)
    cfg = load_config(None, [f"train.run_dir={run}"])
    rank0 = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True)
    Checkpointer(rank0, cfg, torch.nn.Linear(1, 1), None, None)
    assert not any(p.exists() for p in killed) and other_rank.exists()  # rank 1 cleans its own file
    rank1 = SimpleNamespace(process_index=1, num_processes=2, is_main_process=False)
    Checkpointer(rank1, cfg, torch.nn.Linear(1, 1), None, None)
    assert not other_rank.exists()


# ------------------------------------------------------------------------------------------- output guards
def test_output_path_resolves_parents_but_not_the_output_itself(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "link").symlink_to(tmp_path)
    assert output_path(tmp_path / "via" / "out") == tmp_path / "real" / "out"
    assert output_path(tmp_path / "via" / "link") == tmp_path / "real" / "link"


@pytest.mark.parametrize(
    ("out", "relation"),
    [("ddr", "is"), ("ddr/shards", "lies inside"), (".", "contains"), ("link", "is"), ("link/x", "lies inside")],
)
def test_refuse_overlap_names_both_paths(tmp_path, out: str, relation: str):
    (tmp_path / "ddr").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ddr")
    given = tmp_path / out
    with pytest.raises(InputError, match=rf"^--out {re.escape(str(given))} {relation} the input --ddr-root "):
        refuse_overlap(given, tmp_path / "ddr", "--ddr-root")
    refuse_overlap(tmp_path / "elsewhere", tmp_path / "ddr", "--ddr-root")
    refuse_overlap(tmp_path / "ddr-2", tmp_path / "ddr", "--ddr-root")  # a name prefix is no overlap


def test_refuse_non_folder(tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    with pytest.raises(ExistsError, match="is a file, not a folder"):
        refuse_non_folder(tmp_path / "file.txt")
    with pytest.raises(ExistsError, match=rf"is a symlink \(to {re.escape(str(tmp_path / 'folder'))}\)"):
        refuse_non_folder(tmp_path / "link")
    refuse_non_folder(tmp_path / "folder")
