"""Part 7 of `drseg bench gpu`: steady-state training steps under CUDA's sync debug mode "error", where any call that
makes the host wait for the GPU raises — pass, or the offending call site (the innermost frame of this package)."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from hpc_drseg.gpu_check.context import Context, PartSkipped
from hpc_drseg.train.bench import bench_trainer

WARMUP_STEPS = 3
_PACKAGE = str(Path(__file__).resolve().parents[1])


def call_site(exc: BaseException) -> str:
    """'path:line in function' of the innermost traceback frame inside hpc_drseg (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if frame.filename.startswith(_PACKAGE)] or frames
    frame = ours[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"


def run(ctx: Context) -> None:
    if ctx.dry_run or not torch.cuda.is_available():
        raise PartSkipped("needs CUDA: sync debug mode is a CUDA feature")
    setting = ctx.sizes.loader_setting
    # log_every_steps beyond the window: the loss-finiteness check (a deliberate read-back) stays out of it
    cfg = ctx.config(*setting.overrides(), "train.log_every_steps=100000")
    steps = ctx.sizes.sync_steps
    row = {"kind": "sync_debug", "setting": setting.name, "warmup_steps": WARMUP_STEPS, "steps": steps}
    with bench_trainer(cfg, WARMUP_STEPS + steps) as trainer:
        batches = iter(trainer._train_batches(0))
        for _ in range(WARMUP_STEPS):
            trainer.train_step(next(batches))
        torch.cuda.synchronize()
        checked = 0
        try:
            for _ in range(steps):
                batch = next(batches)  # the loader's own copies stay outside: only the step is checked
                torch.cuda.set_sync_debug_mode("error")
                try:
                    trainer.train_step(batch)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                checked += 1
            row.update(passed=True, steps_checked=steps)
        except RuntimeError as exc:
            row.update(
                passed=False, steps_checked=checked, error=str(exc).splitlines()[0][:300], call_site=call_site(exc)
            )
        torch.cuda.synchronize()
    ctx.emit(row)
