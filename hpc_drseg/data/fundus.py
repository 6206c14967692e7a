"""Synthetic DDR-like fundus photographs: an illuminated retina with optic disc, macula and vessel tree, and the four
lesion types painted with their masks (same prevalence and sizes as DDR), as arrays. Written to disk by synth.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError

# DDR: images containing each lesion, of 757 (Jithesh et al., sec. III-A; docs/method.md).
PREVALENCE: dict[str, float] = {"MA": 570 / 757, "EX": 486 / 757, "SE": 239 / 757, "HE": 601 / 757}
# A few images hold no lesion at all; the per-lesion draws are rescaled so PREVALENCE still holds on average.
LESION_FREE_P = 0.03
# Lesion sizes below are in px of a ~1250 px fundus photo (the middle of 1000-1500 px); they scale with the image.
REFERENCE_PX = 1250.0
MIN_SIDE_PX = 64

# RGB colours painted before the illumination fall-off; lesion colours are what makes the classes separable.
_LESION_RGB: dict[str, tuple[float, float, float]] = {
    "MA": (92.0, 14.0, 10.0),  # dark red dot
    "HE": (105.0, 20.0, 14.0),  # dark red blot
    "EX": (250.0, 222.0, 95.0),  # bright yellow, sharp edges
    "SE": (238.0, 228.0, 190.0),  # pale whitish yellow, fluffy
}
# Fraction of each channel a full-strength vessel removes: veins keep relatively more red, as in real photos.
_VESSEL_ABSORB = np.array([0.55, 0.74, 0.66], np.float32)[:, None, None]


@dataclass(frozen=True)
class _Eye:
    """Geometry of one synthetic fundus photo (px, image coordinates, x right, y down)."""

    height: int
    width: int
    cx: float
    cy: float
    radius: float  # field-of-view circle
    disc: tuple[float, float]
    disc_radius: float
    macula: tuple[float, float]
    side: int  # +1: optic disc right of the centre, so temporal (towards the macula) is -x
    scale: float  # image px per reference px


# -------------------------------------------------------------------------------------------------- geometry
def _draw_eye(rng: np.random.Generator, height: int, width: int) -> _Eye:
    # The field of view fills most of the width; on landscape frames it is clipped at top and bottom, as in DDR.
    radius = 0.5 * width * rng.uniform(0.86, 0.97)
    cx = width / 2 + rng.uniform(-0.02, 0.02) * width
    cy = height / 2 + rng.uniform(-0.02, 0.02) * height
    side = 1 if rng.random() < 0.5 else -1
    disc = (cx + side * rng.uniform(0.28, 0.38) * radius, cy + rng.uniform(-0.08, 0.08) * radius)
    macula = (cx - side * rng.uniform(0.04, 0.12) * radius, cy + rng.uniform(-0.05, 0.05) * radius)
    disc_radius = rng.uniform(0.075, 0.095) * radius
    scale = min(height, width) / REFERENCE_PX
    return _Eye(height, width, cx, cy, radius, disc, disc_radius, macula, side, scale)


def image_shape(rng: np.random.Generator, size_px: int) -> tuple[int, int]:
    width = max(MIN_SIDE_PX, round(size_px * rng.uniform(0.85, 1.15)))
    if rng.random() < 0.4:
        return width, width
    return max(MIN_SIDE_PX, round(size_px * rng.uniform(0.85, 1.15))), width


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell_px: float) -> np.ndarray:
    """Zero-mean, unit-ish (H, W) float32 noise with features about `cell_px` across."""
    grid = rng.standard_normal((int(height / cell_px) + 3, int(width / cell_px) + 3), dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _grid_d2(eye: _Eye) -> np.ndarray:
    """(H, W) squared distance to the field-of-view centre, in units of the radius²."""
    ys = (np.arange(eye.height, dtype=np.float32) - eye.cy) / eye.radius
    xs = (np.arange(eye.width, dtype=np.float32) - eye.cx) / eye.radius
    return ys[:, None] ** 2 + xs[None, :] ** 2


# ------------------------------------------------------------------------------------------------ anatomy
def _background(rng: np.random.Generator, eye: _Eye) -> np.ndarray:
    """Orange-red retina, planar (3, H, W) float32, with choroidal mottling, before illumination fall-off.

    Planar because numpy broadcasts an (H, W) factor over a leading axis ~10x faster than over a trailing 3.
    """
    base = np.array([rng.uniform(180, 228), rng.uniform(72, 112), rng.uniform(24, 56)], np.float32)
    mottle = 0.035 * _smooth_noise(rng, eye.height, eye.width, max(4.0, eye.height / 16))
    mottle += 0.02 * _smooth_noise(rng, eye.height, eye.width, max(2.0, eye.height / 120))
    return base[:, None, None] * (1.0 + mottle[None])


def _patch_window(shape: tuple[int, ...], x0: int, y0: int, h: int, w: int) -> tuple[slice, ...] | None:
    """(image rows, image cols, patch rows, patch cols) where an h×w patch at (x0, y0) overlaps an (H, W) image."""
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(shape[0], y0 + h), min(shape[1], x0 + w)
    if bottom <= top or right <= left:
        return None
    return slice(top, bottom), slice(left, right), slice(top - y0, bottom - y0), slice(left - x0, right - x0)


def _blend_patch(image: np.ndarray, alpha: np.ndarray, x0: int, y0: int, rgb: np.ndarray) -> None:
    """Blends `rgb` (3,) into the planar `image` under a local `alpha` patch whose top-left corner is (x0, y0)."""
    window = _patch_window(image.shape[1:], x0, y0, *alpha.shape)
    if window is not None:
        ys, xs, pys, pxs = window
        region = image[:, ys, xs]
        region += alpha[None, pys, pxs] * (rgb[:, None, None] - region)


def _ramp(signed_px: np.ndarray, edge_px: float) -> np.ndarray:
    """Alpha from a signed distance inside a boundary (px): 0.5 on it, linear over `edge_px`, clipped to [0, 1]."""
    alpha = signed_px / edge_px
    alpha += 0.5
    np.maximum(alpha, 0.0, out=alpha)  # in place: np.clip's Python wrapper costs more than the work on small patches
    return np.minimum(alpha, 1.0, out=alpha)


def _ellipse_alpha(x: float, y: float, rx: float, ry: float, edge_px: float) -> tuple[np.ndarray, int, int]:
    """Soft-edged axis-aligned ellipse: alpha patch and its top-left corner."""
    x0, y0 = int(x - rx - 2 * edge_px - 2), int(y - ry - 2 * edge_px - 2)
    x1, y1 = int(x + rx + 2 * edge_px + 3), int(y + ry + 2 * edge_px + 3)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - y
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] - x
    # Distance outside the ellipse, approximately in px: (normalised radius - 1) x mean radius.
    rho = np.sqrt((xs / rx) ** 2 + (ys / ry) ** 2)
    alpha = _ramp((1.0 - rho) * (0.5 * (rx + ry)), edge_px)
    return alpha, x0, y0


def _paint_disc_and_macula(rng: np.random.Generator, image: np.ndarray, eye: _Eye) -> None:
    mx, my = eye.macula
    sigma = rng.uniform(0.08, 0.12) * eye.radius
    alpha, x0, y0 = _ellipse_alpha(mx, my, 2.5 * sigma, 2.5 * sigma, sigma)
    _blend_patch(image, alpha * rng.uniform(0.2, 0.35), x0, y0, np.array([95, 30, 14], np.float32))
    dx, dy = eye.disc
    rx = eye.disc_radius
    ry = rx * rng.uniform(1.0, 1.2)  # the optic disc is slightly taller than wide
    alpha, x0, y0 = _ellipse_alpha(dx, dy, rx * 1.25, ry * 1.25, 0.25 * rx)
    _blend_patch(image, 0.35 * alpha, x0, y0, np.array([235, 150, 80], np.float32))  # peripapillary halo
    alpha, x0, y0 = _ellipse_alpha(dx, dy, rx, ry, max(1.0, 0.06 * rx))
    _blend_patch(image, 0.9 * alpha, x0, y0, np.array([250, 215, 150], np.float32))
    cup = rng.uniform(0.3, 0.5)
    alpha, x0, y0 = _ellipse_alpha(dx + eye.side * 0.1 * rx, dy, cup * rx, cup * ry, 0.3 * cup * rx)
    _blend_patch(image, 0.8 * alpha, x0, y0, np.array([255, 245, 215], np.float32))


def _vessel_roots(rng: np.random.Generator, eye: _Eye) -> dict[str, np.ndarray]:
    """Start of every vessel tree: a vein and an artery per main arcade, plus small vessels towards the macula."""
    s = eye.side
    bend = 1.7 / 48  # temporal arcades turn by ~100° around the macula over ~48 steps
    trunks = [  # (start angle, curl per step, length in radii, calibre factor)
        (-math.pi / 2 - s * 0.35, -s * bend, 1.25, 1.0),  # superior temporal
        (math.pi / 2 + s * 0.35, s * bend, 1.25, 1.0),  # inferior temporal
        (-math.pi / 2 + s * 0.6, s * 0.4 * bend, 0.75, 0.7),  # superior nasal
        (math.pi / 2 - s * 0.6, -s * 0.4 * bend, 0.75, 0.7),  # inferior nasal
    ]
    calibre0 = max(1.5, 13.0 * eye.scale)  # main vein calibre at the disc, px
    rows = []  # (offset from disc centre in disc radii, angle, curl, calibre, length px, kind: 0 vein, 1 artery)
    for angle, curl, length, factor in trunks:
        for kind, width in ((0, 1.0), (1, 0.7)):
            a = angle + rng.normal(0.0, 0.12)
            rows.append((0.3, a, curl, calibre0 * factor * width, length * eye.radius * rng.uniform(0.85, 1.1), kind))
    to_macula = math.atan2(eye.macula[1] - eye.disc[1], eye.macula[0] - eye.disc[0])
    for _ in range(int(rng.integers(3, 7))):
        a = to_macula + rng.uniform(-0.9, 0.9)
        rows.append((1.0, a, rng.normal(0.0, 0.02), 0.3 * calibre0, rng.uniform(0.15, 0.3) * eye.radius, 1))
    offset, angle, curl, calibre, length, kind = (np.array(column) for column in zip(*rows))
    start = complex(*eye.disc) + offset * eye.disc_radius * np.exp(1j * angle)
    return {"start": start, "angle": angle, "curl": curl, "calibre": calibre, "length": length, "kind": kind}


def _grow_level(rng: np.random.Generator, eye: _Eye, v: dict[str, np.ndarray]) -> tuple[tuple, dict[str, np.ndarray]]:
    """Random walks of all vessels of one branching level at once (rows: vessels, columns: steps).

    Returns the kept segments (start, end as x + iy, calibre px, kind) and the next level's vessels, which fork off
    with probability 0.1 per step; a vessel thins to ~40 % of its calibre and loses 10 % at each fork.
    """
    step = 0.025 * eye.radius
    n_steps = np.maximum(1, (v["length"] / step).astype(int))
    k = np.arange(n_steps.max())
    valid = k < n_steps[:, None]
    fork = (rng.random(valid.shape) < 0.1) & valid
    calibres = v["calibre"][:, None] * 0.4 ** (k / n_steps[:, None]) * 0.9 ** (np.cumsum(fork, 1) - fork)
    wander = rng.standard_normal(valid.shape) * (0.06 + 0.12 / (1.0 + calibres))  # thin vessels wander more
    angles = v["angle"][:, None] + np.cumsum(v["curl"][:, None] + wander, axis=1)
    ends = v["start"][:, None] + np.cumsum(step * np.exp(1j * angles), axis=1)
    inside = np.abs(ends - complex(eye.cx, eye.cy)) < 0.97 * eye.radius
    keep = np.cumprod(valid & inside & (calibres >= 0.4), axis=1).astype(bool)  # a vessel ends at its first miss
    starts = np.concatenate([v["start"][:, None], ends[:, :-1]], axis=1)
    kinds = np.broadcast_to(v["kind"][:, None], keep.shape)
    segments = (starts[keep], ends[keep], calibres[keep], kinds[keep])
    rows, cols = np.nonzero(fork & keep & (calibres > 0.8))
    n = len(rows)
    children = {
        "start": ends[rows, cols],
        "angle": angles[rows, cols] + np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.1, n),
        "curl": rng.normal(0.0, 0.01, n),
        "calibre": calibres[rows, cols] * rng.uniform(0.5, 0.75, n),
        "length": (n_steps[rows] - cols) * step * rng.uniform(0.4, 0.9, n),
        "kind": v["kind"][rows],
    }
    return segments, children


def _vessel_map(rng: np.random.Generator, eye: _Eye) -> np.ndarray:
    """(H, W) float32 vessel density in [0, 1]: veins at full strength, arteries (thinner, paler) at 0.7."""
    vessels, levels = _vessel_roots(rng, eye), []
    while len(vessels["start"]):
        segments, vessels = _grow_level(rng, eye, vessels)
        levels.append(segments)
    starts, ends, calibres, kinds = (np.concatenate(column) for column in zip(*levels))
    widths = np.maximum(1, np.rint(calibres)).astype(np.int64)
    # Thin vessels fade; 8 grey levels keep the number of (kind, width, level) groups, one cv2 call each, small.
    levels_u8 = 32 * np.rint(8 * np.minimum(1.0, 0.35 + 0.65 * calibres / 1.5)).astype(np.int64) - 1
    points = np.stack([starts, ends], axis=1).view(np.float64).reshape(-1, 2, 2)
    points = np.rint(points * 16).astype(np.int32)  # drawn with shift=4: 1/16-px precision
    keys = (kinds * 4096 + widths) * 1024 + levels_u8  # sorted: thin first, so thick trunks stay on top
    order = np.argsort(keys, kind="stable")
    bounds = [0, *(1 + np.flatnonzero(np.diff(keys[order]))).tolist(), len(order)]
    canvases = np.zeros((2, eye.height, eye.width), np.uint8)
    for lo, hi in zip(bounds, bounds[1:]):
        first = order[lo]
        lines = list(points[order[lo:hi]])
        cv2.polylines(canvases[kinds[first]], lines, False, int(levels_u8[first]), int(widths[first]), cv2.LINE_AA, 4)
    density = np.maximum(canvases[0].astype(np.float32) / 255.0, 0.7 * canvases[1].astype(np.float32) / 255.0)
    return cv2.GaussianBlur(density, (0, 0), sigmaX=max(0.5, 0.9 * eye.scale))


# ------------------------------------------------------------------------------------------------ lesions
def _blob_alpha(
    rng: np.random.Generator, x: float, y: float, radius: float, edge_px: float, wobble: float, elongation: float
) -> tuple[np.ndarray, int, int]:
    """Irregular, rotated, soft-edged ellipse centred at (x, y): alpha patch in [0, 1] and its top-left corner.

    The boundary radius varies with the angle by at most ±`wobble` (harmonics 2-5), so alpha ≥ 0.5 always covers
    the pixel nearest the centre when radius · (1 - wobble) ≥ 0.71 px.
    """
    half = int(math.ceil(radius * elongation * (1 + wobble) + 2 * edge_px + 2))
    x0, y0 = int(math.floor(x)) - half, int(math.floor(y)) - half
    dy = np.arange(y0, y0 + 2 * half + 1, dtype=np.float32)[:, None] - y
    dx = np.arange(x0, x0 + 2 * half + 1, dtype=np.float32)[None, :] - x
    rot = rng.uniform(0.0, math.pi)
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / elongation
    v = dy * math.cos(rot) - dx * math.sin(rot)
    rho = np.hypot(u, v)
    if wobble == 0.0:
        return _ramp(radius - rho, edge_px), x0, y0
    harmonics = np.arange(2, 6, dtype=np.float32)[:, None, None]
    amplitudes = rng.uniform(0.0, 1.0, (4, 1, 1)).astype(np.float32) / harmonics
    amplitudes *= wobble / max(float(amplitudes.sum()), 1e-6)
    phases = rng.uniform(0, 2 * math.pi, (4, 1, 1)).astype(np.float32)
    ripple = (amplitudes * np.cos(harmonics * np.arctan2(v, u) + phases)).sum(axis=0)
    return _ramp(radius * (1.0 + ripple) - rho, edge_px), x0, y0


def _sample_point(rng: np.random.Generator, eye: _Eye, centre: tuple[float, float], spread: float) -> tuple[float, ...]:
    """A Gaussian point around `centre` (spread in radii), inside 0.88 of the FOV and the frame, off the disc."""
    for _ in range(50):
        x = centre[0] + rng.normal(0.0, spread) * eye.radius
        y = centre[1] + rng.normal(0.0, spread) * eye.radius
        inside = (x - eye.cx) ** 2 + (y - eye.cy) ** 2 < (0.88 * eye.radius) ** 2
        in_frame = 0.02 * eye.height < y < 0.98 * eye.height
        off_disc = (x - eye.disc[0]) ** 2 + (y - eye.disc[1]) ** 2 > (1.3 * eye.disc_radius) ** 2
        if inside and in_frame and off_disc:
            return x, y
    return eye.macula


def _count(rng: np.random.Generator, mean: float, cap: int) -> int:
    """At least one, geometrically distributed with the given mean, at most `cap`: few lesions often, many rarely."""
    return min(cap, int(rng.geometric(1.0 / max(1.0, mean))))


def _lesion_blobs(rng: np.random.Generator, eye: _Eye, lesion: str, severity: float) -> list[tuple[float, ...]]:
    """(x, y, radius px, edge px, wobble, elongation) of every lesion of one kind, sizes as in DDR."""
    s, blobs = eye.scale, []
    if lesion == "MA":  # 2-8 px across, scattered over the posterior pole
        for _ in range(_count(rng, 8 * severity, 60)):
            x, y = _sample_point(rng, eye, eye.macula, 0.3)
            blobs.append((x, y, max(1.0, 0.5 * s * rng.uniform(2, 8)), 0.7, 0.0, rng.uniform(1.0, 1.3)))
    elif lesion == "HE":  # dot-blot (10-60 px) and some elongated flame haemorrhages
        for _ in range(_count(rng, 4 * severity, 30)):
            x, y = _sample_point(rng, eye, eye.macula, 0.4)
            elongation = rng.uniform(1.8, 3.0) if rng.random() < 0.3 else rng.uniform(1.0, 1.5)
            radius = max(1.5, 0.5 * s * math.exp(rng.uniform(math.log(10), math.log(60))) / math.sqrt(elongation))
            blobs.append((x, y, radius, max(0.8, 1.5 * s), 0.2, elongation))
    elif lesion == "EX":  # clusters of small sharp patches, often in a ring around the macula
        for _ in range(_count(rng, 2.5 * severity, 8)):
            cx, cy = _sample_point(rng, eye, eye.macula, 0.22)
            spread = rng.uniform(0.015, 0.05)
            for _ in range(_count(rng, 8.0, 25)):
                x, y = _sample_point(rng, eye, (cx, cy), spread)
                radius = max(1.0, 0.5 * s * math.exp(rng.uniform(math.log(3), math.log(24))))
                blobs.append((x, y, radius, 0.6, 0.3, rng.uniform(1.0, 1.6)))
    else:  # SE: cotton-wool spots along the arcades near the disc, 20-80 px, soft edges
        for _ in range(_count(rng, 1.5 * severity, 6)):
            x, y = _sample_point(rng, eye, eye.disc, 0.3)
            radius = max(1.5, 0.5 * s * rng.uniform(20, 80))
            blobs.append((x, y, radius, 0.45 * radius, 0.25, rng.uniform(1.0, 1.6)))
    return blobs


def _paint_lesion(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, inside: np.ndarray, lesion: str, blob: tuple
) -> None:
    """Paints one lesion and marks in `mask` exactly the pixels painted with alpha ≥ 0.5 (inside the FOV)."""
    x, y, radius, edge_px, wobble, elongation = blob
    alpha, x0, y0 = _blob_alpha(rng, x, y, radius, edge_px, wobble, elongation)
    alpha *= {"MA": 0.92, "HE": 0.9, "EX": 0.95, "SE": 0.85}[lesion]  # peak opacity
    if lesion == "SE":  # fluffy: cotton-wool spots are translucent with a mottled texture
        alpha *= 0.9 + 0.1 * _smooth_noise(rng, *alpha.shape, max(1.5, radius / 2))
        np.minimum(alpha, 1.0, out=alpha)
    window = _patch_window(image.shape[1:], x0, y0, *alpha.shape)
    if window is None:
        return
    ys, xs, pys, pxs = window
    alpha = alpha[pys, pxs] * inside[ys, xs]
    painted = alpha >= 0.5
    if not painted.any():
        return  # too small to cover a pixel: paint nothing rather than an unlabelled smudge
    tint = np.minimum(np.array(_LESION_RGB[lesion], np.float32) * rng.uniform(0.9, 1.08), 255.0)
    region = image[:, ys, xs]
    region += alpha[None] * (tint[:, None, None] - region)
    mask[ys, xs] |= painted


def _paint_lesions(rng: np.random.Generator, image: np.ndarray, eye: _Eye, inside: np.ndarray) -> dict[str, np.ndarray]:
    lesion_free = rng.random() < LESION_FREE_P
    severity = rng.lognormal(0.0, 0.35)
    masks = {}
    for lesion in LESIONS:
        present = rng.random() < PREVALENCE[lesion] / (1.0 - LESION_FREE_P)
        mask = np.zeros((eye.height, eye.width), bool)
        if present and not lesion_free:
            for blob in _lesion_blobs(rng, eye, lesion, severity):
                _paint_lesion(rng, image, mask, inside, lesion, blob)
        masks[lesion] = mask
    return masks


def _expose(rng: np.random.Generator, image: np.ndarray, eye: _Eye, d2: np.ndarray) -> np.ndarray:
    """Camera: illumination falling off towards the rim, soft 1.5-px FOV edge, black border, noise → RGB uint8."""
    falloff, tilt = rng.uniform(0.45, 0.7), rng.uniform(-0.08, 0.08)
    # gain = 1 - falloff·d²·(1 + d²)/2 + tilt·(d² - 1/2), in Horner form to keep full-frame passes few.
    gain = (-0.5 * falloff * d2 + (tilt - 0.5 * falloff)) * d2 + (1.0 - 0.5 * tilt)
    fov = np.sqrt(d2)
    fov *= -eye.radius / 1.5
    fov += eye.radius / 1.5 + 0.5
    gain *= np.clip(fov, 0.0, 1.0, out=fov)
    image *= gain[None]
    # Uniform sensor noise (σ ≈ 1.6 grey levels) from bytes: a Gaussian draw costs ~8x more at this size.
    noise = rng.integers(0, 256, d2.shape, dtype=np.uint8).astype(np.float32)
    noise *= 5.5 / 255.0
    noise += 2.0 - 2.75
    image += noise[None]
    planes = np.clip(image, 0.0, 255.0, out=image).astype(np.uint8)
    return cv2.merge(list(planes))


def render_fundus(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One synthetic fundus photo: RGB uint8 (H, W, 3) and {lesion: uint8 (H, W) mask of 0/255} for every lesion."""
    if min(height, width) < MIN_SIDE_PX:
        raise InputError(f"render_fundus: got {height}x{width} px; both sides must be >= {MIN_SIDE_PX}")
    eye = _draw_eye(rng, height, width)
    image = _background(rng, eye)
    _paint_disc_and_macula(rng, image, eye)
    image *= 1.0 - _vessel_map(rng, eye)[None] * _VESSEL_ABSORB
    d2 = _grid_d2(eye)
    inside = d2 <= ((eye.radius - 2.0) / eye.radius) ** 2  # lesion masks stay 2 px clear of the rim
    masks = _paint_lesions(rng, image, eye, inside)
    rgb = _expose(rng, image, eye, d2)
    return rgb, {lesion: masks[lesion].view(np.uint8) * np.uint8(255) for lesion in LESIONS}
