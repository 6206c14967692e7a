"""Checkpoints: atomic writes, RNG capture, and files that load with `torch.load(weights_only=True)`.

Layout: RUN/checkpoints/last.pt (periodic and final) and best.pt (best validation monitor). The weights sit under
"model"; everything else (optimiser, monitor, epoch/step, RNG, resolved config) is plain tensors and numbers. Ranks
> 0 keep their RNG state in rng-rank{N}.pt beside last.pt; under DeepSpeed the partitioned optimiser state lives in
checkpoints/deepspeed/ (written by every rank) instead of under "optimizer".
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from hpc_drseg.atomic import atomic_writer
from hpc_drseg.config import RunConfig, config_to_dict
from hpc_drseg.errors import InputError, MissingError
from hpc_drseg.train.runtime import uses_deepspeed

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hpc_drseg.train.monitor import TrainingMonitor

log = logging.getLogger("hpc_drseg.train")

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def rng_path(run_dir: str | Path, rank: int) -> Path:
    """Ranks > 0 keep their own RNG state beside last.pt (rank 0's is inside it)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"rng-rank{rank}.pt"


def deepspeed_dir(run_dir: str | Path) -> Path:
    """Accelerate's save_state folder for DeepSpeed's per-rank partitions of optimiser (and model) state."""
    return Path(run_dir) / CHECKPOINT_DIR / "deepspeed"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    with atomic_writer(path, "wb") as handle:
        torch.save(obj, handle)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"checkpoint {path} does not exist; train first (drseg train) or check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: say which and what to do
        raise InputError(
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


@dataclass
class Progress:
    """Where the run stands: epoch, step within it, steps overall, one history row per finished epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Checkpointer:
    """Writes and restores a run's checkpoints; the Trainer owns one and hands it the progress at every save.

    It holds the (prepared) model, optimiser and monitor, whose state it reads and restores in place. Collective
    calls (DeepSpeed's save/load, barriers) run on every rank in the same order, so every rank must call
    `save_last` and `resume`; `save_best` writes on rank 0 only.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: RunConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        monitor: TrainingMonitor,
    ) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.model, self.optimizer, self.monitor = model, optimizer, monitor
        self.run_dir = Path(cfg.run_dir)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.deepspeed = uses_deepspeed()

    def state(self, progress: Progress) -> dict[str, Any]:
        """last.pt's content: weights, monitor, progress, resolved config, this rank's RNG, world size, optimiser."""
        model = self.accelerator.unwrap_model(self.model)
        state = {
            "model": {k: v.detach().cpu() for k, v in self.accelerator.get_state_dict(model).items()},
            "monitor": self.monitor.state_dict(),
            "progress": dict(vars(progress)),
            "config": config_to_dict(self.cfg),
            "rng": capture_rng(),
            "world_size": self.world,
        }
        if not self.deepspeed:  # DeepSpeed's optimiser state is partitioned: it goes to deepspeed_dir instead
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save_last(self, progress: Progress) -> None:
        """RUN/checkpoints/last.pt and the per-rank files; every rank must call it (it synchronises them)."""
        state = self.state(progress)
        if self.deepspeed:  # optimiser state is partitioned across ranks: every rank writes its part
            self.accelerator.save_state(str(deepspeed_dir(self.run_dir)))
        if self.rank > 0:
            atomic_torch_save(state["rng"], rng_path(self.run_dir, self.rank))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_torch_save(state, checkpoint_path(self.run_dir, "last"))
        self.accelerator.wait_for_everyone()

    def save_best(self, progress: Progress) -> None:
        """RUN/checkpoints/best.pt from rank 0: last.pt's content without the optimiser (it only ever gets scored)."""
        if self.accelerator.is_main_process:
            state = self.state(progress)
            state.pop("optimizer", None)
            atomic_torch_save(state, checkpoint_path(self.run_dir, "best"))

    def resume(self) -> Optional[Progress]:
        """Restores weights, optimiser, monitor and this rank's RNG from last.pt; its Progress, or None without one."""
        path = checkpoint_path(self.run_dir, "last")
        if not path.is_file():
            return None
        state = load_checkpoint(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        if self.deepspeed:
            self.accelerator.load_state(str(deepspeed_dir(self.run_dir)))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.monitor.load_state_dict(state["monitor"])
        # Last, so nothing above (Accelerate's load_state restores RNGs of its own) overrides the saved streams.
        rng = state["rng"] if self.rank == 0 else load_checkpoint(rng_path(self.run_dir, self.rank))
        restore_rng(rng)
        progress = Progress(**state["progress"])
        if self.accelerator.is_main_process:
            log.info("resumed %s at epoch %d, step %d", path, progress.epoch, progress.global_step)
        return progress
