"""The in-run baseline of `drseg bench gpu`: the same architecture trained by a plain PyTorch loop, the way a careful
user would write it without this package's trainer — build_model with eager CBAM, torch.optim.Adam(foreach=True), no
Accelerate, synthetic batches already on the device, the project's CombinedLoss (the same loss, so the comparison is
of the training machinery, not of the objective), autocast for bf16, timing by CUDA events after warm-up."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch

from hpc_drseg.config import RunConfig
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.normalize import normalize
from hpc_drseg.losses import build_loss
from hpc_drseg.models import build_model, split_output
from hpc_drseg.train.bench import StepTiming, time_steps

BASELINE = (
    "plain PyTorch: eager CBAM, Adam(foreach=True), cudnn.benchmark, autocast for bf16, "
    "CombinedLoss (the project's loss: Dice + BCE + focal + boundary as configured)"
)


def _eager_cbam(cfg: RunConfig) -> RunConfig:
    return replace(cfg, model=replace(cfg.model, cbam=replace(cfg.model.cbam, impl="eager")))


def baseline_throughput(cfg: RunConfig, device: torch.device, warmup: int, steps: int) -> StepTiming:
    """Seconds per training step of the plain loop at cfg's batch size, image side, precision, memory format and
    compile flag (train.compile: the model and the loss each through torch.compile, default mode)."""
    cfg = _eager_cbam(cfg)
    torch.backends.cudnn.benchmark = True  # what a careful user sets; explicit, so the order of runs cannot matter
    torch.manual_seed(cfg.train.seed)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(device).to(memory_format=layout).train()
    loss_fn = build_loss(cfg.loss).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        foreach=True,
    )
    forward, loss_step = model, loss_fn
    if cfg.train.compile:
        forward, loss_step = torch.compile(model), torch.compile(loss_fn)
    b, px = cfg.train.batch_size, cfg.data.image_px
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    pixels = torch.randint(0, 256, (b, 3, px, px), dtype=torch.uint8, generator=generator, device=device)
    image = normalize(pixels, torch.float32, cfg.train.channels_last)
    mask = (torch.rand((b, len(LESIONS), px, px), generator=generator, device=device) > 0.99).to(torch.uint8)
    mask = mask.contiguous(memory_format=layout)
    autocast: Any = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            logits, aux = split_output(forward(image))
            loss, _ = loss_step(logits, mask, aux)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps, device)
