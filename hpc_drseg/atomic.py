"""Atomic writes: a file or folder is built under a temporary name in the target's folder, then renamed over it.

A crash, a full disk or a preempted job never leaves a half-written config, checkpoint, report, image or shard folder
behind. Standard library only, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """`with atomic_writer(p, "wb") as handle: …` — `p` appears, complete, only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def replace_folder(tmp: str | Path, out: str | Path) -> None:
    """Moves the finished folder `tmp` to `out` (same parent folder); an existing `out` is moved aside first and
    removed only once the new tree is in place, so a failure leaves either the old or the new tree, never a mix."""
    tmp, out = Path(tmp), Path(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
