"""`drseg bench train`: training-step throughput of the configured model, without and with the data loader.

Uses the real Trainer (same precision, memory format, compile and CBAM implementation as a run) for a fixed number
of steps after warm-up. FLOPs come from the model's flop count (models.describe_model), so TFLOP/s is achieved work.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def _random_batch(cfg: RunConfig, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    b, px = cfg.train.batch_size, cfg.data.image_px
    image = torch.randint(0, 256, (b, 3, px, px), dtype=torch.uint8, generator=generator)
    mask = (torch.rand((b, len(LESIONS), px, px), generator=generator) > 0.99).to(torch.uint8)
    return Batch(image, mask, [f"random-{i}" for i in range(b)], None)


def _time_steps(trainer: Trainer, batches: Iterator[Batch], warmup: int, steps: int) -> float:
    """Seconds per training step, mean over `steps` after `warmup` (loader time included if any)."""
    device = trainer.accelerator.device
    for _ in range(warmup):
        trainer.train_step(next(batches))
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    _synchronize(device)
    return (time.perf_counter() - started) / steps


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
    """Runs `warmup + steps` training steps on random on-device batches, then on the loader's batches."""
    if steps < 1 or warmup < 0:
        raise InputError(f"--steps {steps} / --warmup {warmup}: need at least 1 timed step and >= 0 warm-up steps")
    with tempfile.TemporaryDirectory(prefix="drseg-bench-") as tmp:
        values = config_to_dict(cfg)
        values["train"].update(run_dir=str(Path(tmp) / "run"), steps_per_epoch=warmup + steps, max_steps=0)
        cfg = config_from_dict(values)
        # the training loader resamples shards, so a few hundred images feed any number of steps
        images = min((warmup + steps) * cfg.train.batch_size, _SYNTHETIC_IMAGES_MAX)
        cfg, data_source = _ensure_shards(cfg, images, Path(tmp))
        trainer = Trainer(cfg)
        try:
            device = trainer.accelerator.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batch = _random_batch(cfg, cfg.train.seed)
            no_loader = _time_steps(trainer, iter(lambda: batch, None), warmup, steps)
            with_loader = _time_steps(trainer, iter(trainer._train_batches(0)), warmup, steps)
            result = _summary(cfg, trainer, no_loader, with_loader, data_source)
        finally:
            trainer.logger.close()
            shut_down(trainer.accelerator)
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
