"""`drseg predict`: lesion maps for any fundus photo with a trained checkpoint (Jithesh et al., ICMLA 2025): an overlay
in the paper's colours, optional probabilities, and per-lesion counts and areas (the paper's "quantitative
measurements") in OUT/lesions.json. Images are processed one at a time, so memory stays bounded on large folders.
The probabilities come from hpc_drseg.inference.Predictor: the model built from the checkpoint's own config (never
reading the ImageNet file it may name); a file that is no run checkpoint, or whose weights do not fit, is one line.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from tqdm import tqdm

from hpc_drseg.atomic import atomic_write_bytes
from hpc_drseg.constants import LESION_COLOURS, LESIONS
from hpc_drseg.errors import InputError, MissingError
from hpc_drseg.inference import Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
FOV_LEVEL = 10  # 0-255: the black border of fundus photos stays below this, JPEG noise included
FOV_MIN_FRACTION = 0.1  # a smaller bright region means no usable border was found: use the whole image
FOV_METHOD = (
    f"pixels whose brightest channel (the red one in fundus photos) exceeds {FOV_LEVEL}/255, largest 8-connected "
    f"region, holes filled; the whole image when that region covers < {FOV_MIN_FRACTION:.0%} of it. Predictions "
    "outside the field of view are discarded."
)
OVERLAY_ALPHA = 0.45  # fill opacity: the retina under a lesion stays visible
DRAW_ORDER = ("SE", "EX", "HE", "MA")  # large, pale lesions first; MA last so 1-10 px dots stay on top


# ------------------------------------------------------------------------------------------------------ inputs
def list_images(inputs: Path) -> list[Path]:
    """A file → [it]; a folder → its image files (JPEG/PNG/TIFF/BMP, not recursive), sorted by name."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise MissingError(f"input {inputs} does not exist; give a fundus image or a folder of them")
    paths = sorted(p for p in inputs.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"folder {inputs} holds no image file ({', '.join(IMAGE_SUFFIXES)}); check the path")
    return paths


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; InputError for a corrupt, truncated or non-image file. 16-bit TIFFs become 8-bit."""
    try:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise InputError(f"{path}: OpenCV cannot decode it ({exc})") from exc
    if bgr is None or bgr.size == 0:
        raise InputError(f"{path}: not a readable image (corrupt, truncated or not JPEG/PNG/TIFF)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """Output name per input: its stem, or stem_<ext> when two inputs share a stem (a.jpg and a.png)."""
    stems = [p.stem for p in paths]
    return {p: p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths}


# ----------------------------------------------------------------------------------------------- measurements
def estimate_fov(image: np.ndarray) -> np.ndarray:
    """(H, W) bool field of view of a fundus photo (see FOV_METHOD)."""
    height, width = image.shape[:2]
    bright = (image.max(axis=2) > FOV_LEVEL).astype(np.uint8)
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    fov = np.zeros((height, width), np.uint8)
    if contours:
        # Filling the largest outer contour keeps one region and fills its holes (dark haemorrhages, vessels).
        cv2.drawContours(fov, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    if fov.sum() < FOV_MIN_FRACTION * height * width:
        return np.ones((height, width), bool)
    return fov.astype(bool)


def binarize(probs: np.ndarray, threshold: float, fov_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """(4, H, W) probabilities → bool lesion masks: prob > threshold (metrics.py's rule), inside the FOV only."""
    binary = probs > threshold
    return binary & fov_mask[None] if fov_mask is not None else binary


def measure_lesions(binary: np.ndarray, fov_mask: Optional[np.ndarray] = None) -> dict[str, dict[str, Any]]:
    """(4, H, W) binary masks in LESIONS order → {lesion: components, area_px, area_fov_fraction, largest_px}.

    Components are 8-connected; pixels outside `fov_mask` (H, W) are ignored; None as fov_mask = the whole image.
    area_fov_fraction is None when the field of view is empty.
    """
    if binary.ndim != 3 or binary.shape[0] != len(LESIONS):
        raise InputError(f"measure_lesions: got shape {binary.shape}; expected ({len(LESIONS)}, H, W) in {LESIONS}")
    fov = np.ones(binary.shape[1:], bool) if fov_mask is None else fov_mask.astype(bool)
    if fov.shape != binary.shape[1:]:
        raise InputError(f"measure_lesions: fov_mask shape {fov.shape} differs from the masks' {binary.shape[1:]}")
    fov_px = int(fov.sum())
    result = {}
    for lesion, mask in zip(LESIONS, binary):
        count, _, stats, _ = cv2.connectedComponentsWithStats((mask.astype(bool) & fov).view(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
        area = int(areas.sum())
        result[lesion] = {
            "components": int(count - 1),
            "area_px": area,
            "area_fov_fraction": area / fov_px if fov_px else None,
            "largest_px": int(areas.max()) if len(areas) else 0,
        }
    return result


def render_overlay(image: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) uint8 with lesion pixels tinted in the paper's colours and outlined, plus a legend when large."""
    out = image.astype(np.float32)
    for lesion in DRAW_ORDER:
        mask = binary[LESIONS.index(lesion)]
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * np.float32(LESION_COLOURS[lesion])
    out = out.astype(np.uint8)
    thickness = max(1, round(min(image.shape[:2]) / 600))
    ring_px = max(4, round(min(image.shape[:2]) / 120))  # radius of the circle marking lesions smaller than it
    for lesion in DRAW_ORDER:
        mask = binary[LESIONS.index(lesion)].astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, LESION_COLOURS[lesion], thickness, lineType=cv2.LINE_8)
        _mark_tiny_components(out, mask, LESION_COLOURS[lesion], ring_px, thickness)
    if min(image.shape[:2]) >= 400:
        _draw_legend(out)
    return out


def _mark_tiny_components(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], radius: int, thickness: int
) -> None:
    """A ring around every component narrower than the ring, so 1-10 px microaneurysms are seen at full size."""
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    for label in range(1, count):
        if max(stats[label, cv2.CC_STAT_WIDTH], stats[label, cv2.CC_STAT_HEIGHT]) < radius:
            centre = (int(round(centroids[label][0])), int(round(centroids[label][1])))
            cv2.circle(image, centre, radius, colour, thickness, lineType=cv2.LINE_8)


def _draw_legend(image: np.ndarray) -> None:
    """Colour key in the top-left corner, usually the black border outside the field of view."""
    scale = min(image.shape[:2]) / 1000
    box, gap = max(8, round(28 * scale)), max(4, round(12 * scale))
    for i, lesion in enumerate(LESIONS):
        top = gap + i * (box + gap)
        cv2.rectangle(image, (gap, top), (gap + box, top + box), LESION_COLOURS[lesion], thickness=cv2.FILLED)
        cv2.putText(
            image,
            lesion,
            org=(2 * gap + box, top + box - max(1, box // 6)),
            fontFace=cv2.FONT_HERSHEY_SIMPLEX,
            fontScale=box / 30,
            color=(255, 255, 255),
            thickness=max(1, round(2 * scale)),
            lineType=cv2.LINE_AA,
        )


# ------------------------------------------------------------------------------------------------------ writing
def write_overlay(path: Path, overlay: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the overlay as PNG")
    atomic_write_bytes(path, encoded.tobytes())


def write_probs(path: Path, probs: np.ndarray) -> None:
    """float16 (4, H, W) under 'probs', channel names under 'lesions'; np.load(path)['probs']."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs.astype(np.float16), lesions=np.array(LESIONS))
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------- predict
def predict(
    checkpoint: Path,
    inputs: Path,
    out: Path,
    save_probs: bool = False,
    threshold: float = 0.5,
    device: Optional[str] = None,
) -> dict[str, Any]:
    """Segments one image or a folder of them; writes OUT/<stem>_overlay.png, OUT/<stem>_probs.npz (save_probs)
    and OUT/lesions.json, and returns the content of lesions.json:
    {checkpoint, model, image_px, threshold, device, lesions_order, fov_method,
     images: {file name: {path, height, width, fov_px, overlay, probs, lesions: {lesion: measure_lesions(...)}}},
     errors: [{file, path, error}]} — unreadable images are listed under errors and skipped."""
    inputs, out = Path(inputs), Path(out)
    paths = _checked_inputs(inputs, out, threshold)
    predictor = Predictor(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": predictor.config.model.name,
        "image_px": predictor.image_px,
        "threshold": threshold,
        "device": str(predictor.device),
        "lesions_order": list(LESIONS),
        "fov_method": FOV_METHOD,
        "images": {},
        "errors": [],
    }
    stems = output_stems(paths)
    for path in tqdm(paths, desc="predict", unit="img", file=sys.stderr, disable=len(paths) == 1):
        try:
            image = read_image(path)
        except InputError as exc:
            result["errors"].append({"file": path.name, "path": str(path), "error": str(exc)})
            tqdm.write(f"drseg predict: skipped {exc}", file=sys.stderr)
            continue
        record = _predict_one(predictor, image, threshold, out, stems[path], save_probs)
        result["images"][path.name] = {"path": str(path), **record}
    if not result["images"]:
        raise InputError(f"no readable image in {inputs}: " + "; ".join(e["error"] for e in result["errors"]))
    atomic_write_bytes(out / "lesions.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def _checked_inputs(inputs: Path, out: Path, threshold: float) -> list[Path]:
    """The images to segment, after checking the arguments that would otherwise fail only after loading the model."""
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold: got {threshold}; use a probability in [0, 1] (paper: 0.5)")
    paths = list_images(inputs)
    if inputs.is_dir() and out.resolve() == inputs.resolve():
        raise InputError(f"out={out} is the input folder; choose another folder so outputs are not read as inputs")
    return paths


def _predict_one(
    predictor: Predictor, image: np.ndarray, threshold: float, out: Path, stem: str, save_probs: bool
) -> dict[str, Any]:
    probs = predictor.predict(image)
    fov = estimate_fov(image)
    binary = binarize(probs, threshold, fov)
    write_overlay(out / f"{stem}_overlay.png", render_overlay(image, binary))
    if save_probs:
        write_probs(out / f"{stem}_probs.npz", probs)
    return {
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "fov_px": int(fov.sum()),
        "overlay": f"{stem}_overlay.png",
        "probs": f"{stem}_probs.npz" if save_probs else None,
        "lesions": measure_lesions(binary, fov),
    }
