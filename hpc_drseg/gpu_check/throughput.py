"""Parts 3 and 4 of `drseg bench gpu`. Throughput: per setting, the project's real training step (Trainer.train_step,
as `drseg bench train` runs it) against the plain-PyTorch baseline of the same model (baseline.py), both on
synthetic batches already on the device — ratio = project img/s / baseline img/s. Loader: the same trainer fed by its
real training stream (loader workers with albumentations, or data.augment.where=device) against synthetic batches."""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from typing import Any

import torch

from hpc_drseg.gpu_check.baseline import BASELINE, baseline_throughput
from hpc_drseg.gpu_check.context import Context
from hpc_drseg.gpu_check.plan import Setting
from hpc_drseg.train.bench import StepTiming, bench_trainer, random_batch, time_trainer_steps

COMPILE_WARMUP_STEPS = 3  # the first compiles; the next ones may recompile once (e.g. optimiser state appears)
COMPILE_MIN_LEFT_S = {"gpu": 150.0, "dry": 10.0}  # a compile setting needs at least this long to finish
SETTING_MIN_LEFT_S = {"gpu": 20.0, "dry": 2.0}


def _compile_seconds(timing: StepTiming) -> float | None:
    return None if timing.first_step_s is None else max(0.0, timing.first_step_s - timing.step_s)


def _project(ctx: Context, setting: Setting, warmup: int) -> tuple[StepTiming, str]:
    cfg = ctx.config(*setting.overrides())
    with bench_trainer(cfg, warmup + ctx.sizes.timed_steps) as trainer:
        batch = random_batch(cfg, cfg.train.seed, trainer.accelerator.device)
        timing = time_trainer_steps(trainer, iter(lambda: batch, None), warmup, ctx.sizes.timed_steps)
        impl = cfg.model.cbam.impl
    return timing, impl


def _setting_row(ctx: Context, setting: Setting, device: torch.device) -> dict[str, Any]:
    warmup = max(ctx.sizes.warmup_steps, COMPILE_WARMUP_STEPS) if setting.compile else ctx.sizes.warmup_steps
    project, impl = _project(ctx, setting, warmup)
    _free(device)
    baseline = baseline_throughput(ctx.config(*setting.overrides()), device, warmup, ctx.sizes.timed_steps)
    project_img_s = setting.batch_size / project.step_s
    baseline_img_s = setting.batch_size / baseline.step_s
    row = {
        "kind": "throughput",
        "setting": setting.name,
        "precision": setting.precision,
        "channels_last": setting.channels_last,
        "batch_size": setting.batch_size,
        "compile": setting.compile,
        "image_px": ctx.sizes.image_px,
        "project_img_s": project_img_s,
        "baseline_img_s": baseline_img_s,
        "ratio": project_img_s / baseline_img_s,
        "project_step_ms": project.step_s * 1e3,
        "baseline_step_ms": baseline.step_s * 1e3,
        "project_cbam_impl": impl,
        "baseline": BASELINE,
        "warmup_steps": warmup,
        "timed_steps": ctx.sizes.timed_steps,
    }
    if setting.compile:
        row.update(project_compile_s=_compile_seconds(project), baseline_compile_s=_compile_seconds(baseline))
        if ctx.dry_run:
            row["note"] = ctx.sizes.notes["compile"]
    return row


def _device(ctx: Context) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not ctx.dry_run else "cpu")


def _free(device: torch.device) -> None:
    """Hands the last measurement's GPU memory back, so the next one starts from the same empty allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: Context) -> None:
    device, scale = _device(ctx), "dry" if ctx.dry_run else "gpu"
    with _dry_run_compile(ctx.dry_run):
        for setting in ctx.sizes.settings:
            _run_setting(ctx, setting, device, scale)


@contextlib.contextmanager
def _dry_run_compile(dry_run: bool) -> Iterator[None]:
    """In a dry run, torch.compile (the trainer's and the baseline's) captures graphs with Dynamo's eager backend:
    the compile path runs, without inductor's minutes of code generation on a CPU (plan.DRY_SIZES.notes)."""
    if not dry_run:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")
    try:
        yield
    finally:
        torch.compile = original


def _run_setting(ctx: Context, setting: Setting, device: torch.device, scale: str) -> None:
    need = COMPILE_MIN_LEFT_S[scale] if setting.compile else SETTING_MIN_LEFT_S[scale]
    if ctx.left_s() < need:
        reason = f"{ctx.left_s():.0f} s left of this part, {need:.0f} s needed"
        ctx.emit({"kind": "throughput", "setting": setting.name, "skipped": reason})
        return
    ctx.emit(_setting_row(ctx, setting, device))
    _free(device)


def _loader_row(ctx: Context, setting: Setting, where: str, device: torch.device) -> dict[str, Any]:
    steps, warmup = ctx.sizes.loader_steps, ctx.sizes.warmup_steps
    workers = ctx.loader_workers(where_workers=where == "workers")
    cfg = ctx.config(*setting.overrides(), f"data.augment.where={where}", f"data.num_workers={workers}")
    with bench_trainer(cfg, 2 * (warmup + steps)) as trainer:
        batch = random_batch(cfg, cfg.train.seed, trainer.accelerator.device)
        synthetic = time_trainer_steps(trainer, iter(lambda: batch, None), warmup, steps)
        loader = time_trainer_steps(trainer, iter(trainer._train_batches(0)), warmup, steps)
    synthetic_img_s, loader_img_s = setting.batch_size / synthetic.step_s, setting.batch_size / loader.step_s
    return {
        "kind": "loader",
        "setting": f"{setting.name}, augment where={where}",
        "where": where,
        "num_workers": cfg.data.num_workers if where == "workers" else 0,
        "augment_preset": cfg.data.augment.preset,
        "loader_img_s": loader_img_s,
        "synthetic_img_s": synthetic_img_s,
        "ratio": loader_img_s / synthetic_img_s,
        "ratio_of": "real training stream / synthetic on-device batches, same trainer",
        "timed_steps": steps,
    }


def run_loader(ctx: Context) -> None:
    device = _device(ctx)
    for where in ("workers", "device"):
        if ctx.left_s() < SETTING_MIN_LEFT_S["dry" if ctx.dry_run else "gpu"]:
            ctx.emit({"kind": "loader", "setting": where, "skipped": f"{ctx.left_s():.0f} s left of this part"})
            continue
        ctx.emit(_loader_row(ctx, ctx.sizes.loader_setting, where, device))
        _free(device)
