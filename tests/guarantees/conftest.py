"""Fixtures of the guarantees tests: `check(case)` runs one table row in a fresh folder. The table modules import
guarantees_harness.py, so this folder goes on sys.path (with --import-mode=importlib siblings are not importable)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from guarantees_harness import Case, run_case  # noqa: E402


@pytest.fixture
def check(tmp_path: Path, ddr_root: Path, shards_dir: Path) -> Callable[[Case], object]:
    return lambda case: run_case(case, tmp_path, ddr_root, shards_dir)
