"""The training loop: one code path for CPU, one GPU, DDP (accelerate launch / torchrun / srun) and DeepSpeed.

Paper optimisation (Jithesh et al., ICMLA 2025): Adam 1e-4, ReduceLROnPlateau (0.5, 5), early stopping (15), batch 4.
Re-running on an existing run directory resumes it exactly: weights, optimiser, monitor, epoch/step, RNG and the
position in the epoch's deterministic data stream.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from hpc_drseg.config import RunConfig, config_to_dict, save_config
from hpc_drseg.data.augment import build_augment, normalize
from hpc_drseg.data.pipeline import Batch, build_eval_loader, build_train_loader, steps_per_epoch
from hpc_drseg.data.shards import read_manifest
from hpc_drseg.losses import build_loss
from hpc_drseg.models import build_model
from hpc_drseg.train import checkpoint as ckpt
from hpc_drseg.train.logs import RunLogger
from hpc_drseg.train.monitor import PlateauMonitor
from hpc_drseg.train.runtime import (
    build_accelerator,
    configure_deepspeed,
    model_input_dtype,
    seed_everything,
    set_debug_mode,
    uses_deepspeed,
)
from hpc_drseg.train.signals import EXIT_RESUMABLE, StopFlag
from hpc_drseg.train.validate import collect_metrics, flatten_results, split_output

log = logging.getLogger("hpc_drseg.train")

DEBUG_SUBSET_BATCHES = 4  # train.debug without data.subset: this many batches per rank per epoch


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    exit_code: int
    reason: str
    progress: Progress


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.accelerator = build_accelerator(cfg.train)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.manifest = read_manifest(cfg.data.shards)
        self._check_image_size()
        self.progress = Progress()
        self.stop = StopFlag()
        self._build_objects()
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, history=self.progress.history)

    # ------------------------------------------------------------------------------------------------ set-up
    def _check_image_size(self) -> None:
        shard_px = self.manifest["image_px"]
        if shard_px != self.cfg.data.image_px:
            raise ValueError(
                f"shards in {self.cfg.data.shards} are {shard_px}px but data.image_px={self.cfg.data.image_px}; "
                f"set data.image_px={shard_px} or re-shard with --image-px {self.cfg.data.image_px}"
            )

    def _build_objects(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.train.debug:
            set_debug_mode()
        # Adam's second moments of tiny gradients underflow into denormals, which run ~100x slower on x86 CPUs.
        torch.set_flush_denormal(True)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        if acc.device.type == "cuda" and self.world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # gloo/CPU has no SyncBatchNorm kernels
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        configure_deepspeed(acc, cfg.train)
        if cfg.train.compile and not cfg.train.debug:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.loss_fn = build_loss(cfg.loss).to(acc.device)
        self.monitor = PlateauMonitor(
            cfg.train.monitor_mode,
            cfg.optim.plateau_factor,
            cfg.optim.plateau_patience,
            cfg.train.early_stop_patience,
            min_scale=cfg.optim.min_lr / cfg.optim.lr,
        )
        self.augment = build_augment(cfg.data.augment, cfg.data.image_px)
        self.steps = self._steps_per_epoch()
        seed_everything(cfg.train.seed * 1000 + self.rank)  # dropout differs per rank, reproducibly

    def _steps_per_epoch(self) -> int:
        cfg = self.cfg
        if cfg.train.steps_per_epoch:
            return cfg.train.steps_per_epoch
        images = self.manifest["splits"][cfg.data.train_split]["images"]
        if cfg.data.subset:
            images = min(images, cfg.data.subset)
        steps = steps_per_epoch(images, cfg.train.batch_size, self.world)
        if cfg.train.debug and not cfg.data.subset:
            steps = min(steps, DEBUG_SUBSET_BATCHES)
        return steps

    # ------------------------------------------------------------------------------------------------ steps
    def _device_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        image = normalize(batch.image.to(device, non_blocking=True))
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image.to(model_input_dtype(self.model)), batch.mask.to(device, non_blocking=True)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        image, mask = self._device_batch(batch)
        if self.cfg.train.debug and self.progress.global_step == 0:
            log.info("debug: image %s %s, mask %s %s", tuple(image.shape), image.dtype, tuple(mask.shape), mask.dtype)
        with self.accelerator.accumulate(self.model):
            logits, aux = split_output(self.model(image))
            loss, terms = self.loss_fn(logits, mask, aux)
            self._check_finite(loss, batch)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    def _check_finite(self, loss: torch.Tensor, batch: Batch) -> None:
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at epoch {self.progress.epoch} step {self.progress.global_step} "
                f"(rank {self.rank}); samples: {', '.join(batch.ids)}. Lower optim.lr, use train.precision=no, "
                "or run with train.debug=true to find the operation"
            )

    def _stop_requested(self) -> bool:
        """All ranks agree, so they stop after the same step."""
        if self.world == 1:
            return self.stop.requested
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # ------------------------------------------------------------------------------------------------ epochs
    def _train_batches(self, epoch: int) -> Iterable[Batch]:
        cfg = self.cfg
        loader = build_train_loader(
            cfg.data.shards, cfg.data.train_split, cfg.train.batch_size, self.rank, self.world, cfg.train.seed,
            epoch, cfg.data.num_workers, augment=self.augment, steps=self.steps, shuffle_buffer=cfg.data.shuffle_buffer,
            subset=cfg.data.subset,
        )  # fmt: skip
        # Resuming mid-epoch: the epoch's stream is deterministic, so replaying and dropping the consumed batches
        # puts data and augmentation exactly where the interrupted run was.
        return itertools.islice(loader, self.progress.step_in_epoch, None)

    def run_epoch(self, epoch: int) -> Optional[str]:
        """Trains one epoch; returns a stop reason when a signal or max_steps ended it early."""
        sums: dict[str, torch.Tensor] = {}
        started, images, reason = time.perf_counter(), 0, None
        bar = self.logger.progress_bar(self.steps, self.progress.step_in_epoch, f"epoch {epoch}")
        waited_from = time.perf_counter()
        for batch in self._train_batches(epoch):
            step_from = time.perf_counter()
            terms = self.train_step(batch)
            if self.cfg.train.debug:
                log.info("debug: step %d data %.3fs compute %.3fs", self.progress.global_step,
                         step_from - waited_from, time.perf_counter() - step_from)  # fmt: skip
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value
            images += len(batch.ids) * self.world
            self.progress.step_in_epoch += 1
            self.progress.global_step += 1
            self._after_step(terms, bar, images / max(time.perf_counter() - started, 1e-9))
            reason = self._early_exit_reason()
            if reason:
                break
            waited_from = time.perf_counter()
        bar.close()
        self._epoch_train_logs = {f"train/{k}": self._mean_across_ranks(v) for k, v in sums.items()}
        self._epoch_speed = images / max(time.perf_counter() - started, 1e-9)
        return reason

    def _after_step(self, terms: dict[str, torch.Tensor], bar: Any, img_per_s: float) -> None:
        every = self.cfg.train.log_every_steps
        if self.progress.global_step % every == 0:
            self.logger.step_scalars(self.progress.global_step, terms, self.lr, img_per_s, bar)
        else:
            bar.update(1)
        period = self.cfg.train.checkpoint_every_steps
        if period and self.progress.global_step % period == 0:
            self.save_last()

    def _early_exit_reason(self) -> Optional[str]:
        if self._stop_requested():
            return f"stopped by {self.stop.signal_name or 'a signal on another rank'}"
        max_steps = self.cfg.train.max_steps
        if max_steps and self.progress.global_step >= max_steps:
            return f"reached train.max_steps={max_steps}"
        return None

    def _mean_across_ranks(self, total: torch.Tensor) -> float:
        value = total.detach().float().reshape(1) / max(self.progress.step_in_epoch, 1)
        return float(self.accelerator.reduce(value, "mean").item())

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        loader = build_eval_loader(
            cfg.data.shards, cfg.data.val_split, cfg.eval.batch_size, self.rank, self.world,
            cfg.data.num_workers, with_native=False,
        )  # fmt: skip
        paper, standard, loss = collect_metrics(
            self.accelerator, self.accelerator.unwrap_model(self.model), loader, cfg, native=False,
            loss_fn=self.loss_fn,
        )  # fmt: skip
        results = flatten_results(paper.compute(), standard.compute(), loss)
        return {f"val/{key}": value for key, value in results.items()}

    @property
    def lr(self) -> float:
        return self.cfg.optim.lr * self.monitor.state.lr_scale

    def _apply_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def end_epoch(self, epoch: int) -> None:
        metrics = self.validate()
        monitored = metrics.get(self.cfg.train.monitor)
        if monitored is None:
            raise ValueError(
                f"train.monitor={self.cfg.train.monitor!r} is not a validation quantity; use one of {sorted(metrics)}"
            )
        self.monitor.update(monitored, epoch)
        self._apply_lr()
        row = {"epoch": epoch, "step": self.progress.global_step, "lr": self.lr, **self._epoch_train_logs, **metrics}
        row.update({"epoch_time_s": time.perf_counter() - self._epoch_started, "img_per_s": self._epoch_speed})
        self.progress.history.append(row)
        self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
        self.logger.epoch_row(row)
        self.save_last()
        if self.monitor.improved:
            self.save_best()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        state = {
            "model": {k: v.detach().cpu() for k, v in self.accelerator.get_state_dict(model).items()},
            "monitor": self.monitor.state_dict(),
            "progress": {k: v for k, v in vars(self.progress).items()},
            "config": config_to_dict(self.cfg),
            "rng": ckpt.capture_rng(),
            "world_size": self.world,
        }
        if not uses_deepspeed():
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save_last(self) -> None:
        state = self._state()
        if uses_deepspeed():  # optimiser state is partitioned across ranks: every rank writes its part
            self.accelerator.save_state(str(self.run_dir / ckpt.CHECKPOINT_DIR / "deepspeed"))
        if self.rank > 0:
            ckpt.atomic_torch_save(state["rng"], ckpt.rng_path(self.run_dir, self.rank))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            ckpt.atomic_torch_save(state, ckpt.checkpoint_path(self.run_dir, "last"))
        self.accelerator.wait_for_everyone()

    def save_best(self) -> None:
        if self.is_main:
            state = self._state()
            state.pop("optimizer", None)
            ckpt.atomic_torch_save(state, ckpt.checkpoint_path(self.run_dir, "best"))

    def resume(self) -> bool:
        path = ckpt.checkpoint_path(self.run_dir, "last")
        if not path.is_file():
            return False
        state = ckpt.load_checkpoint(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        if uses_deepspeed():
            self.accelerator.load_state(str(self.run_dir / ckpt.CHECKPOINT_DIR / "deepspeed"))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.monitor.load_state_dict(state["monitor"])
        self.progress = Progress(**state["progress"])
        self.logger.history = self.progress.history
        self._apply_lr()
        rng = state["rng"] if self.rank == 0 else ckpt.load_checkpoint(ckpt.rng_path(self.run_dir, self.rank))
        ckpt.restore_rng(rng)
        if self.is_main:
            log.info("resumed %s at epoch %d, step %d", path, self.progress.epoch, self.progress.global_step)
        return True

    def check_replicas(self) -> None:
        """DDP/ZeRO keep every rank's weights identical; a silent drift (ENV-NOTES' CPU trap) is an error here."""
        if self.world == 1:
            return
        model = self.accelerator.unwrap_model(self.model)
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
        high, low = checksum.clone(), -checksum
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MAX)
        spread = high + low  # max - min, per parameter tensor
        if spread.abs().max().item() > 0:
            raise RuntimeError(f"model replicas differ across the {self.world} ranks (max spread {spread.max():.3g})")
        if self.is_main:
            log.info("replicas identical on all %d ranks (%d parameter tensors)", self.world, checksum.numel())

    # ------------------------------------------------------------------------------------------------ main loop
    def fit(self) -> TrainResult:
        self.stop.install()
        try:
            if not self.resume() and self.is_main:
                save_config(self.cfg, self.run_dir / "config.yaml")
            reason = self._loop()
            self.check_replicas()
        finally:
            self.stop.uninstall()
            self.logger.close()
        code = EXIT_RESUMABLE if reason.startswith("stopped by") else 0
        return TrainResult(self.run_dir, code, reason, self.progress)

    def _loop(self) -> str:
        while self.progress.epoch < self.cfg.train.max_epochs:
            if self.monitor.should_stop:
                patience = self.monitor.stop_patience
                return f"early stopping: no improvement of {self.cfg.train.monitor} for {patience} epochs"
            epoch = self.progress.epoch
            self._epoch_started = time.perf_counter()
            reason = self.run_epoch(epoch)
            if reason and self.progress.step_in_epoch == self.steps and not reason.startswith("stopped by"):
                self.end_epoch(epoch)  # max_steps fell on an epoch boundary: validate like any finished epoch
            elif reason:
                self.save_last()
            if reason:
                return reason
            self.end_epoch(epoch)
        return f"finished {self.cfg.train.max_epochs} epochs"


def train(cfg: RunConfig) -> TrainResult:
    """Builds everything from `cfg`, trains (resuming RUN/checkpoints/last.pt if present), always cleans up."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    finally:
        trainer.accelerator.end_training()
    if trainer.is_main:
        log.info("%s: %s", result.run_dir, result.reason)
    return result
