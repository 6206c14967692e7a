"""The loss tests share reference_losses.py (with --import-mode=importlib a test module cannot import a sibling module
unless its folder is on sys.path), and run on one intra-op thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


@pytest.fixture(autouse=True)
def _one_thread():
    """The loss tests use tensors of a few thousand elements: on a loaded 2-core machine intra-op threads only add
    barrier waits (measured 10x slower with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
