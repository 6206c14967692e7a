"""Counts host round trips (a device value read back to the CPU, or a host tensor built for the device) made by one
package's own code, e.g. in a training step:

    with count_host_syncs(package="hpc_drseg") as counter:
        run_some_steps()
    assert counter.calls == 0, counter.sites

Counted: Tensor.item / tolist / __bool__ / __float__ / __int__ / cpu / numpy, and torch.tensor. A call counts when the
nearest caller outside torch (frames inside torch are looked through, so `F.something` reading a value on the package's
behalf counts too) is a file under the package's folder. Eager code only: torch.compile would trace into the patches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

TENSOR_METHODS: tuple[str, ...] = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
TORCH_FUNCTIONS: tuple[str, ...] = ("tensor",)
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@dataclasses.dataclass
class HostSyncCounter:
    """`sites` lists each counted call as "path:line name"; `calls` is their number."""

    package_dir: str
    sites: list[str] = dataclasses.field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.sites)


def package_dir(package: str) -> str:
    """The folder of an importable package, with a trailing separator (so "pkg" does not match "pkg_other")."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"count_host_syncs: {package!r} is not an importable package")
    return os.path.abspath(next(iter(spec.submodule_search_locations))) + os.sep


def _package_caller(root: str) -> str | None:
    """The "path:line" of the nearest frame outside torch and this file, when that frame is under `root`."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{path}:{frame.f_lineno}" if path.startswith(root) else None
        frame = frame.f_back
    return None


def _counting(original: Callable[..., Any], name: str, counter: HostSyncCounter, state: threading.local):
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(state, "inside", False):  # a patched call made by another one (torch.tensor → item) counts once
            return original(*args, **kwargs)
        state.inside = True
        try:
            site = _package_caller(counter.package_dir)
            if site is not None:
                counter.sites.append(f"{site} {name}")
            return original(*args, **kwargs)
        finally:
            state.inside = False

    return wrapper


@contextlib.contextmanager
def count_host_syncs(package: str = "hpc_drseg") -> Iterator[HostSyncCounter]:
    """Patches the calls above for the duration of the block (all threads) and restores them after."""
    counter = HostSyncCounter(package_dir(package))
    state = threading.local()
    saved: list[tuple[Any, str, Any, bool]] = []  # (owner, name, original, owner defined it itself)
    targets = [(torch.Tensor, n) for n in TENSOR_METHODS] + [(torch, n) for n in TORCH_FUNCTIONS]
    try:
        for owner, name in targets:
            original = getattr(owner, name)
            saved.append((owner, name, original, name in vars(owner)))
            label = f"Tensor.{name}" if owner is torch.Tensor else f"torch.{name}"
            setattr(owner, name, _counting(original, label, counter, state))
        yield counter
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the C base class's method shows through again
