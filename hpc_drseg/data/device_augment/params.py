"""Per-sample random parameters of the paper pipeline for one batch, drawn on the training device.

The probabilities and ranges are data/augment.py's (PAPER_P, strength, the AFFINE_/COLOUR/NOISE/… constants). Every
draw has a fixed shape whatever fires, so a batch's parameters depend on the generator's seed alone and nothing waits
for the host; a transform that does not fire gets its identity value (no flip, factor 0, choice -1, std 0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from hpc_drseg.config import AugmentConfig
from hpc_drseg.data import augment as paper


@dataclass(frozen=True)
class Probabilities:
    """The chance that each top-level transform (or OneOf block) of the preset fires, strength applied."""

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    affine: float = 0.0
    colour: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    distortion: float = 0.0

    @property
    def none(self) -> bool:
        return all(getattr(self, f.name) == 0 for f in fields(self))


def probabilities(cfg: AugmentConfig) -> Probabilities:
    """The preset's probabilities: 'paper' all of them, 'light' flips and rotations only, 'none' nothing; each
    multiplied by cfg.strength and clipped to 1 as build_augment does."""
    if cfg.preset == "none" or cfg.strength == 0:
        return Probabilities()
    names = {
        "hflip": "HorizontalFlip",
        "vflip": "VerticalFlip",
        "rot90": "RandomRotate90",
        "affine": "Affine",
        "colour": "colour",
        "noise": "GaussNoise",
        "blur": "GaussianBlur",
        "distortion": "distortion",
    }
    light = ("hflip", "vflip", "rot90")
    chosen = {
        field: min(1.0, paper.PAPER_P[name] * cfg.strength)
        for field, name in names.items()
        if cfg.preset == "paper" or field in light
    }
    return Probabilities(**chosen)


@dataclass(frozen=True)
class Params:
    """One batch's parameters, (B,) per sample unless said otherwise, all on the device.

    Geometric: flips, rot90 factor (np.rot90's counter-clockwise quarter turns), affine (rotation in degrees, scale,
    whole-pixel shift (B, 2) as albumentations truncates it), distortion choice (-1 none, 0 elastic, 1 grid,
    2 optical) with its draws. Photometric: colour choice (-1 none, 0 brightness/contrast, 1 gamma, 2 HSV) with its
    draws, noise std on the 0-255 scale (0 = off) and its unit field, blur on/off.
    """

    hflip: torch.Tensor
    vflip: torch.Tensor
    rot90: torch.Tensor
    affine: torch.Tensor
    angle_deg: torch.Tensor
    scale: torch.Tensor
    shift_px: torch.Tensor
    distortion: torch.Tensor
    elastic_noise: Optional[torch.Tensor]
    """(B, 2, H, W) unit normal (dx, dy) before normalisation and blur; None when no distortion can fire."""
    grid_steps: torch.Tensor
    """(B, 2, GRID_STEPS + 1): 1 + U(GRID_DISTORT) per x then y step, before normalisation."""
    optical_k: torch.Tensor
    colour: torch.Tensor
    contrast: torch.Tensor
    """alpha: the image is multiplied by it."""
    brightness: torch.Tensor
    """beta on the 0-255 scale: added."""
    gamma: torch.Tensor
    hsv_shift: torch.Tensor
    """(B, 3): hue (OpenCV units of 2 degrees), saturation and value shifts on the 0-255 scale."""
    noise_std: torch.Tensor
    noise: Optional[torch.Tensor]
    """(B, 3, H, W) unit normal; None when noise cannot fire."""
    blur: torch.Tensor


_UNIFORMS = 23  # scalar uniform draws per sample (columns of `u` in draw_params)


def _between(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * u


def _choice(fires: torch.Tensor, u: torch.Tensor, options: int) -> torch.Tensor:
    """OneOf: one of `options` equally weighted members when the block fires, else -1 (the paper's members have
    equal weights, which OneOf normalises)."""
    pick = (u * options).long().clamp_(max=options - 1)
    return torch.where(fires, pick, torch.full_like(pick, -1))


def draw_params(p: Probabilities, batch: int, image_px: int, generator: torch.Generator) -> Params:
    """Draws one batch's parameters from `generator` (on the training device) with the preset's probabilities."""
    device = generator.device
    u = torch.rand(batch, _UNIFORMS, generator=generator, device=device)
    fires = {name: u[:, col] < getattr(p, name) for col, name in enumerate(("hflip", "vflip", "rot90", "affine"))}
    factor = (u[:, 4] * 4).long().clamp_(max=3)  # RandomRotate90 draws 0..3, 0 included, when it fires
    rotate = fires["affine"]
    shift = torch.trunc(_between(u[:, 7:9], paper.AFFINE_TRANSLATE) * image_px)
    steps = 1 + _between(
        torch.rand(batch, 2, paper.GRID_STEPS + 1, generator=generator, device=device), paper.GRID_DISTORT
    )
    shape = (batch, 2, image_px, image_px)
    elastic = torch.randn(shape, generator=generator, device=device) if p.distortion > 0 else None
    noise = torch.randn((batch, 3, image_px, image_px), generator=generator, device=device) if p.noise > 0 else None
    hsv = torch.stack([_between(u[:, 14 + i], bounds) for i, bounds in enumerate(paper.HSV_SHIFTS)], dim=1)
    noise_std = torch.where(u[:, 17] < p.noise, _between(u[:, 18], paper.NOISE_STD) * 255.0, torch.zeros_like(u[:, 18]))
    return Params(
        hflip=fires["hflip"],
        vflip=fires["vflip"],
        rot90=torch.where(fires["rot90"], factor, torch.zeros_like(factor)),
        affine=rotate,
        angle_deg=torch.where(rotate, _between(u[:, 5], paper.AFFINE_ROTATE_DEG), torch.zeros_like(u[:, 5])),
        scale=torch.where(rotate, _between(u[:, 6], paper.AFFINE_SCALE), torch.ones_like(u[:, 6])),
        shift_px=torch.where(rotate[:, None], shift, torch.zeros_like(shift)),
        distortion=_choice(u[:, 19] < p.distortion, u[:, 20], 3),
        elastic_noise=elastic,
        grid_steps=steps,
        optical_k=_between(u[:, 21], paper.OPTICAL_DISTORT),
        colour=_choice(u[:, 9] < p.colour, u[:, 10], 3),
        contrast=1.0 + _between(u[:, 11], paper.CONTRAST),
        brightness=_between(u[:, 12], paper.BRIGHTNESS) * 255.0,
        gamma=_between(u[:, 13], paper.GAMMA_PERCENT) / 100.0,
        hsv_shift=hsv,
        noise_std=noise_std,
        noise=noise,
        blur=u[:, 22] < p.blur,
    )
