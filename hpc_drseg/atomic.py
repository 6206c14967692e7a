"""Atomic writes: a file or folder is built under a temporary name in the target's folder, then renamed over it.

A crash, a full disk or a preempted job never leaves a half-written config, checkpoint, report, image or shard folder
behind: files and folders are fsynced before the rename and the folder after it, so even a node that loses power
shows the old target or the complete new one, never an empty "complete" file.

Temporaries are named `.NAME.HOST.PID.TOKEN.tmp` beside the target NAME (`.old` for a replaced folder moved aside).
A process killed by SIGKILL or a dead node cannot delete its own; the next writer of the same target removes them
with remove_stale_temporaries, and the host and process id in the name tell it exactly whose they are.

Output folders of commands (shards, synthetic trees) get three more guards here: output_path, refuse_overlap and
refuse_non_folder. Standard library only (and hpc_drseg.errors, which is too), so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Optional

from hpc_drseg.errors import ExistsError, InputError

log = logging.getLogger(__name__)

# The host name without dots, so that the temporary name has exactly four dot-separated fields after the target's
# name: `.last.pt.bak.H.1.T.tmp` (a temporary of `last.pt.bak`) then never parses as one of `last.pt`.
HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"
# A temporary younger than this is never removed, whoever made it: a guard for writers whose process id this host
# cannot see (another PID namespace on a shared file system), which would otherwise look dead.
STALE_AFTER_S = 5.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a quota exceeded is a full disk for the user who hit it
DISK_FULL_HINT = "free space or choose another --out"


class NoSpaceError(InputError):
    """The file system (or the user's quota) is full; the previous target is intact."""


# ---------------------------------------------------------------------------------------------- temporaries
def temporary_path(target: str | Path, kind: str = "tmp") -> Path:
    """A fresh temporary name for `target` in its folder, owned by this host and process (`kind`: tmp or old)."""
    target = Path(target)
    return target.parent / f".{target.name}.{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def make_temporary_folder(target: str | Path) -> Path:
    """Creates an empty temporary folder for the tree that will replace `target` (mode from the umask, as the
    target's should be: a tempfile.mkdtemp folder would stay private after the rename)."""
    folder = temporary_path(target)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    return folder


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(target.name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{{8}}\.(?P<kind>tmp|old)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_stale(entry: Path, host: str, pid: int, exclusive: bool) -> bool:
    """Whether a temporary of the target can only be a leftover of a writer that died.

    Never one of this process (a concurrent write of another thread) nor one younger than STALE_AFTER_S. Otherwise:
    made on this host by a process that no longer exists; or, with `exclusive` (the caller holds a lock that keeps
    every other writer of the target away, like the run-folder lock of training), made by anyone. Without the lock a
    temporary of another host is kept: its writer may be alive there, and this host cannot ask.
    """
    if host == HOST_TAG and pid == os.getpid():
        return False
    try:
        age = time.time() - entry.lstat().st_mtime
    except FileNotFoundError:  # its writer finished (renamed or removed it) meanwhile
        return False
    if age < STALE_AFTER_S:
        return False
    if exclusive:
        return True
    return host == HOST_TAG and not _pid_alive(pid)


def remove_stale_temporaries(target: str | Path, exclusive: bool = False) -> list[Path]:
    """Removes the temporaries of `target` that killed writers left behind; returns them.

    Only names of exactly the pattern this module gives temporaries of `target` (`.NAME.HOST.PID.TOKEN.tmp|old`),
    only stale ones (see _is_stale), and a moved-aside `.old` folder only while `target` exists: without it, the
    `.old` may be the only copy of the previous output (a writer killed between its two renames).
    """
    target = Path(target)
    pattern = _temporary_pattern(target)
    try:
        names = sorted(os.listdir(target.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        entry = target.parent / name
        if match["kind"] == "old" and not os.path.lexists(target):
            continue
        if _is_stale(entry, match["host"], int(match["pid"]), exclusive):
            _remove(entry)
            removed.append(entry)
            log.info("removed %s, a temporary of %s left by a killed writer", entry, target)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- syncing
def fsync_folder(folder: str | Path) -> None:
    """Makes a rename or a new entry in `folder` durable (a no-op where the file system cannot sync folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsyncs every file of `folder` (also those other processes wrote) and every folder, deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(root)


# ---------------------------------------------------------------------------------------------- disk full
def disk_full_cause(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind `exc`, if any. torch.save into a handle turns the OSError its write raised
    into "RuntimeError: [enforce fail …] unexpected pos …", with the OSError as the RuntimeError's context."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_gb(path: str | Path) -> float:
    """Free space in GB on the file system of `path` (or of its nearest existing parent); NaN if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free / 1e9
        except OSError:
            continue
    return math.nan


def raise_if_disk_full(exc: BaseException, path: str | Path, hint: str = DISK_FULL_HINT) -> None:
    """Re-raises a full disk behind `exc` as one line naming `path` and the free space; otherwise returns."""
    cause = disk_full_cause(exc)
    if cause is None:
        return
    what = "no space left on device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
    raise NoSpaceError(f"{what} writing {path} ({free_gb(Path(path).parent):.1f} GB free); {hint}") from exc


# --------------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", hint: str = DISK_FULL_HINT) -> Iterator[IO]:
    """`with atomic_writer(p, "wb") as handle: …` — `p` appears, complete and synced, only if the block succeeds.

    A full disk (or quota) raises NoSpaceError naming `p`, ending in `hint`; the previous `p` stays as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # before the rename: a crash must not leave a renamed but empty file
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # absent (it was renamed, or never made) or its folder is unusable
            tmp.unlink()
        raise_if_disk_full(exc, path, hint)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def finite_json(node: Any) -> Any:
    """Strict JSON has no NaN or infinity: such a float (a metric of a lesion absent from a split) becomes null."""
    if isinstance(node, dict):
        return {k: finite_json(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [finite_json(v) for v in node]
    return None if isinstance(node, float) and not math.isfinite(node) else node


def atomic_write_json(path: str | Path, payload: Any, indent: int = 2) -> None:
    """Writes `payload` as strict JSON (non-finite floats → null), atomically, with a final newline."""
    atomic_write_text(path, json.dumps(finite_json(payload), indent=indent) + "\n")


# ------------------------------------------------------------------------------------------------- folders
def replace_folder(tmp: str | Path, out: str | Path) -> None:
    """Moves the finished folder `tmp` to `out` (same parent folder); an existing `out` is moved aside first and
    removed only once the new tree is in place, so a failure leaves either the old or the new tree, never a mix.

    Whether `out` may be replaced at all is the caller's decision (refuse_non_folder and its own check that `out` is
    a previous output of the same command): this function replaces whatever is there.
    """
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)  # every file and folder of the new tree is on disk before it gets the final name
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_folder(out.parent)
        return
    old = temporary_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_folder(out.parent)
    _remove(old)


def output_path(out: str | Path) -> Path:
    """`out` made absolute with the symlinks of its parent folders resolved; `out` itself is not followed, so that a
    symlink there is refused (refuse_non_folder) instead of being written through or replaced."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    return path.parent.resolve() / path.name if path.name else path


def refuse_overlap(out: str | Path, source: str | Path, source_option: str) -> None:
    """Refuses an output that is, contains or lies inside the input `source` (symlinks resolved on both sides):
    replacing it, or writing into it, would destroy or alter the data the command reads."""
    real_out, real_source = (Path(p).expanduser().resolve() for p in (out, source))
    if real_out == real_source:
        relation = "is"
    elif real_source in real_out.parents:
        relation = "lies inside"
    elif real_out in real_source.parents:
        relation = "contains"
    else:
        return
    resolved = ""
    if (str(real_out), str(real_source)) != (str(out), str(source)):
        resolved = f" (resolved: {real_out} and {real_source})"
    raise InputError(
        f"--out {out} {relation} the input {source_option} {source}{resolved}; choose an --out outside the input"
    )


def refuse_non_folder(out: Path) -> None:
    """--overwrite replaces folders only: never a symlink (whatever it points to) or a file."""
    if os.path.islink(out):
        raise ExistsError(
            f"--out {out} is a symlink (to {os.readlink(out)}); --overwrite never replaces one: "
            "remove it yourself or choose another --out"
        )
    if not os.path.isdir(out):
        raise ExistsError(
            f"--out {out} is a file, not a folder; --overwrite never replaces a file: remove it "
            "yourself or choose another --out"
        )


def check_replaceable_output(out: Path, overwrite: bool, not_ours: Callable[[Path], Optional[str]], made: str) -> None:
    """Refuses an existing `out` unless it is `made` (e.g. "a shard folder written by drseg shard"), which the command
    may replace because nothing of the user's is in it, and --overwrite was given. `not_ours(out)` says why a folder
    is not such an output (None: it is). Ownership is checked first, so the error says at once when --overwrite
    would not help."""
    if not os.path.lexists(out):
        return
    refuse_non_folder(out)
    reason = not_ours(out)
    if reason:
        raise ExistsError(
            f"--out {out} exists and is not {made} ({reason}); --overwrite replaces only those: remove it yourself "
            "or choose another --out"
        )
    if not overwrite:
        raise ExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
