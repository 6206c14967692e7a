"""Checkpoint files written off the training loop's critical path.

A paper-scale last.pt with Adam's state is ~0.5 GB; written synchronously it stalls every GPU of the run for seconds
each epoch. Training only waits for a snapshot (every tensor copied to host memory, so the next steps cannot change
what gets written); a single background thread then writes it atomically. At most one write is in flight: the next
save waits for the one before, so files are committed in order, and the caller waits for the last one before it
releases the run folder or exits. An error of the write (a full disk) is raised by the next `wait`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

import torch


def snapshot(node: Any) -> Any:
    """`node` with every tensor copied to host memory (also tensors already there: training mutates them in place)."""
    if isinstance(node, torch.Tensor):
        return node.detach().to("cpu", copy=True)
    if isinstance(node, dict):
        return {key: snapshot(value) for key, value in node.items()}
    if isinstance(node, list):
        return [snapshot(value) for value in node]
    if isinstance(node, tuple):
        return tuple(snapshot(value) for value in node)
    return node


class BackgroundWriter:
    """Runs one write at a time in a thread; `wait` joins it and re-raises what it raised."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="drseg-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
