"""Checkpoints: atomic writes, RNG capture, and files that load with `torch.load(weights_only=True)`.

Layout: RUN/checkpoints/last.pt (periodic and final) and best.pt (best validation monitor). The weights sit under
"model"; everything else (optimiser, monitor, epoch/step, every rank's RNG, world size, resolved config) is plain
tensors and numbers (earlier versions kept ranks > 0's RNG in rng-rank{N}.pt beside last.pt; such checkpoints still
resume). Under DeepSpeed the partitioned optimiser state lives in a folder of its own that last.pt names
(train/deepspeed_state.py) instead of under "optimizer". The weights' keys never depend on how the model was
wrapped (torch.compile, DDP, DeepSpeed), so eval and predict load them into a plain model.

Every load of a run checkpoint checks, in this order, with one line naming the file: that it is one
(`load_run_checkpoint`), that it holds the architecture being built (`check_architecture`), and that its weights fit
that model exactly (`load_model_state`). A resume also compares the checkpoint's config with the new one
(`config_changes`): keys that cannot change what the resumed run computes may change (RESUME_SAFE_KEYS); any other
change needs an explicit `allow_config_change`. Either way the change is recorded in RUN/config_changes.jsonl and
config.yaml is rewritten, so config.yaml always holds what is running.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import torch

from hpc_drseg.atomic import atomic_writer, remove_stale_temporaries
from hpc_drseg.config import ModelConfig, RunConfig, config_from_dict, config_to_dict, save_config
from hpc_drseg.config.checks import ConfigError
from hpc_drseg.errors import InputError, MissingError
from hpc_drseg.models.registry import architecture_differences
from hpc_drseg.train import deepspeed_state
from hpc_drseg.train.runtime import sync_buffers, uses_deepspeed
from hpc_drseg.train.writer import BackgroundWriter, snapshot

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
            f"{path} is not a readable hpc_drseg checkpoint ({_first_line(exc)}); delete it or point elsewhere"
        ) from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """torch.load's errors run over many lines (the weights_only explanation); a user error is one line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:limit]


# ----------------------------------------------------------------------------------------------- loading checks
def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `drseg train` (weights under "model", resolved config under "config"); any other file
    is one line naming it, before anything is built from it."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("config"), dict):
        return state
    raise InputError(
        f"{path} is not a hpc_drseg checkpoint: it holds {_describe(state)}, not the 'model' weights and 'config' "
        "that drseg train writes; give a RUN/checkpoints/best.pt or last.pt"
    )


def _describe(content: Any) -> str:
    if not isinstance(content, dict):
        return f"a {type(content).__name__}"
    keys = [str(key) for key in list(content)[:3]]
    more = ", …" if len(content) > 3 else ""
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        return f"a bare state dict of {len(content)} tensors ({', '.join(keys)}{more})"
    return f"a dict with keys {', '.join(keys) or 'none'}{more}"


def checkpoint_config(state: dict[str, Any], path: str | Path) -> RunConfig:
    """The RunConfig a checkpoint was trained with. Keys this version no longer has are dropped (it could not
    honour them either way) and keys added since take their defaults, so checkpoints of earlier versions still load."""
    known = config_to_dict(RunConfig())
    try:
        return config_from_dict(_known_keys(state["config"], known))
    except ConfigError as exc:
        raise InputError(f"{path}: its config is not valid for this hpc_drseg ({exc})") from exc


def _known_keys(values: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in values.items():
        if key in known:
            nested = isinstance(known[key], dict) and isinstance(value, dict)
            kept[key] = _known_keys(value, known[key]) if nested else value
    return kept


def clean_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as a plain model names them: torch.compile's `_orig_mod.` segments removed (a compiled model's state
    dict has them; checkpoints written before this cleaning hold them too)."""
    return {".".join(part for part in key.split(".") if part != "_orig_mod"): value for key, value in weights.items()}


def check_architecture(saved: ModelConfig, built: ModelConfig, path: str | Path, built_from: str) -> None:
    """InputError listing the model.* fields in which checkpoint `path` differs from the model built from
    `built_from` (a config file, "the config")."""
    differences = architecture_differences(saved, built)
    if differences:
        listed = ", ".join(f"{key}: {show(old)} → {show(new)}" for key, old, new in differences)
        raise InputError(
            f"checkpoint {path} holds another architecture than {built_from} builds ({listed}; checkpoint → config); "
            "use the config the checkpoint was trained with, or a checkpoint of this architecture"
        )


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Loads `weights` strictly into `model` (a plain, unwrapped one); on any missing, unexpected or mis-shaped key
    one line naming the checkpoint, how many of each, and the first three."""
    weights = clean_state_dict(weights)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    misshaped = [
        f"{key} {list(weights[key].shape)} vs {list(shape)}"
        for key, shape in expected.items()
        if key in weights and tuple(weights[key].shape) != shape
    ]
    problems = [(len(keys), what, keys[:3]) for what, keys in [("missing", missing), ("unexpected", unexpected)]]
    problems.append((len(misshaped), "mis-shaped (checkpoint vs model)", misshaped[:3]))
    found = [f"{count} {what} ({', '.join(first)})" for count, what, first in problems if count]
    if found:
        raise InputError(
            f"checkpoint {path} does not fit the {type(model).__name__} its config builds: {'; '.join(found)}; "
            "it was written for another architecture or by an incompatible version"
        )
    model.load_state_dict(weights, strict=True)


# ----------------------------------------------------------------------------------------- config on resume
# Keys whose change cannot change what a resumed run computes (the weights after any given step): they may differ
# between the checkpoint and the resuming config. The change is still recorded (config_changes.jsonl, config.yaml).
RESUME_SAFE_KEYS = frozenset(
    {
        "name",  # a label; the folder is train.run_dir (or runs/<name>, where another name is another run)
        "train.run_dir",  # the same folder reached by another path (moved, relative vs absolute)
        "train.max_epochs",  # where the run ends, not what any epoch computes
        "train.max_steps",  # likewise
        # A stopping rule like max_epochs: the monitor's best value and epochs since it are restored either way.
        "train.early_stop_patience",
        "train.log_every_steps",  # progress bar and TensorBoard period only
        "train.trackers",  # where figures are logged, not what they are
        "train.checkpoint_every_steps",  # how often last.pt is written; resume is exact from any of them
        "train.checkpoint_every_epochs",  # likewise
        "data.num_workers",  # the loader yields the same batches, augmented alike, for any worker count
        "data.test_split",  # read by drseg eval only, never by training
        "eval.split",  # likewise (and by sweeps to pick the reported split)
        "eval.protocol",  # likewise
    }
)
CONFIG_CHANGES = "config_changes.jsonl"


def show(value: Any) -> str:
    """A config value as a user writes it: strings bare, the rest as JSON (0.0001, true, null, [6, 12, 18])."""
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every leaf that differs, in schema order."""
    old, now = _flatten(config_to_dict(saved)), _flatten(config_to_dict(new))
    return {key: (old.get(key), value) for key, value in now.items() if old.get(key) != value}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_config_changes(changes: dict[str, tuple[Any, Any]], path: Path, allow: bool) -> None:
    """InputError listing the changes outside RESUME_SAFE_KEYS (old → new) and the ways out, unless `allow`."""
    forced = {key: values for key, values in changes.items() if key not in RESUME_SAFE_KEYS}
    if not forced or allow:
        return
    run_dir = path.parent.parent
    listed = ", ".join(f"{key}: {show(old)} → {show(new)}" for key, (old, new) in forced.items())
    raise InputError(
        f"resuming {path} with another config: {listed}; such changes alter what the run computes. Resume with the "
        f"run's own values ({run_dir / 'config.yaml'}), train into a new train.run_dir, or pass "
        f"--allow-config-change to go on with the new values (recorded in {run_dir / CONFIG_CHANGES})"
    )


def record_config_changes(cfg: RunConfig, changes: dict[str, tuple[Any, Any]], path: Path, step: int) -> Path:
    """Rewrites RUN/config.yaml with `cfg` and appends the change to RUN/config_changes.jsonl (rank 0 only)."""
    run_dir = path.parent.parent
    save_config(cfg, run_dir / "config.yaml")
    record = {
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "checkpoint": str(path),
        "global_step": step,
        "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()},
        "needed_allow_config_change": sorted(key for key in changes if key not in RESUME_SAFE_KEYS),
    }
    log_path = run_dir / CONFIG_CHANGES
    with open(log_path, "a", encoding="utf-8") as handle:  # one short line, under the run lock: no interleaving
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    listed = ", ".join(f"{key}: {show(old)} → {show(new)}" for key, (old, new) in changes.items())
    log.info("resuming with config changes %s (recorded in %s)", listed, log_path)
    return log_path


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
    """Where the run stands: epoch, step within it, steps overall, one history row per finished epoch, and the
    current epoch's loss sums so far (so a resumed epoch's train/* row covers all its steps, not just the last)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_sums: dict[str, float] = field(default_factory=dict)
    """{loss term: sum over this epoch's steps so far}, averaged across ranks when checkpointed."""
    train_steps: int = 0
    """Steps those sums cover."""


class Resumed(NamedTuple):
    progress: Progress
    changes: dict[str, tuple[Any, Any]]
    """{dotted key: (checkpoint's value, this run's)}: the config changes this resume goes on with."""
    path: Path
    """The checkpoint resumed from."""


class Checkpointer:
    """Writes and restores a run's checkpoints; the Trainer owns one and hands it the progress at every save.

    It holds the (prepared) model, optimiser and monitor, whose state it reads and restores in place. Collective
    calls (DeepSpeed's save/load, barriers) run on every rank in the same order, so every rank must call `save` and
    `resume`.
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
        self.writer = BackgroundWriter()
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Deletes the checkpoint-sized temporaries a killed earlier run left beside the files this rank writes.

        `exclusive`: the trainer holds the run-folder lock, so no other job writes these files and a temporary from
        another node (the usual case: a resumed job lands elsewhere) is as stale as one of a dead local process.
        """
        targets = [checkpoint_path(self.run_dir, "last"), checkpoint_path(self.run_dir, "best")]
        mine = targets if self.accelerator.is_main_process else [rng_path(self.run_dir, self.rank)]
        for target in mine:
            remove_stale_temporaries(target, exclusive=True)
        if self.deepspeed and self.accelerator.is_main_process:
            deepspeed_state.remove_temporaries(self.run_dir / CHECKPOINT_DIR)

    def state(self, progress: Progress) -> dict[str, Any]:
        """last.pt's content: weights, monitor, progress, resolved config, this rank's RNG, world size, optimiser."""
        # Without the compile wrapper, and cleaned besides: the keys are those of a plain model however it was wrapped.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        weights = self.accelerator.get_state_dict(model)
        state = {
            "model": clean_state_dict({k: v.detach().cpu() for k, v in weights.items()}),
            "monitor": self.monitor.state_dict(),
            "progress": dict(vars(progress)),
            "config": config_to_dict(self.cfg),
            "rng": capture_rng(),
            "world_size": self.world,
        }
        if not self.deepspeed:  # DeepSpeed's optimiser state is partitioned: it goes to deepspeed_dir instead
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self, progress: Progress, last: bool = True, best: bool = False) -> None:
        """RUN/checkpoints/last.pt (with DeepSpeed's partitions) and/or best.pt. Every rank must call it with the same
        arguments (it synchronises them); rank 0 writes the files in the background (train/writer.py) from a
        snapshot taken here, so training goes on while they are written. `wait` for them before exiting."""
        self.writer.wait()  # the previous commit is complete before anything of this one is written
        # The files hold rank 0's BatchNorm statistics; every rank goes on with them, as a resumed run would.
        sync_buffers(self.accelerator, self.model)
        # Every rank's RNG goes into last.pt itself: in a file of its own, a kill between the two writes would
        # resume a rank with the RNG of another step.
        rngs = self._all_ranks(capture_rng()) if last else None
        folder = self.run_dir / CHECKPOINT_DIR
        deepspeed_name = None
        if self.deepspeed and last:  # optimiser state is partitioned across ranks: every rank writes its part
            deepspeed_name = deepspeed_state.save(self.accelerator, folder, progress.global_step)
        if self.accelerator.is_main_process:
            state = snapshot(self.state(progress))
            state.update(rng_ranks=rngs, **{deepspeed_state.DEEPSPEED_KEY: deepspeed_name})
            self.writer.submit(lambda: self._commit(state, last, best))

    def save_last(self, progress: Progress) -> None:
        self.save(progress, last=True)

    def wait(self) -> None:
        """Until the files of the last save are committed (raises what their write raised)."""
        self.writer.wait()

    def _commit(self, state: dict[str, Any], last: bool, best: bool) -> None:
        """Rank 0, in the background: last.pt, then what it made stale, then best.pt (last.pt's content without the
        optimiser and the other ranks' RNG: it only ever gets scored)."""
        folder = self.run_dir / CHECKPOINT_DIR
        if last:
            atomic_torch_save(state, checkpoint_path(self.run_dir, "last"))
            for old in folder.glob("rng-rank*.pt"):  # the earlier layout, now stale
                old.unlink(missing_ok=True)
            if state[deepspeed_state.DEEPSPEED_KEY]:  # only now that last.pt names the new folder
                deepspeed_state.remove_others(folder, keep=state[deepspeed_state.DEEPSPEED_KEY])
        if best:
            dropped = ("optimizer", "rng_ranks", deepspeed_state.DEEPSPEED_KEY)
            scored = {k: v for k, v in state.items() if k not in dropped}
            atomic_torch_save(scored, checkpoint_path(self.run_dir, "best"))

    def _all_ranks(self, value: Any) -> list[Any]:
        """[rank 0's value, rank 1's, …] on every rank (a collective)."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def resume(self, allow_config_change: bool = False, allow_world_size_change: bool = False) -> Optional[Resumed]:
        """Restores weights, optimiser, monitor and this rank's RNG from last.pt; None without one.

        Before restoring anything: that every rank read the same last.pt (`_check_same_checkpoint`), the checkpoint's
        config against this run's (`check_config_changes`), its architecture and weights against the model built
        here, and its world size (`_check_world_size`). Every rank checks alike, so all stop together.
        """
        path = checkpoint_path(self.run_dir, "last")
        state = load_run_checkpoint(path) if path.is_file() else None
        self._check_same_checkpoint(state, path)
        if state is None:
            return None
        saved = checkpoint_config(state, path)
        changes = config_changes(saved, self.cfg)
        check_config_changes(changes, path, allow_config_change)
        check_architecture(saved.model, self.cfg.model, path, "the config")
        world_changed = self._check_world_size(state, path, allow_world_size_change)
        load_model_state(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), state["model"], path)
        if self.deepspeed:
            deepspeed_state.load(self.accelerator, self.run_dir / CHECKPOINT_DIR, state, path)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.monitor.load_state_dict(state["monitor"])
        progress = Progress(**state["progress"])
        if world_changed:
            progress = next_epoch_boundary(progress)
        else:
            # Last, so nothing above (Accelerate's load_state restores RNGs of its own) overrides the saved streams.
            restore_rng(self._rank_rng(state, path))
        if self.accelerator.is_main_process:
            log.info("resumed %s at epoch %d, step %d", path, progress.epoch, progress.global_step)
        return Resumed(progress, changes, path)

    def _check_same_checkpoint(self, state: Optional[dict[str, Any]], path: Path) -> None:
        """Each rank reads last.pt through its own node's view of the file system; a stale view would resume ranks
        at different steps, and they would then deadlock or silently train out of step. Rank 0's is the run's."""
        mine = None if state is None else tuple(int(state["progress"][key]) for key in _POSITION)
        views = self._all_ranks(mine)
        differing = [rank for rank, view in enumerate(views) if view != views[0]]
        if differing:
            listed = "; ".join(f"rank {rank}: {_position(views[rank])}" for rank in [0, *differing])
            raise InputError(
                f"the ranks read different {path} ({listed}); a node sees a stale copy of the run folder: make "
                f"{path.parent} the same on every node (a shared file system, synced) and run again"
            )

    def _check_world_size(self, state: dict[str, Any], path: Path, allow: bool) -> bool:
        """True when the run goes on with another number of ranks (allowed); InputError when not allowed."""
        saved = int(state.get("world_size", self.world))
        if saved == self.world:
            return False
        if self.deepspeed:  # ZeRO's partitions of the optimiser state are per rank
            raise InputError(
                f"{path} was written by {saved} ranks but this run has {self.world}; resume with {saved} ranks "
                "(DeepSpeed's partitioned optimiser state cannot be split over another number of ranks)"
            )
        if not allow:
            raise InputError(
                f"{path} was written by {saved} ranks but this run has {self.world}; resume with {saved} ranks for "
                f"an exact resume (data and RNG streams are per rank), or pass --allow-world-size-change to go on "
                f"with {self.world} from the next epoch boundary (no longer bit-exact)"
            )
        log.warning(
            "resuming %s, written by %d ranks, with %d (--allow-world-size-change): going on from the next epoch "
            "boundary with fresh per-rank RNG streams; the run is no longer bit-exact",
            path,
            saved,
            self.world,
        )
        return True

    def _rank_rng(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """This rank's RNG state: inside last.pt, or in rng-rank<N>.pt beside a last.pt of the earlier layout."""
        if "rng_ranks" in state:
            return state["rng_ranks"][self.rank]
        if self.rank == 0:
            return state["rng"]
        return load_checkpoint(rng_path(self.run_dir, self.rank))


_POSITION = ("epoch", "step_in_epoch", "global_step")


def _position(view: Optional[tuple[int, ...]]) -> str:
    if view is None:
        return "no checkpoint"
    epoch, step_in_epoch, global_step = view
    return f"step {global_step} (epoch {epoch}, step {step_in_epoch} in it)"


def next_epoch_boundary(progress: Progress) -> Progress:
    """Where a run resumed with another world size goes on: an epoch's batches are split by rank, so a part-done
    epoch cannot be finished with another number of ranks; its rest is skipped (it gets no history row)."""
    if progress.step_in_epoch == 0:
        return progress
    log.warning(
        "epoch %d was interrupted after %d steps; it is not finished with the new world size (no validation row)",
        progress.epoch,
        progress.step_in_epoch,
    )
    return replace(progress, epoch=progress.epoch + 1, step_in_epoch=0, train_sums={}, train_steps=0)
