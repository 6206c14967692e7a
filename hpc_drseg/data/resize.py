"""Resizing a DDR sample to the training side: images by area averaging, masks by one of the mask-resize rules
(`nearest`, the default and the paper code's; `area`; `any`), whose effect on lesion area docs/method.md measures.
"""

from __future__ import annotations

import cv2
import numpy as np

from hpc_drseg.config.choices import MASK_RESIZE_RULES
from hpc_drseg.errors import InputError

# One line per mask-resize rule, written into the manifest beside the rule's name (resize_mask has the details).
MASK_RESIZE_DESCRIPTIONS = {
    "nearest": "shrink = the source pixel under the target pixel's centre (INTER_NEAREST_EXACT; the paper code's "
    "rule, area-true on average), enlarge = nearest",
    "area": "shrink = lesion where it covers >= 1/2 of the target pixel's footprint (INTER_AREA >= 0.5; area-true), "
    "enlarge = nearest",
    "any": "per axis: shrink = any lesion coverage in the footprint (INTER_AREA > 0; keeps every microaneurysm, "
    "dilates lesion area), enlarge = nearest",
}
# A footprint exactly half covered must count for `area`; INTER_AREA's float32 weights of a non-integer scale sum to
# 1 only within ~1e-7, so the threshold sits a hair below 1/2.
_AREA_THRESHOLD = 0.5 - 1e-5


def resize_image(image: np.ndarray, image_px: int) -> np.ndarray:
    """(H, W, 3) uint8 → (image_px, image_px, 3): area averaging when shrinking (no aliasing), else bicubic."""
    height, width = image.shape[:2]
    if (height, width) == (image_px, image_px):
        return image.copy()
    shrinking = image_px * image_px <= height * width
    return cv2.resize(image, (image_px, image_px), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def resize_mask(mask: np.ndarray, image_px: int, rule: str = MASK_RESIZE_RULES[0]) -> np.ndarray:
    """(H, W, C) uint8 0/1 → (image_px, image_px, C) 0/1 by `rule`, one of MASK_RESIZE_RULES.

    An enlarged axis always takes the source pixel under each target pixel's centre (nearest, centre-aligned), which
    keeps every source pixel. A shrunk axis depends on the rule (measured in docs/method.md, 1600 → 512 px):
    - `nearest` (default): the source pixel under the target pixel's centre (INTER_NEAREST_EXACT), as the paper's
      code. Unbiased in area on average; a 1-3 px microaneurysm survives only if a sampled pixel falls on it.
    - `area`: lesion where it covers at least half of the target pixel's footprint (INTER_AREA of the 0/1 mask
      ≥ 0.5). Area-true for lesions larger than a footprint; erases lesions smaller than half a footprint.
    - `any`: lesion where any source pixel under the footprint is (INTER_AREA > 0 per axis: exact max-pooling).
      Keeps every microaneurysm but dilates every lesion by up to a footprint (MA area ×2.2, EX ×1.4 on synthetic
      1600 px images at 512 px), so a model trained on it learns fat lesions; native-resolution evaluation does not
      undo that.
    """
    if rule not in MASK_RESIZE_RULES:
        raise InputError(f"mask_resize: got {rule!r}; choose one of {list(MASK_RESIZE_RULES)} (CLI: --mask-resize)")
    if rule == "any":
        return _resize_mask_any(mask, image_px)
    height, width = mask.shape[:2]
    out = mask
    if image_px > height or image_px > width:  # enlarged axes first: nearest, exact on uint8, commutes with the rest
        out = _resized(out, (max(width, image_px), max(height, image_px)), cv2.INTER_NEAREST_EXACT)
    if out.shape[:2] != (image_px, image_px):
        size = (image_px, image_px)
        if rule == "nearest":
            out = _resized(out, size, cv2.INTER_NEAREST_EXACT)
        else:  # INTER_AREA of a 0/1 mask is the covered fraction of each target pixel's footprint
            out = (_resized(out.astype(np.float32), size, cv2.INTER_AREA) >= _AREA_THRESHOLD).astype(np.uint8)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _resized(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize to (width, height) that keeps a trailing channel axis of size 1 (cv2 drops it)."""
    out = cv2.resize(array, size, interpolation=interpolation)
    return out[..., None] if out.ndim == 2 and array.ndim == 3 else out


def _resize_mask_any(mask: np.ndarray, image_px: int) -> np.ndarray:
    """The `any` rule: per axis, shrink = INTER_AREA on 0/1 float32 then > 0 (max over the footprint), enlarge =
    nearest (centre-aligned)."""
    out = mask
    for axis in (1, 0):  # width, then height
        source = out.shape[axis]
        if source == image_px:
            continue
        size = (image_px, out.shape[0]) if axis == 1 else (out.shape[1], image_px)
        if image_px < source:
            out = (_resized(out.astype(np.float32), size, cv2.INTER_AREA) > 0).astype(np.uint8)
        else:
            out = _resized(out, size, cv2.INTER_NEAREST_EXACT)
    return np.ascontiguousarray(out, dtype=np.uint8)
