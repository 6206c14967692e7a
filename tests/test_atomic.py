"""Atomic writes: the target appears complete or not at all; an old target survives a failed rewrite."""

from __future__ import annotations

import pytest

from hpc_drseg.atomic import atomic_write_bytes, atomic_write_text, atomic_writer


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
