"""Training-time augmentation of Jithesh et al. (ICMLA 2025), ported to albumentations 2.x, and the on-device
ImageNet normalisation. Values: SPEC.md "Augmentation"; old 1.x argument names are silently ignored by 2.x, so every
transform below is built with its 2.x names and Compose(strict=True) turns any leftover into an error.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for updates at import; compute nodes have no network (the package __init__ sets this too).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import math  # noqa: E402
import random  # noqa: E402
from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpc_drseg.config import AugmentConfig  # noqa: E402
from hpc_drseg.constants import IMAGENET_MEAN, IMAGENET_STD, LESIONS  # noqa: E402

# The paper's probabilities (SPEC.md). OneOf members keep theirs as selection weights: OneOf normalises them and then
# force-applies the chosen one, so each elastic/grid/optical fires with .3 × 1/3 = .1 overall.
PAPER_P: dict[str, float] = {
    "HorizontalFlip": 0.5,
    "VerticalFlip": 0.5,
    "RandomRotate90": 0.5,
    "Affine": 0.5,
    "colour": 0.5,  # OneOf(brightness/contrast, gamma, HSV)
    "GaussNoise": 0.15,
    "GaussianBlur": 0.15,
    "distortion": 0.3,  # OneOf(elastic, grid, optical)
}
_PAPER_PX = 512  # the resolution the paper's pixel-valued constants (elastic alpha, sigma) were chosen for


class Augment:
    """`(image H×W×3 uint8, mask H×W×4 uint8 0/1) -> (image, mask)`, the same shapes and dtypes.

    Geometric transforms move the 4-channel mask with nearest interpolation and fill 0; photometric ones touch the
    image only. The random state belongs to this object (albumentations ignores the global RNGs): see `reseed`.
    """

    def __init__(self, compose: A.Compose, image_px: int) -> None:
        self.compose = compose
        self.image_px = image_px

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        side = self.image_px
        if image.shape != (side, side, 3) or mask.shape != (side, side, len(LESIONS)):
            raise ValueError(
                f"augment expects image ({side}, {side}, 3) and mask ({side}, {side}, {len(LESIONS)}); got "
                f"{image.shape} and {mask.shape}: re-shard at data.image_px={side} or set data.image_px to the shards'"
            )
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]

    def reseed(self, seed: int) -> None:
        """Makes the random stream a function of `seed` alone; `seed_augment` has the details.

        data/pipeline.py calls this at the start of each worker's iteration with stream_seed(seed, epoch, rank,
        worker): a forked worker otherwise inherits the parent's generator state, and every worker would repeat the
        same augmentations (and so would every epoch with persistent workers).
        """
        seed_augment(self, seed)

    def __repr__(self) -> str:
        return f"Augment(image_px={self.image_px}, {self.compose!r})"


def build_augment(cfg: AugmentConfig, image_px: int, seed: int | None = None) -> Augment | None:
    """Builds the preset named by `cfg` for square images of side `image_px`; None when nothing would be applied.

    `cfg.strength` multiplies the probability of every top-level transform and OneOf block (clipped to 1); the
    weights inside a OneOf are relative, so they keep the paper's values. `seed`: see `Augment.reseed`.
    `cfg.fast_elastic` (opt-in, not the paper's code): FastElasticTransform instead of ElasticTransform, the same
    displacement statistics at a fraction of the cost (the σ=50 blur is ~3/4 of ElasticTransform's time).
    """
    if image_px <= 0:
        raise ValueError(f"image_px: got {image_px}; it must be > 0 (data.image_px)")
    if cfg.preset == "none" or cfg.strength == 0:
        return None
    if cfg.preset == "paper":
        transforms = _paper_transforms(cfg.strength, image_px, cfg.fast_elastic)
    elif cfg.preset == "light":
        transforms = _flips(cfg.strength)
    else:
        raise ValueError(f"data.augment.preset: got {cfg.preset!r}; choose one of 'paper', 'light', 'none'")
    # strict: an argument name that 2.x does not know raises instead of being ignored with a warning.
    compose = A.Compose(transforms, strict=True, mask_interpolation=cv2.INTER_NEAREST)
    aug = Augment(compose, image_px)
    if seed is not None:
        seed_augment(aug, seed)
    return aug


def _p(name: str, strength: float) -> float:
    return min(1.0, PAPER_P[name] * strength)


def _flips(strength: float) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=_p("HorizontalFlip", strength)),
        A.VerticalFlip(p=_p("VerticalFlip", strength)),
        A.RandomRotate90(p=_p("RandomRotate90", strength)),
    ]


def _paper_transforms(strength: float, image_px: int, fast_elastic: bool = False) -> list[Any]:
    geometric_border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    # 1.x ShiftScaleRotate: one isotropic scale (keep_ratio), independent x/y shifts, no shear.
    affine = A.Affine(
        translate_percent={"x": (-0.0625, 0.0625), "y": (-0.0625, 0.0625)},
        scale=(0.9, 1.1),
        keep_ratio=True,
        rotate=(-15, 15),
        shear=0.0,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        p=_p("Affine", strength),
        **geometric_border,
    )
    colour = A.OneOf(
        [
            A.RandomBrightnessContrast(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2), p=0.4),
            A.RandomGamma(gamma_limit=(80, 120), p=0.4),
            A.HueSaturationValue(
                hue_shift_limit=(-10, 10), sat_shift_limit=(-15, 15), val_shift_limit=(-10, 10), p=0.4
            ),
        ],
        p=_p("colour", strength),
    )
    # 1.x var_limit (10, 50) was a variance on the 0-255 scale; 2.x std_range is a standard deviation / 255.
    noise = A.GaussNoise(std_range=(math.sqrt(10) / 255, math.sqrt(50) / 255), p=_p("GaussNoise", strength))
    # (3, 3): a fixed 3×3 kernel. A bare 3 means (0, 3) in 2.x, and 0 derives kernels up to 21 px from sigma.
    blur = A.GaussianBlur(blur_limit=(3, 3), p=_p("GaussianBlur", strength))
    px_scale = image_px / _PAPER_PX  # elastic alpha and sigma are in pixels: keep the paper's field at other sizes
    elastic = FastElasticTransform if fast_elastic else A.ElasticTransform
    distortion = A.OneOf(
        [
            elastic(alpha=1.0 * px_scale, sigma=50.0 * px_scale, p=0.15, **geometric_border),
            A.GridDistortion(p=0.15, **geometric_border),
            A.OpticalDistortion(distort_limit=(-1.0, 1.0), mode="camera", p=0.15, **geometric_border),
        ],
        p=_p("distortion", strength),
    )
    return [*_flips(strength), affine, colour, noise, blur, distortion]


class FastElasticTransform(A.ElasticTransform):
    """ElasticTransform with the same displacement-field statistics, computed on a grid `sigma / 6` times coarser.

    2.x draws unit normal noise per pixel, divides it by its largest |value|, blurs it with a Gaussian of `sigma` px
    (OpenCV picks 8·sigma + 1 = 401 taps at sigma 50: ~3/4 of the transform's time) and scales by `alpha`. Here the
    noise is drawn per coarse cell (f = sigma // 6 px) with the standard deviation of an f×f average (1/f), divided
    by the expected largest |value| of the full-size noise, blurred with sigma / f and upsampled bilinearly: the
    field is smooth over ~sigma px, so nothing visible is lost. Not reproduced: 2.x's replicate border lets the edge
    pixels' noise dominate within ~sigma of the border. With the paper's alpha 1 both fields stay far below 1 px.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        factor = max(1, int(self.sigma // 6))  # keeps >= 6 coarse cells per sigma
        coarse = (2, math.ceil(height / factor), math.ceil(width / factor))
        fields = self.random_generator.standard_normal(coarse, dtype=np.float32)
        fields *= self.alpha / (factor * _expected_max_abs_normal(2 * height * width))
        maps = []
        for field, axis in zip(fields, (1, 0)):
            cv2.GaussianBlur(field, (0, 0), self.sigma / factor, dst=field, borderType=cv2.BORDER_REPLICATE)
            full = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
            grid = np.arange(width if axis == 1 else height, dtype=np.float32)
            maps.append(full + (grid[None, :] if axis == 1 else grid[:, None]))
        return {"map_x": maps[0], "map_y": maps[1]}


def _expected_max_abs_normal(count: int) -> float:
    """Median of the largest |z| among `count` standard normals: P(|z| > m) = ln 2 / count, solved by bisection."""
    target, low, high = math.log(2) / count, 0.0, 40.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if math.erfc(mid / math.sqrt(2)) > target else (low, mid)
    return (low + high) / 2


def seed_augment(aug: Augment, seed: int) -> None:
    """Gives every transform of `aug` one shared numpy Generator and one random.Random, both seeded by `seed`.

    Not Compose(seed=…) nor Compose.set_random_seed: those give each transform its *own* generator with the *same*
    seed, so transforms with equal probabilities fire together (with seed=3, HorizontalFlip and VerticalFlip were
    always applied as a pair: 96 of 200 samples both, 104 neither).
    """
    if seed < 0:
        raise ValueError(f"seed_augment: seed must be >= 0, got {seed}")
    aug.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 on any device -> float32 ImageNet-normalised, in the input's memory format."""
    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(
            f"normalize expects a (B, 3, H, W) uint8 tensor; got {tuple(image.shape)} {image.dtype} "
            "(normalise once, on the raw batch)"
        )
    # (x/255 - mean)/std folded into one subtract and one multiply on the 0-255 scale.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) * 255.0)
    return (image.to(torch.float32) - mean) * inv_std
