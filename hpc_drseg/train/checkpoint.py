"""Checkpoints: atomic writes, RNG capture, and files that load with `torch.load(weights_only=True)`.

Layout: RUN/checkpoints/last.pt (periodic and final) and best.pt (best validation monitor). The weights sit under
"model"; everything else (optimiser, monitor, epoch/step, RNG, resolved config) is plain tensors and numbers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_drseg.atomic import atomic_writer

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def rng_path(run_dir: str | Path, rank: int) -> Path:
    """Ranks > 0 keep their own RNG state beside last.pt (rank 0's is inside it)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"rng-rank{rank}.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    with atomic_writer(path, "wb") as handle:
        torch.save(obj, handle)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first (drseg train) or check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: say which and what to do
        raise ValueError(
            f"{path} is not a readable hpc_drseg checkpoint ({exc}); delete it or point elsewhere"
        ) from exc


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step touches, as weights_only-loadable values (NumPy's state becomes plain lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through some serialisers turns them into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
