"""Reader for the official DDR lesion-segmentation layout (Li et al. 2019), real or synthetic: finds and validates
the image/mask files of a split and reads one sample as an RGB image plus four binary masks in LESIONS order. The
sample reading (read_sample) is shared by every layout (data/layouts.py).

Layout: `[DDR-dataset/]lesion_segmentation/{train,valid,test}/image/<id>.jpg` + `.../label/{EX,HE,MA,SE}/<id>.tif`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.errors import InputError, MissingError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIXES = (".tif", ".tiff", ".png")
SUBSET_DIR = "lesion_segmentation"
EXPECTED_LAYOUT = (
    "expected DDR-dataset/lesion_segmentation/{train,valid,test}/image/<id>.jpg and "
    ".../{split}/label/{EX,HE,MA,SE}/<id>.tif (or .png); pass --ddr-root the folder holding lesion_segmentation/ "
    "or lesion_segmentation/ itself"
)
_MAX_LISTED = 5  # file names quoted in one error message


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample: image path and one mask path per lesion (None = no mask file)."""

    id: str
    image: Path
    masks: dict[str, Optional[Path]]
    absent_is_empty: bool = False
    """A None mask means the image has none of that lesion (IDRiD omits such files), not a missing file."""
    strict_values: bool = False
    """Masks must hold 0/255 or 0/1 only (anything else is an error naming the file); else non-binary is binarised."""


class DDRSample(NamedTuple):
    id: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    masks: np.ndarray
    """(H, W, 4) uint8 0/1 in LESIONS order."""
    missing_masks: tuple[str, ...]
    """Lesions whose mask file was absent and filled with zeros (only with allow_missing_masks)."""
    non_binary_masks: tuple[str, ...]
    """Lesions whose mask held more than one non-zero value (binarised as > 0)."""


def resolve_root(root: str | Path) -> Path:
    """Returns the `lesion_segmentation` folder, given it or the folder holding it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingError(f"DDR root {root} does not exist; {EXPECTED_LAYOUT}")
    for candidate in (root / SUBSET_DIR, root):
        if any((candidate / split / "image").is_dir() for split in SPLITS):
            return candidate
    raise MissingError(f"{root} is not a DDR tree (no {SUBSET_DIR}/<split>/image/ folder); {EXPECTED_LAYOUT}")


def available_splits(root: str | Path) -> list[str]:
    """The splits of SPLITS that have an image/ folder, in SPLITS order."""
    base = resolve_root(root)
    return [split for split in SPLITS if (base / split / "image").is_dir()]


def _files_by_id(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in found:
            raise InputError(f"{path} and {found[path.stem]} have the same id '{path.stem}'; keep only one of them")
        found[path.stem] = path
    return found


def _listing(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def find_samples(root: str | Path, split: str, allow_missing_masks: bool = False) -> list[SampleFiles]:
    """Lists and cross-checks the files of `split`, sorted by id. Raises on a layout problem, naming the files."""
    split_dir = resolve_root(root) / split
    image_dir, label_dir = split_dir / "image", split_dir / "label"
    if not image_dir.is_dir():
        raise MissingError(f"split '{split}': folder {image_dir} does not exist; {EXPECTED_LAYOUT}")
    images = _files_by_id(image_dir, IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"split '{split}' is empty: no {'/'.join(IMAGE_SUFFIXES)} file in {image_dir}")
    masks_by_lesion = {lesion: _lesion_masks(label_dir / lesion, allow_missing_masks) for lesion in LESIONS}
    _check_masks_match(images, masks_by_lesion, label_dir, allow_missing_masks)
    return [
        SampleFiles(id=sid, image=images[sid], masks={les: masks_by_lesion[les].get(sid) for les in LESIONS})
        for sid in sorted(images)
    ]


def _lesion_masks(folder: Path, allow_missing_masks: bool) -> dict[str, Path]:
    if folder.is_dir():
        return _files_by_id(folder, MASK_SUFFIXES)
    if allow_missing_masks:
        return {}
    raise MissingError(
        f"mask folder {folder} does not exist; {EXPECTED_LAYOUT} (or pass --allow-missing-masks to treat every "
        f"{folder.name} mask as empty)"
    )


def _check_masks_match(
    images: dict[str, Path], masks_by_lesion: dict[str, dict[str, Path]], label_dir: Path, allow_missing: bool
) -> None:
    orphans = sorted(p for masks in masks_by_lesion.values() for sid, p in masks.items() if sid not in images)
    if orphans:
        raise InputError(
            f"{len(orphans)} mask file(s) have no image in {label_dir.parent / 'image'}: {_listing(orphans)}; "
            "restore the image(s) or remove the mask(s)"
        )
    missing = [
        label_dir / lesion / f"{sid}.tif"
        for lesion, masks in masks_by_lesion.items()
        for sid in sorted(images)
        if sid not in masks
    ]
    if missing and not allow_missing:
        raise MissingError(
            f"{len(missing)} mask file(s) missing (.tif or .png): {_listing(missing)}; every image needs one mask per "
            "lesion (an absent lesion is an all-zero mask). Restore them, or pass --allow-missing-masks "
            "(allow_missing_masks=True) to treat them as empty"
        )


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. PIL raises on truncated files where OpenCV would silently return a partial image."""
    try:
        with Image.open(path) as img:
            img.load()
            return _rgb8(img)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is implausibly large ({exc}); is it really a fundus photograph?") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {path} is corrupt or unreadable ({exc}); replace it with an intact copy") from exc


# PIL's modes of 16- and 32-bit grey images; convert("RGB") would clip them at 255 instead of scaling.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _rgb8(img: Image.Image) -> np.ndarray:
    """RGB uint8 of any PIL image; 16-bit grey keeps its top 8 bits (as OpenCV reads such files in predict)."""
    if img.mode not in _WIDE_GREY_MODES:
        return np.asarray(img.convert("RGB"))
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(f"{img.mode} values outside 0..65535 cannot be scaled to 8 bit")
    grey = (values >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def read_mask(path: Path, strict_values: bool = False) -> tuple[np.ndarray, bool]:
    """(H, W) uint8 0/1 (any value > 0, in any channel, is lesion) and whether the file was non-binary. With
    `strict_values` a mask must hold 0/255 or 0/1 only; anything else is an error naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            values = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"mask {path} is corrupt or unreadable ({exc}); replace it with an intact copy") from exc
    if values.ndim == 3:  # an RGB(A)-saved mask: lesion wherever any channel is on
        values = values.max(axis=2)
    lesion = values > 0
    on_values = values[lesion]
    non_binary = bool(on_values.size) and on_values.min() != on_values.max()
    if strict_values and on_values.size and (non_binary or on_values.max() not in (1, 255)):
        raise InputError(
            f"mask {path} holds values {_value_listing(values)}; a mask must hold 0/255 or 0/1 only: re-export it as "
            "a binary mask"
        )
    return lesion.view(np.uint8), non_binary


def _value_listing(values: np.ndarray, shown: int = 6) -> str:
    distinct = np.unique(values)
    text = ", ".join(str(v) for v in distinct[:shown].tolist())
    return text + (f", … ({len(distinct)} distinct)" if len(distinct) > shown else "")


def read_sample(files: SampleFiles, allow_missing_masks: bool = False) -> DDRSample:
    """Reads one sample; checks every mask against the image size."""
    image = read_image(files.image)
    height, width = image.shape[:2]
    masks = np.zeros((height, width, len(LESIONS)), np.uint8)
    missing, non_binary = [], []
    for channel, lesion in enumerate(LESIONS):
        path = files.masks.get(lesion)
        if path is None and files.absent_is_empty:
            continue  # the dataset's way of saying "none of this lesion": zeros, not a missing file
        if path is None:
            if not allow_missing_masks:
                raise MissingError(
                    f"sample '{files.id}' ({files.image}) has no {lesion} mask; restore it or pass "
                    "--allow-missing-masks (allow_missing_masks=True) to treat it as empty"
                )
            missing.append(lesion)
            continue
        mask, is_non_binary = read_mask(path, files.strict_values)
        if mask.shape != (height, width):
            raise InputError(
                f"mask {path} is {mask.shape[1]}×{mask.shape[0]} but its image {files.image} is {width}×{height}; "
                "masks must have the image's size (re-export the mask at the image's resolution)"
            )
        masks[..., channel] = mask
        if is_non_binary:
            non_binary.append(lesion)
    return DDRSample(files.id, image, masks, tuple(missing), tuple(non_binary))


class DDRReader:
    """The DDR layout behind the reader interface of data/layouts.py; nothing is read before splits()/samples()."""

    layout = "ddr"
    dataset = "DDR"
    root_option = "--ddr-root"

    def __init__(self, root: str | Path, allow_missing_masks: bool = False) -> None:
        self.root, self.allow_missing_masks = Path(root), allow_missing_masks

    @property
    def source(self) -> Path:
        return resolve_root(self.root)

    def splits(self) -> list[str]:
        return available_splits(self.root)

    def samples(self, split: str) -> list[SampleFiles]:
        return find_samples(self.root, split, self.allow_missing_masks)

    def manifest_fields(self) -> dict[str, Any]:
        return {}
