"""The training loop: one code path for CPU, one GPU, DDP (accelerate launch / torchrun / srun) and DeepSpeed.

Paper optimisation (Jithesh et al., ICMLA 2025): Adam 1e-4, ReduceLROnPlateau (0.5, 5), early stopping (15), batch 4.
Re-running on an existing run directory resumes it exactly: weights, optimiser, monitor, epoch/step, RNG and the
position in the epoch's deterministic data stream (the Checkpointer of train/checkpoint.py saves and restores them).
A run folder is never shared or silently reinterpreted: rank 0 holds its lock (train/lock.py) while training, a
resume with a config that changes what the run computes stops unless allowed (and is recorded when it goes on), and
inputs that would fail only after an epoch of compute (validation split, shard files) are checked before step 0.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hpc_drseg.config import RunConfig, save_config
from hpc_drseg.data.manifest import read_manifest, split_info
from hpc_drseg.data.normalize import normalize
from hpc_drseg.data.pipeline import Batch, build_run_batches, steps_per_epoch
from hpc_drseg.losses import build_loss
from hpc_drseg.models import build_model, check_initialisation, split_output
from hpc_drseg.train.checkpoint import Checkpointer, Progress, record_config_changes
from hpc_drseg.train.lock import lock_on_rank_0
from hpc_drseg.train.logs import RunLogger
from hpc_drseg.train.monitor import BestTracker, LossWatch, LRPlateau, TrainingMonitor
from hpc_drseg.train.preflight import check_image_size, check_split
from hpc_drseg.train.runtime import (
    build_accelerator,
    build_optimizer,
    check_replicas,
    configure_deepspeed,
    model_input_dtype,
    seed_everything,
    set_debug_mode,
    shut_down,
    sync_buffers,
    tune_cuda,
    uses_deepspeed,
)
from hpc_drseg.train.signals import EXIT_RESUMABLE, StopFlag, die_with_launcher
from hpc_drseg.train.trackers import build_trackers
from hpc_drseg.train.validate import collect_metrics, eval_loader, flatten_results

__all__ = ["EpochStats", "Progress", "Stop", "StopReason", "TrainResult", "Trainer", "train"]

log = logging.getLogger("hpc_drseg.train")

DEBUG_SUBSET_BATCHES = 4  # train.debug without data.subset: this many batches per rank per epoch


class StopReason(enum.Enum):
    """Why training ended. Only SIGNAL leaves work undone: its exit status asks the scheduler to run it again."""

    FINISHED = "finished"
    EARLY_STOPPING = "early_stopping"
    MAX_STEPS = "max_steps"
    SIGNAL = "signal"

    @property
    def exit_code(self) -> int:
        return EXIT_RESUMABLE if self is StopReason.SIGNAL else 0


@dataclass(frozen=True)
class Stop:
    """A StopReason and the line `drseg train` prints for it (slurm/train.sh logs and the tests read these)."""

    reason: StopReason
    message: str

    @classmethod
    def finished(cls, epochs: int) -> Stop:
        return cls(StopReason.FINISHED, f"finished {epochs} epochs")

    @classmethod
    def early_stopping(cls, monitor: str, patience: int) -> Stop:
        return cls(StopReason.EARLY_STOPPING, f"early stopping: no improvement of {monitor} for {patience} epochs")

    @classmethod
    def max_steps(cls, max_steps: int) -> Stop:
        return cls(StopReason.MAX_STEPS, f"reached train.max_steps={max_steps}")

    @classmethod
    def signal(cls, name: Optional[str]) -> Stop:
        # A rank that did not receive the signal itself only knows that another one did.
        return cls(StopReason.SIGNAL, f"stopped by {name or 'a signal on another rank'}")


@dataclass(frozen=True)
class EpochStats:
    """What one `run_epoch` call measured, for the epoch's history row."""

    train: dict[str, float]
    """"train/<loss term>": mean over this call's steps, averaged across ranks."""
    img_per_s: float
    """Images per second over all ranks, data loading included."""
    started: float
    """time.perf_counter() when the epoch started (its row's epoch_time_s includes validation)."""
    stop: Optional[Stop]
    """Set when a signal or train.max_steps ended the epoch early."""


@dataclass
class TrainResult:
    run_dir: Path
    exit_code: int
    reason: str
    """The human-readable Stop message, e.g. "finished 2 epochs", "stopped by SIGTERM"."""
    progress: Progress
    stop: StopReason


class Trainer:
    """Builds the model, optimiser and monitor from `cfg` and writes nothing: `fit()` takes the run folder (its lock,
    then resume or a fresh config.yaml) and trains. `allow_config_change`: resume last.pt even with a config that
    changes what the run computes (see train/checkpoint.py). `stop`: the flag train() installed before building
    anything (fit() installs it if nobody did). `allow_world_size_change`: resume last.pt with another number of
    ranks, from the next epoch boundary and no longer bit-exact."""

    def __init__(
        self,
        cfg: RunConfig,
        allow_config_change: bool = False,
        stop: Optional[StopFlag] = None,
        allow_world_size_change: bool = False,
    ) -> None:
        check_initialisation(cfg.model)  # before anything slow: a missing weights file is found in a second
        self.cfg, self.allow_config_change = cfg, allow_config_change
        self.allow_world_size_change = allow_world_size_change
        self.stop = stop if stop is not None else StopFlag()
        self.run_dir = cfg.run_dir
        self.accelerator = build_accelerator(cfg.train, log_with=build_trackers(cfg))  # a missing package: error now
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.manifest = read_manifest(cfg.data.shards)
        check_image_size(cfg, self.manifest)
        check_split(cfg, self.manifest, cfg.data.train_split, "data.train_split")
        self.progress = Progress()
        self._sums: dict[str, torch.Tensor] = {}  # this epoch's loss sums on this rank (run_epoch)
        self._steps_done = 0
        self._build_objects()
        self.loss_watch = LossWatch(self.rank)
        self.checkpointer: Optional[Checkpointer] = None  # made by fit() once the run folder is locked
        self.logger = RunLogger(self.run_dir, enabled=False, history=self.progress.history)  # fit() opens the real one

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_objects(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.train.debug:
            set_debug_mode()
        # Adam's second moments of tiny gradients underflow into denormals, which run ~100x slower on x86 CPUs.
        torch.set_flush_denormal(True)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        tune_cuda(cfg.train)
        model = build_model(cfg.model)
        if acc.device.type == "cuda" and self.world > 1 and cfg.train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # gloo/CPU has no SyncBatchNorm kernels
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, acc.device)
        configure_deepspeed(acc, cfg.train)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.forward = self._compiled_forward()
        self.loss_fn = build_loss(cfg.loss).to(acc.device)
        self.train_loss = self._compiled_loss()
        self.monitor = TrainingMonitor(
            best=BestTracker(cfg.train.monitor_mode, cfg.train.early_stop_patience),
            plateau=LRPlateau(
                cfg.optim.plateau_mode,
                factor=cfg.optim.plateau_factor,
                patience=cfg.optim.plateau_patience,
                min_scale=cfg.optim.min_lr / cfg.optim.lr,
            ),
            monitor=cfg.train.monitor,
            plateau_monitor=cfg.optim.plateau_monitor,
        )
        self.steps = self._steps_per_epoch()
        # One training stream for the run: loader workers (or the device-resident set) serve epoch after epoch.
        self.train_batches = build_run_batches(cfg.data, cfg.train, acc.device, self.rank, self.world, self.steps)
        seed_everything(cfg.train.seed * 1000 + self.rank)  # dropout differs per rank, reproducibly

    def _compiled_forward(self) -> torch.nn.Module:
        """The module training steps call. Compiled after DDP wrapping, so Dynamo splits the graph at DDP's bucket
        boundaries and gradient communication overlaps backward; validation and checkpoints use the eager module
        (no recompilation for eval mode or other batch sizes). DeepSpeed's engine is not traceable: its inner
        module is compiled in place instead."""
        cfg = self.cfg.train
        if not cfg.compile or cfg.debug:
            return self.model
        if uses_deepspeed():
            self.model.module.compile(mode=cfg.compile_mode)
            return self.model
        return torch.compile(self.model, mode=cfg.compile_mode)

    def _compiled_loss(self) -> Any:
        """The loss of training steps: with train.compile, one graph of its own (its ~70 small full-resolution ops
        fused); validation keeps the eager one, whose other batch sizes would only cause recompiles."""
        cfg = self.cfg.train
        if not cfg.compile or cfg.debug:
            return self.loss_fn
        return torch.compile(self.loss_fn, fullgraph=True, mode=cfg.compile_mode)

    def _steps_per_epoch(self) -> int:
        """Batches per rank per epoch: train.steps_per_epoch if set (the loader then cuts the epoch's permutation
        short or goes on into further ones), else one padded pass over the images (capped in debug runs)."""
        cfg = self.cfg
        if cfg.train.steps_per_epoch:
            return cfg.train.steps_per_epoch
        images = split_info(self.manifest, cfg.data.train_split, cfg.data.shards)["images"]
        if cfg.data.subset:
            images = min(images, cfg.data.subset)
        steps = steps_per_epoch(images, cfg.train.batch_size, self.world)
        if cfg.train.debug and not cfg.data.subset:
            steps = min(steps, DEBUG_SUBSET_BATCHES)
        return steps

    # ------------------------------------------------------------------------------------------------ steps
    def _device_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 channels-last batch (pinned on CUDA, or already on the device) copied as it is; normalisation,
        cast and memory format in one pass on the device (data/normalize.py)."""
        device, channels_last = self.accelerator.device, self.cfg.train.channels_last
        image = normalize(batch.image.to(device, non_blocking=True), model_input_dtype(self.model), channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return image, batch.mask.to(device, non_blocking=True).contiguous(memory_format=layout)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        image, mask = self._device_batch(batch)
        if self.cfg.train.debug and self.progress.global_step == 0:
            log.info("debug: image %s %s, mask %s %s", tuple(image.shape), image.dtype, tuple(mask.shape), mask.dtype)
        with self.accelerator.accumulate(self.model):
            logits, aux = split_output(self.forward(image))
            loss, terms = self.train_loss(logits, mask, aux)
            self.loss_watch.record(loss, self.progress.global_step, batch.ids)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    def _stop_requested(self, now: bool = False) -> bool:
        """All ranks agree, so they stop after the same step. Agreeing takes a collective and a host round trip, so
        ranks ask each other only once per train.log_every_steps (or `now`); a lone process asks its flag every step."""
        if self.world == 1:
            return self.stop.requested
        if not now and self.progress.global_step % self.cfg.train.log_every_steps:
            return False
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # ------------------------------------------------------------------------------------------------ epochs
    def _train_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's rest of the epoch, from progress.step_in_epoch on, out of the run's one training stream. An
        epoch's batches and their augmentation depend only on (seed, epoch, rank, batch), so a resumed run starts the
        stream at its step and goes on exactly where the interrupted run was."""
        return self.train_batches.epoch(epoch, self.progress.step_in_epoch)

    @contextlib.contextmanager
    def _batches_and_bar(self, epoch: int) -> Iterator[tuple[Iterable[Batch], Any]]:
        """This rank's rest of the epoch and its progress bar, both closed on the way out. The bar appears once the
        first batch is read: a shard that disagrees with its manifest is then one line of its own, not one under a
        bar."""
        with contextlib.closing(iter(self._train_batches(epoch))) as batches:
            first = next(batches, None)
            bar = self.logger.progress_bar(self.steps, self.progress.step_in_epoch, f"epoch {epoch}")
            try:
                yield itertools.chain([] if first is None else [first], batches), bar
            finally:
                bar.close()
                # The stream's workers stay only while the run goes on into the next epoch.
                if self.progress.step_in_epoch < self.steps or epoch + 1 >= self.cfg.train.max_epochs:
                    self.train_batches.close()

    def run_epoch(self, epoch: int) -> EpochStats:
        """Trains the rest of one epoch (from progress.step_in_epoch); stops early on a signal or train.max_steps."""
        device = self.accelerator.device
        # A resumed epoch goes on from the sums its checkpoint holds, so its train/* row covers every step.
        self._sums = {k: torch.tensor(v, device=device) for k, v in self.progress.train_sums.items()}
        self._steps_done = self.progress.train_steps
        started, images, stop = time.perf_counter(), 0, None
        waited_from = time.perf_counter()
        with self._batches_and_bar(epoch) as (batches, bar):
            for batch in batches:
                step_from = time.perf_counter()
                terms = self.train_step(batch)
                if self.cfg.train.debug:
                    data_s, compute_s = step_from - waited_from, time.perf_counter() - step_from
                    log.info("debug: step %d data %.3fs compute %.3fs", self.progress.global_step, data_s, compute_s)
                for name, value in terms.items():
                    self._sums[name] = self._sums.get(name, 0) + value
                images, self._steps_done = images + len(batch.ids) * self.world, self._steps_done + 1
                self.progress.step_in_epoch += 1
                self.progress.global_step += 1
                self._after_step(terms, bar, images / max(time.perf_counter() - started, 1e-9))
                stop = self._early_stop()
                if stop is not None:
                    break
                waited_from = time.perf_counter()
        train_logs = {f"train/{k}": self._mean_across_ranks(v, self._steps_done) for k, v in self._sums.items()}
        speed = images / max(time.perf_counter() - started, 1e-9)
        return EpochStats(train=train_logs, img_per_s=speed, started=started, stop=stop)

    def _save_last(self) -> None:
        """last.pt with this epoch's loss sums so far (their mean across ranks: the epoch's train/* is a mean across
        ranks too, so resuming every rank from it gives the same row)."""
        self.loss_watch.check(self.progress.epoch)  # never checkpoint weights a non-finite loss went into
        self.progress.train_sums = {k: self._mean_across_ranks(v, 1) for k, v in self._sums.items()}
        self.progress.train_steps = self._steps_done
        self.checkpointer.save_last(self.progress)

    def _after_step(self, terms: dict[str, torch.Tensor], bar: Any, img_per_s: float) -> None:
        every = self.cfg.train.log_every_steps
        if self.progress.global_step % every == 0:
            self.loss_watch.check(self.progress.epoch)
            self.logger.step_scalars(self.progress.global_step, terms, self.lr, img_per_s, bar)
        else:
            bar.update(1)
        period = self.cfg.train.checkpoint_every_steps
        if period and self.progress.global_step % period == 0:
            self._save_last()

    def _early_stop(self) -> Optional[Stop]:
        # At an epoch's last step the ranks agree whatever the period: a signal must not wait out a validation.
        if self._stop_requested(now=self.progress.step_in_epoch == self.steps):
            return Stop.signal(self.stop.signal_name)
        max_steps = self.cfg.train.max_steps
        if max_steps and self.progress.global_step >= max_steps:
            return Stop.max_steps(max_steps)
        return None

    def _mean_across_ranks(self, total: torch.Tensor, steps: int) -> float:
        value = total.detach().float().reshape(1) / max(steps, 1)
        return float(self.accelerator.reduce(value, "mean").item())

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        # Every rank scores its share of the images with the same (rank 0's) BatchNorm statistics: the figures then
        # do not depend on the number of ranks, nor change on resume (which loads rank 0's).
        sync_buffers(self.accelerator, self.model)
        loader = eval_loader(cfg, cfg.data.val_split, self.accelerator, with_native=False)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        paper, standard, loss = collect_metrics(
            self.accelerator, model, loader, cfg, native=False, loss_fn=self.loss_fn
        )
        results = flatten_results(paper.compute(), standard.compute(), loss)
        return {f"val/{key}": value for key, value in results.items()}

    @property
    def lr(self) -> float:
        return self.cfg.optim.lr * self.monitor.lr_scale

    def _apply_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Validates, steps the monitor (LR, early stopping), appends the history row and checkpoints."""
        self.loss_watch.check(epoch)
        metrics = self.validate()
        self.monitor.update(metrics, epoch)
        self._apply_lr()
        row = {"epoch": epoch, "step": self.progress.global_step, "lr": self.lr, **stats.train, **metrics}
        row.update({"epoch_time_s": time.perf_counter() - stats.started, "img_per_s": stats.img_per_s})
        self.progress.history.append(row)
        self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
        self.progress.train_sums, self.progress.train_steps = {}, 0  # the row holds them now
        self._sums, self._steps_done = {}, 0
        self.logger.epoch_row(row)
        every = self.cfg.train.checkpoint_every_epochs
        ending = stats.stop is not None or self.monitor.should_stop or epoch + 1 >= self.cfg.train.max_epochs
        self.checkpointer.save(self.progress, last=ending or (epoch + 1) % every == 0, best=self.monitor.improved)

    # ------------------------------------------------------------------------------------------------ main loop
    def _start(self) -> None:
        """Resumes RUN/checkpoints/last.pt if there is one (recording any config change), else writes config.yaml."""
        resumed = self.checkpointer.resume(self.allow_config_change, self.allow_world_size_change)
        if resumed is None:
            if self.is_main:
                save_config(self.cfg, self.run_dir / "config.yaml")
            return
        self.progress = resumed.progress
        self._apply_lr()
        if not self.is_main:
            return
        if resumed.changes:  # config.yaml must say what runs from now on (drseg eval reads it)
            record_config_changes(self.cfg, resumed.changes, resumed.path, self.progress.global_step)
        elif not (self.run_dir / "config.yaml").is_file():
            save_config(self.cfg, self.run_dir / "config.yaml")

    def fit(self) -> TrainResult:
        # Validation runs only after an epoch of compute: its split is checked now (the training split was in __init__).
        check_split(self.cfg, self.manifest, self.cfg.data.val_split, "data.val_split")
        installed_here = not self.stop.installed
        self.stop.install()
        try:
            # A signal that came while the model and process group were built: leave before writing anything.
            stop = Stop.signal(self.stop.signal_name) if self._stop_requested(now=True) else self._fit_locked()
        finally:
            if installed_here:
                self.stop.uninstall()
        return TrainResult(
            run_dir=self.run_dir,
            exit_code=stop.reason.exit_code,
            reason=stop.message,
            progress=self.progress,
            stop=stop.reason,
        )

    def _fit_locked(self) -> Stop:
        lock = lock_on_rank_0(self.run_dir, self.is_main, self.world)
        try:
            # Only under the lock: the Checkpointer clears temporaries that only a dead writer can have left.
            self.checkpointer = Checkpointer(self.accelerator, self.cfg, self.model, self.optimizer, self.monitor)
            self._start()
            self.logger = RunLogger(self.run_dir, self.is_main, self.progress.history, accelerator=self.accelerator)
            # A signal during the resume: last.pt is as consistent as it was, so stop before step 0.
            stop = Stop.signal(self.stop.signal_name) if self._stop_requested(now=True) else self._loop()
            check_replicas(self.accelerator, self.model)
        finally:
            try:
                if self.checkpointer is not None:  # its files are committed before the run folder is let go
                    self.checkpointer.wait()
            finally:
                self.train_batches.close()  # the loader workers live for the run: not a moment longer
                self.logger.close()
                if lock is not None:
                    lock.release()
        return stop

    def _loop(self) -> Stop:
        while self.progress.epoch < self.cfg.train.max_epochs:
            if self.monitor.should_stop:
                return Stop.early_stopping(self.cfg.train.monitor, self.cfg.train.early_stop_patience)
            epoch = self.progress.epoch
            stats = self.run_epoch(epoch)
            stop = stats.stop
            # max_steps on an epoch boundary validates like any finished epoch; after a signal the resume does it.
            if stop is None or (stop.reason is not StopReason.SIGNAL and self.progress.step_in_epoch == self.steps):
                self.end_epoch(epoch, stats)
            else:
                self._save_last()
            if stop is not None:
                return stop
        return Stop.finished(self.cfg.train.max_epochs)


def train(cfg: RunConfig, allow_config_change: bool = False, allow_world_size_change: bool = False) -> TrainResult:
    """Builds everything from `cfg`, trains (resuming RUN/checkpoints/last.pt if present), always cleans up.
    `allow_config_change`, `allow_world_size_change`: see Trainer (CLI: drseg train --allow-config-change,
    --allow-world-size-change)."""
    die_with_launcher()
    # First of all: a SIGTERM while the model and process group are built (seconds to minutes) would otherwise kill
    # the process with -15, which a scheduler or sweep reads as a failure rather than "run me again" (exit 75).
    stop = StopFlag().install()
    try:
        trainer = Trainer(cfg, allow_config_change, stop=stop, allow_world_size_change=allow_world_size_change)
        try:
            result = trainer.fit()
        finally:
            shut_down(trainer.accelerator)
    finally:
        stop.uninstall()
    if trainer.is_main:
        log.info("%s: %s", result.run_dir, result.reason)
    return result
