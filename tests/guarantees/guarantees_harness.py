"""The table-driven harness of the guarantees tests: a Case is a `drseg` command line with files prepared for it,
the exit status and message it must give, and the paths it must leave exactly as they were.

Placeholders in argv, paths and fragments: {tmp} (a fresh folder for the case), {ddr} (a copy of the synthetic DDR
tree), {shards} (a copy of its shards), {repo} (the repository). A case's `setup(paths)` edits the copies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    """`drseg` arguments (no program name)."""
    exit: int
    """Expected exit status: 0 success, 2 a user error reported in one line."""
    message: str = ""
    """A fragment that must appear in stderr (user errors: naming the file, key or value)."""
    untouched: tuple[str, ...] = ()
    """Files or folders whose names and contents must be the same afterwards."""
    setup: Callable[[Mapping[str, Path]], None] | None = None
    needs: tuple[str, ...] = ()
    """Which of "ddr" and "shards" the case copies (copies cost time)."""
    absent: tuple[str, ...] = ()
    """Paths that must not exist afterwards (no half-written output)."""
    timeout_s: float = 120.0
    env: Mapping[str, str] = field(default_factory=dict)


def fingerprint(path: Path) -> str:
    """Hash of a file, or of a folder's relative names, modes and contents; 'absent' when it does not exist."""
    if not os.path.lexists(path):
        return "absent"
    digest = hashlib.sha256()
    entries = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for entry in entries:
        digest.update(str(entry.relative_to(path) if entry != path else ".").encode())
        if entry.is_symlink():
            digest.update(b"link:" + os.readlink(entry).encode())
        elif entry.is_file():
            digest.update(entry.read_bytes())
    return digest.hexdigest()


def prepare(case: Case, tmp: Path, ddr_root: Path, shards_dir: Path) -> dict[str, Path]:
    paths = {"tmp": tmp, "repo": REPO}
    if "ddr" in case.needs:
        paths["ddr"] = Path(shutil.copytree(ddr_root, tmp / "DDR-dataset", symlinks=True))
    if "shards" in case.needs:
        paths["shards"] = Path(shutil.copytree(shards_dir, tmp / "shards", symlinks=True))
    if case.setup is not None:
        case.setup(paths)
    return paths


def fill(text: str, paths: Mapping[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


def run_case(case: Case, tmp: Path, ddr_root: Path, shards_dir: Path) -> subprocess.CompletedProcess:
    """Runs the case as a user would (its own process, `python -m hpc_drseg`) and checks all its promises."""
    paths = prepare(case, tmp, ddr_root, shards_dir)
    watched = {p: fingerprint(Path(fill(p, paths))) for p in case.untouched}
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **case.env}
    argv = [fill(arg, paths) for arg in case.argv]
    done = subprocess.run(
        [sys.executable, "-m", "hpc_drseg", *argv],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=case.timeout_s,
    )
    report = (
        f"drseg {' '.join(argv)}\nexit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}"
    )
    assert done.returncode == case.exit, report
    if case.exit == 2:
        assert "Traceback" not in done.stderr, report
        assert len(done.stderr.strip().splitlines()) == 1, f"a user error is one line\n{report}"
    assert fill(case.message, paths) in done.stderr, report
    for pattern, before in watched.items():
        assert fingerprint(Path(fill(pattern, paths))) == before, f"{pattern} changed\n{report}"
    for pattern in case.absent:
        assert not os.path.lexists(fill(pattern, paths)), f"{pattern} exists\n{report}"
    return done
