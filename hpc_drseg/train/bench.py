"""`drseg bench train`: training-step throughput of the configured model, without and with the data loader.

Uses the real Trainer (same precision, memory format, compile and CBAM implementation as a run) for a fixed number
of steps after warm-up. FLOPs come from the model's flop count (models.describe_model), so TFLOP/s is achieved work.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hpc_drseg.config import RunConfig, config_from_dict, config_to_dict
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.pipeline import Batch
from hpc_drseg.errors import InputError
from hpc_drseg.models import describe_model
from hpc_drseg.train.runtime import shut_down
from hpc_drseg.train.trainer import Trainer

_SYNTHETIC_IMAGES_MAX = 256


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


def random_batch(cfg: RunConfig, seed: int, device: torch.device | str = "cpu") -> Batch:
    """A training batch of random pixels and sparse lesions, laid out as the training stream yields them: (B, C, H, W)
    uint8 views of NHWC storage (channels-last), made directly on `device` (so a step pays no host copy)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    b, px = cfg.train.batch_size, cfg.data.image_px
    image = torch.randint(0, 256, (b, px, px, 3), dtype=torch.uint8, generator=generator, device=device)
    mask = (torch.rand((b, px, px, len(LESIONS)), generator=generator, device=device) > 0.99).to(torch.uint8)
    ids = [f"random-{i}" for i in range(b)]
    return Batch(image.permute(0, 3, 1, 2), mask.permute(0, 3, 1, 2), ids, None)


@dataclass(frozen=True)
class StepTiming:
    step_s: float
    """Mean seconds per timed step (CUDA events around all of them on a GPU, the host clock on a CPU)."""
    first_step_s: Optional[float]
    """The first warm-up step alone (compilation, cuDNN autotuning, allocator growth); None without warm-up."""


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> StepTiming:
    """Runs `warmup` untimed calls of `step` (the first one timed on its own), then times `steps` calls."""
    first = None
    for index in range(warmup):
        _synchronize(device)
        started = time.perf_counter()
        step()
        if index == 0:
            _synchronize(device)
            first = time.perf_counter() - started
    _synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return StepTiming(start.elapsed_time(end) / 1e3 / steps, first)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return StepTiming((time.perf_counter() - started) / steps, first)


def time_trainer_steps(trainer: Trainer, batches: Iterator[Batch], warmup: int, steps: int) -> StepTiming:
    """The trainer's real step path (`Trainer.train_step`) on the given batches (loader time included if any)."""
    return time_steps(lambda: trainer.train_step(next(batches)), warmup, steps, trainer.accelerator.device)


@contextlib.contextmanager
def bench_trainer(cfg: RunConfig, steps_per_epoch: int) -> Iterator[Trainer]:
    """A Trainer of `cfg` (its shards must exist) with a temporary run folder; shut down on the way out."""
    with tempfile.TemporaryDirectory(prefix="drseg-bench-") as tmp:
        values = config_to_dict(cfg)
        values["train"].update(run_dir=str(Path(tmp) / "run"), steps_per_epoch=steps_per_epoch, max_steps=0)
        trainer = Trainer(config_from_dict(values))
        try:
            yield trainer
        finally:
            trainer.train_batches.close()
            trainer.logger.close()
            shut_down(trainer.accelerator)
            # Accelerate keeps one process-wide state: a later Trainer of this process (another precision) needs it
            # cleared, or its Accelerator refuses the new setting.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()


def _ensure_shards(cfg: RunConfig, images: int, workdir: Path) -> tuple[RunConfig, str]:
    """The configured shards if they exist; else a small synthetic set made here (a benchmark needs no real data)."""
    if (Path(cfg.data.shards) / "manifest.json").is_file():
        return cfg, f"shards {cfg.data.shards}"
    from hpc_drseg.data.shards import write_shards
    from hpc_drseg.data.synth import write_synthetic_ddr

    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    ddr = write_synthetic_ddr(
        workdir / "ddr", {"train": images}, size_px=cfg.data.image_px, progress=False, workers=workers
    )
    shards = workdir / "shards"
    write_shards(ddr, shards, image_px=cfg.data.image_px, progress=False, workers=workers)
    values = config_to_dict(cfg)
    values["data"]["shards"] = str(shards)
    return config_from_dict(values), f"synthetic shards ({images} images; {cfg.data.shards} has none)"


def benchmark_train(cfg: RunConfig, steps: int = 20, warmup: int = 3, log: Callable[[str], None] = print) -> dict:
    """Runs `warmup + steps` training steps on random batches already on the device, then on the loader's batches."""
    if steps < 1 or warmup < 0:
        raise InputError(f"--steps {steps} / --warmup {warmup}: need at least 1 timed step and >= 0 warm-up steps")
    with tempfile.TemporaryDirectory(prefix="drseg-bench-") as tmp:
        # the training loader resamples shards, so a few hundred images feed any number of steps
        images = min((warmup + steps) * cfg.train.batch_size, _SYNTHETIC_IMAGES_MAX)
        cfg, data_source = _ensure_shards(cfg, images, Path(tmp))
        with bench_trainer(cfg, warmup + steps) as trainer:
            device = trainer.accelerator.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batch = random_batch(cfg, cfg.train.seed, device)
            no_loader = time_trainer_steps(trainer, iter(lambda: batch, None), warmup, steps).step_s
            with_loader = time_trainer_steps(trainer, iter(trainer._train_batches(0)), warmup, steps).step_s
            result = _summary(cfg, trainer, no_loader, with_loader, data_source)
    log(format_result(result))
    return result


def _summary(cfg: RunConfig, trainer: Trainer, no_loader: float, with_loader: float, source: str) -> dict[str, Any]:
    info = describe_model(cfg.model, cfg.data.image_px)
    images = cfg.train.batch_size * trainer.world
    gflop_per_step = info["train_gflops_per_image"] * images
    device = trainer.accelerator.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": trainer.world,
        "model": f"{cfg.model.name} {cfg.model.backbone} OS{cfg.model.output_stride}",
        "image_px": cfg.data.image_px,
        "batch_per_process": cfg.train.batch_size,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "cbam_impl": info["cbam_impl_active"],
        "step_s_no_loader": no_loader,
        "img_per_s_no_loader": images / no_loader,
        "tflops_no_loader": gflop_per_step / no_loader / 1000,
        "step_s_with_loader": with_loader,
        "img_per_s_with_loader": images / with_loader,
        "peak_memory_gb": _peak_memory_gb(device),
        "data": source,
    }


def format_result(result: dict[str, Any]) -> str:
    rows = [
        f"{key:<22} {value:.4g}" if isinstance(value, float) else f"{key:<22} {value}" for key, value in result.items()
    ]
    return "\n".join(rows)
