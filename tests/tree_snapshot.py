"""What a folder holds, for tests that promise to leave a user's files untouched: `snapshot(path)` before and after
must be equal."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(path: Path) -> dict[str, bytes]:
    """Relative name → content (link target for a symlink, b"<dir>" for a folder) of `path` and all below it."""
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    result = {}
    for entry in entries:
        name = str(entry.relative_to(path))
        if entry.is_symlink():
            result[name] = b"link:" + os.readlink(entry).encode()
        elif entry.is_dir():
            result[name] = b"<dir>"
        elif entry.exists():
            result[name] = entry.read_bytes()
    return result
