"""Training-time augmentation of Jithesh et al. (ICMLA 2025), ported to albumentations 2.x. The paper's values are
below (docs/method.md lists them); old 1.x argument names are silently ignored by 2.x, so every transform below is
built with its 2.x names and Compose(strict=True) turns any leftover into an error.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for updates at import; compute nodes have no network (the package __init__ sets this too).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import functools  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from typing import Any, Optional  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpc_drseg.config import AugmentConfig  # noqa: E402
from hpc_drseg.config.choices import AUGMENT_BORDERS, AugmentBorder  # noqa: E402
from hpc_drseg.constants import LESIONS  # noqa: E402
from hpc_drseg.errors import InputError  # noqa: E402

# The paper's probability per transform. OneOf members keep theirs as selection weights: OneOf normalises them and then
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

# The paper's parameter ranges, shared with the on-device pipeline (data/device_augment/), which draws the same ones.
AFFINE_TRANSLATE = (-0.0625, 0.0625)  # fraction of the side, x and y independently (1.x ShiftScaleRotate's shift)
AFFINE_SCALE = (0.9, 1.1)  # one isotropic scale
AFFINE_ROTATE_DEG = (-15.0, 15.0)
BRIGHTNESS = (-0.2, 0.2)  # fraction of 255 added
CONTRAST = (-0.2, 0.2)  # 1 + this multiplies
GAMMA_PERCENT = (80, 120)  # gamma = this / 100
HSV_SHIFTS = ((-10.0, 10.0), (-15.0, 15.0), (-10.0, 10.0))  # hue (OpenCV units of 2 degrees), saturation, value
# 1.x var_limit (10, 50) was a variance on the 0-255 scale; 2.x std_range is a standard deviation / 255.
NOISE_STD = (math.sqrt(10) / 255, math.sqrt(50) / 255)
ELASTIC_ALPHA_PX, ELASTIC_SIGMA_PX = 1.0, 50.0  # at _PAPER_PX; scaled with the image side
GRID_STEPS, GRID_DISTORT = 5, (-0.3, 0.3)  # albumentations' defaults, which the paper's code used
OPTICAL_DISTORT = (-1.0, 1.0)

# The paper's code ran albumentations 1.x GaussianBlur(blur_limit=3): kernel size 3 and sigma 0, handed to
# cv2.GaussianBlur, which for sigma 0 and a size up to 7 takes its fixed table, [1, 2, 1] / 4, not the 0.3·(…) + 0.8
# rule (σ 0.8 would weigh [0.239, 0.522, 0.239]). 2.x samples its 3 taps exp(-x² / 2σ²), which equal [1, 2, 1] / 4
# at σ = 1 / sqrt(2 ln 2) ≈ 0.849; 2.x's default sigma range (0.5, 3.0) would blur up to an almost flat box.
PAPER_BLUR_SIGMA = 1.0 / math.sqrt(2.0 * math.log(2.0))

# cv2 border modes of `data.augment.border`. albumentations 1.x, the paper's code, defaulted every geometric
# transform to BORDER_REFLECT_101 (image and mask mirrored into what a warp uncovers); 2.x defaults to constant 0.
_BORDER_MODES: dict[str, int] = {"reflect_101": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


class Augment:
    """`(image H×W×3 uint8, mask H×W×4 uint8 0/1) -> (image, mask)`, the same shapes and dtypes.

    Geometric transforms move the 4-channel mask with nearest interpolation and fill its border as the image's
    (mirrored, or 0: `data.augment.border`); photometric ones touch the image only. The random state belongs to this
    object (albumentations ignores the global RNGs): see `reseed`.
    """

    def __init__(self, compose: A.Compose, image_px: int) -> None:
        self.compose = compose
        self.image_px = image_px

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        side = self.image_px
        if image.shape != (side, side, 3) or mask.shape != (side, side, len(LESIONS)):
            raise InputError(
                f"augment expects image ({side}, {side}, 3) and mask ({side}, {side}, {len(LESIONS)}); got "
                f"{image.shape} and {mask.shape}: re-shard at data.image_px={side} or set data.image_px to the shards'"
            )
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]

    def reseed(self, seed: int) -> None:
        """Makes the random stream a function of `seed` alone; `seed_augment` has the details.

        data/pipeline.py calls this before each sample with sample_seed(seed, epoch, position): the augmentation of a
        sample then depends on nothing else (worker count, forked generator state, skipped batches on resume).
        """
        seed_augment(self, seed)

    def __repr__(self) -> str:
        return f"Augment(image_px={self.image_px}, {self.compose!r})"


def build_augment(cfg: AugmentConfig, image_px: int, seed: int | None = None, stock: bool = False) -> Augment | None:
    """Builds the preset named by `cfg` for square images of side `image_px`; None when nothing would be applied.

    `cfg.strength` multiplies the probability of every top-level transform and OneOf block (clipped to 1); the
    weights inside a OneOf are relative, so they keep the paper's values. `seed`: see `Augment.reseed`.
    Two transforms are faster drop-in subclasses with the same random draws and the same output
    (`ElasticTransformLowRankBlur`, `RandomRotate90CV`); `stock=True` builds albumentations' own classes instead,
    the reference the tests compare against and `drseg bench data` times side by side.
    """
    if image_px <= 0:
        raise InputError(f"image_px: got {image_px}; it must be > 0 (data.image_px)")
    if cfg.border not in AUGMENT_BORDERS:
        raise InputError(f"data.augment.border: got {cfg.border!r}; choose one of {list(AUGMENT_BORDERS)}")
    if cfg.preset == "none" or cfg.strength == 0:
        return None
    if cfg.preset == "paper":
        transforms = _paper_transforms(cfg.strength, image_px, stock, cfg.border)
    elif cfg.preset == "light":
        transforms = _flips(cfg.strength, stock)
    else:
        raise InputError(f"data.augment.preset: got {cfg.preset!r}; choose one of 'paper', 'light', 'none'")
    # strict: an argument name that 2.x does not know raises instead of being ignored with a warning.
    compose = A.Compose(transforms, strict=True, mask_interpolation=cv2.INTER_NEAREST)
    aug = Augment(compose, image_px)
    if seed is not None:
        seed_augment(aug, seed)
    return aug


def _p(name: str, strength: float) -> float:
    return min(1.0, PAPER_P[name] * strength)


def _flips(strength: float, stock: bool = False) -> list[A.BasicTransform]:
    rotate90 = A.RandomRotate90 if stock else RandomRotate90CV
    return [
        A.HorizontalFlip(p=_p("HorizontalFlip", strength)),
        A.VerticalFlip(p=_p("VerticalFlip", strength)),
        rotate90(p=_p("RandomRotate90", strength)),
    ]


def _paper_transforms(
    strength: float, image_px: int, stock: bool = False, border: AugmentBorder = "reflect_101"
) -> list[Any]:
    # fill and fill_mask are read only with the constant border; flips and 90° rotations never leave the image.
    geometric_border = {"border_mode": _BORDER_MODES[border], "fill": 0, "fill_mask": 0}
    # 1.x ShiftScaleRotate: one isotropic scale (keep_ratio), independent x/y shifts, no shear.
    affine = A.Affine(
        translate_percent={"x": AFFINE_TRANSLATE, "y": AFFINE_TRANSLATE},
        scale=AFFINE_SCALE,
        keep_ratio=True,
        rotate=AFFINE_ROTATE_DEG,
        shear=0.0,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        p=_p("Affine", strength),
        **geometric_border,
    )
    colour = A.OneOf(
        [
            A.RandomBrightnessContrast(brightness_limit=BRIGHTNESS, contrast_limit=CONTRAST, p=0.4),
            A.RandomGamma(gamma_limit=GAMMA_PERCENT, p=0.4),
            A.HueSaturationValue(
                hue_shift_limit=HSV_SHIFTS[0], sat_shift_limit=HSV_SHIFTS[1], val_shift_limit=HSV_SHIFTS[2], p=0.4
            ),
        ],
        p=_p("colour", strength),
    )
    noise = A.GaussNoise(std_range=NOISE_STD, p=_p("GaussNoise", strength))
    # (3, 3): a fixed 3×3 kernel. A bare 3 means (0, 3) in 2.x, and 0 derives kernels up to 21 px from sigma.
    blur = A.GaussianBlur(
        blur_limit=(3, 3), sigma_limit=(PAPER_BLUR_SIGMA, PAPER_BLUR_SIGMA), p=_p("GaussianBlur", strength)
    )
    px_scale = image_px / _PAPER_PX  # elastic alpha and sigma are in pixels: keep the paper's field at other sizes
    elastic = (A.ElasticTransform if stock else ElasticTransformLowRankBlur)(
        alpha=ELASTIC_ALPHA_PX * px_scale, sigma=ELASTIC_SIGMA_PX * px_scale, p=0.15, **geometric_border
    )
    if isinstance(elastic, ElasticTransformLowRankBlur):
        elastic.blur_factors(image_px, image_px)  # now, so forked loader workers inherit them (the SVD takes ~0.5 s)
    distortion = A.OneOf(
        [
            elastic,
            A.GridDistortion(num_steps=GRID_STEPS, distort_limit=GRID_DISTORT, p=0.15, **geometric_border),
            A.OpticalDistortion(distort_limit=OPTICAL_DISTORT, mode="camera", p=0.15, **geometric_border),
        ],
        p=_p("distortion", strength),
    )
    return [*_flips(strength, stock), affine, colour, noise, blur, distortion]


class RandomRotate90CV(A.RandomRotate90):
    """A.RandomRotate90 with the same draws and byte-identical output, rotating with cv2.rotate.

    2.x returns np.rot90's strided view, which is then copied element by element (~2.5 ms per 512² image + mask);
    cv2.rotate writes the contiguous result directly (~0.3 ms). np.rot90 turns counter-clockwise.
    """

    _CV_CODES = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

    def apply(self, img: np.ndarray, factor: int, **params: Any) -> np.ndarray:
        if factor % 4 == 0:
            return img
        # cv2 handles 2-D arrays and 3-D ones with 2..4 channels (it would drop a trailing channel axis of size 1)
        if img.ndim == 2 or (img.ndim == 3 and 2 <= img.shape[2] <= 4):
            return cv2.rotate(np.ascontiguousarray(img), self._CV_CODES[factor % 4])
        return np.ascontiguousarray(np.rot90(img, factor))


Factors = tuple[torch.Tensor, torch.Tensor]
"""(left (n, r), right (r, n)): a blur matrix ≈ left @ right."""


class ElasticTransformLowRankBlur(A.ElasticTransform):
    """A.ElasticTransform (albumentations 2.x, Gaussian noise) with the same random draws and the same displacement
    field up to 2e-4·alpha px, about 5× faster.

    2.x draws unit normal noise for dx and dy, divides it by its largest |value|, blurs the two fields *stacked* as
    one (2H, W) image with OpenCV's 8σ+1-tap Gaussian (401 taps at σ 50, replicate border; so the bottom rows of dx
    bleed into the top rows of dy, a quirk kept here) and scales by alpha. The blur is ~90 % of the transform's time.
    A Gaussian that wide is numerically low-rank: written as a matrix (border folded in) it is the product of two
    thin factors (rank ~24 for 512 rows, ~40 for 1024), so blurring becomes four thin matrix products (~3 ms).
    Each axis's factorisation errs by at most 1e-4 in the max-row-sum norm, so the field (|noise| <= 1) errs by at
    most 2e-4·alpha px (~1e-5 in practice): far below cv2.remap's 1/32-px resolution, so the warped image and mask
    are the stock transform's, up to a rare ±1 at a rounding boundary (the tests compare them).
    """

    def blur_factors(self, height: int, width: int) -> Optional[tuple[Factors, Factors]]:
        """The (rows, columns) factorisations for (height, width) images (cached), or None where the low-rank path
        does not apply: options it does not reproduce, or a kernel too narrow to be low-rank."""
        if self.approximate or self.same_dxdy or self.noise_distribution != "gaussian":
            return None
        rows, cols = low_rank_blur_factors(2 * height, self.sigma), low_rank_blur_factors(width, self.sigma)
        return (rows, cols) if rows and cols else None

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        factors = self.blur_factors(height, width)
        if factors is None:
            return super().get_params_dependent_on_data(params, data)
        rows, cols = factors
        fields = self.random_generator.standard_normal((2, height, width), dtype=np.float32)  # the stock draw
        max_abs = np.abs(fields).max()
        if max_abs > 1e-6:
            fields /= max_abs
        noise = torch.from_numpy(fields.reshape(2 * height, width))
        # blur(x) = M_rows @ x @ M_cols^T with M = left @ right for each axis
        blurred = (rows[0] @ (rows[1] @ ((noise @ cols[1].T) @ cols[0].T))).numpy()
        blurred *= self.alpha
        return {
            "map_x": blurred[:height] + np.arange(width, dtype=np.float32),
            "map_y": blurred[height:] + np.arange(height, dtype=np.float32)[:, None],
        }


_LOW_RANK_MAX_ERROR = 1e-4  # per axis, max-row-sum norm of (blur matrix - its factorisation)
_LOW_RANK_MAX_RANK = 96  # beyond it the thin products cost about what OpenCV's direct blur does
_LOW_RANK_MAX_SPAN = 60  # n / sigma above which the rank needed (~1.6 n / sigma + 8) exceeds the cap: skip the SVD


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The n×n float64 matrix of OpenCV's GaussianBlur along one axis: kernel size and taps as cv2.GaussianBlur picks
    them for float images with ksize (0, 0), replicate border folded in (row i: the weights of output i)."""
    ksize = int(round(sigma * 8 + 1)) | 1  # cv2's choice for float32 input and ksize (0, 0)
    taps = cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F).ravel()
    source = np.clip(np.arange(n)[:, None] + np.arange(ksize)[None, :] - ksize // 2, 0, n - 1)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), ksize), source.ravel()), np.tile(taps, n))
    return matrix


@functools.lru_cache(maxsize=16)
def low_rank_blur_factors(n: int, sigma: float) -> Optional[Factors]:
    """(left (n, r), right (r, n)) float32 with left @ right ≈ the n×n matrix of OpenCV's GaussianBlur along one
    axis (kernel size and taps as cv2.GaussianBlur picks them for float images, replicate border), erring by at
    most _LOW_RANK_MAX_ERROR in the max-row-sum norm; None when that needs a rank above _LOW_RANK_MAX_RANK (narrow
    kernels, where the direct blur is cheap anyway)."""
    if sigma <= 0 or n / sigma > _LOW_RANK_MAX_SPAN:
        return None
    exact = torch.from_numpy(blur_matrix(n, sigma))
    u, s, vh = torch.linalg.svd(exact)
    for rank in range(8, min(n, _LOW_RANK_MAX_RANK) + 1, 8):
        left, right = u[:, :rank] * s[:rank], vh[:rank]
        if (exact - left @ right).abs().sum(dim=1).max() <= _LOW_RANK_MAX_ERROR:
            return left.float().contiguous(), right.float().contiguous()
    return None


def seed_augment(aug: Augment, seed: int) -> None:
    """Gives every transform of `aug` one shared numpy Generator and one random.Random, both seeded by `seed`.

    Not Compose(seed=…) nor Compose.set_random_seed: those give each transform its *own* generator with the *same*
    seed, so transforms with equal probabilities fire together (with seed=3, HorizontalFlip and VerticalFlip were
    always applied as a pair: 96 of 200 samples both, 104 neither).
    """
    if seed < 0:
        raise InputError(f"seed_augment: seed must be >= 0, got {seed}")
    aug.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
