"""Reader for the segmentation part of IDRiD (Porwal et al., 2018, "Indian Diabetic Retinopathy Image Dataset"):

    [IDRiD/]A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg
    [IDRiD/]A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/
        {1. Microaneurysms,2. Haemorrhages,3. Hard Exudates,4. Soft Exudates}/IDRiD_NN_{MA,HE,EX,SE}.tif

IDRiD omits the mask file of a lesion an image does not have, so an absent file is an empty mask. Its file codes
name the same lesions as LESIONS (HE = haemorrhages, EX = hard exudates); the folder's number must agree with the
code. "5. Optic Disc" is ignored. IDRiD has no validation set: valid_fraction of the training ids (sorted, then a
seeded permutation) becomes one; the test set is untouched.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import SampleFiles
from hpc_drseg.errors import InputError, MissingError

SEGMENTATION_DIR = "A. Segmentation"
IMAGES_DIR = "1. Original Images"
MASKS_DIR = "2. All Segmentation Groundtruths"
SET_DIRS = {"train": "a. Training Set", "test": "b. Testing Set"}
# Ground-truth folder → file code. The codes are IDRiD's and happen to equal LESIONS' names; the mapping is explicit
# because the folders are numbered in another order (2 = haemorrhages) than LESIONS (MA, EX, SE, HE).
LESION_DIRS = {"1. Microaneurysms": "MA", "2. Haemorrhages": "HE", "3. Hard Exudates": "EX", "4. Soft Exudates": "SE"}
IGNORED_DIRS = ("5. Optic Disc",)
IMAGE_NAME = re.compile(r"(IDRiD_\d+)\.(?:jpe?g|png|tiff?)", re.IGNORECASE)
MASK_NAME = re.compile(r"(IDRiD_\d+)_(MA|HE|EX|SE|OD)\.(?:tiff?|png)", re.IGNORECASE)
EXPECTED_LAYOUT = (
    f"expected {SEGMENTATION_DIR}/{IMAGES_DIR}/{{{', '.join(SET_DIRS.values())}}}/IDRiD_NN.jpg and "
    f"{SEGMENTATION_DIR}/{MASKS_DIR}/<set>/{{{', '.join(LESION_DIRS)}}}/IDRiD_NN_{{MA,HE,EX,SE}}.tif; pass --root the "
    f"folder holding '{SEGMENTATION_DIR}' or that folder itself"
)
assert sorted(LESION_DIRS.values()) == sorted(LESIONS)


def resolve_root(root: str | Path) -> Path:
    """The `A. Segmentation` folder, given it or the folder holding it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingError(f"IDRiD root {root} does not exist; {EXPECTED_LAYOUT}")
    for candidate in (root / SEGMENTATION_DIR, root):
        if (candidate / IMAGES_DIR).is_dir():
            return candidate
    raise MissingError(f"{root} is not an IDRiD segmentation tree (no '{IMAGES_DIR}' folder); {EXPECTED_LAYOUT}")


def _visible_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and not p.is_dir()]


def _images(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in _visible_files(folder):
        match = IMAGE_NAME.fullmatch(path.name)
        if not match:
            raise InputError(
                f"{path}: not an IDRiD image name (IDRiD_NN.jpg); rename it to that pattern or move it out of {folder}"
            )
        if match[1] in images:
            raise InputError(f"{path} and {images[match[1]]} have the same id '{match[1]}'; keep only one of them")
        images[match[1]] = path
    if not images:
        raise InputError(f"{folder} holds no IDRiD_NN.jpg image; {EXPECTED_LAYOUT}")
    return images


def _lesion_masks(folder: Path, code: str, images: dict[str, Path]) -> dict[str, Path]:
    """{image id: mask path} of one ground-truth folder; every file must be an IDRiD_NN_<code> mask of an image."""
    masks: dict[str, Path] = {}
    for path in _visible_files(folder):
        match = MASK_NAME.fullmatch(path.name)
        if not match or match[2].upper() != code:
            raise InputError(
                f"{path}: not an IDRiD {code} mask name (IDRiD_NN_{code}.tif) for folder '{folder.name}'; rename it "
                "or move it to the folder of its lesion"
            )
        if match[1] not in images:
            raise InputError(f"{path} has no image {match[1]}.jpg in the images folder; restore the image or remove it")
        if match[1] in masks:
            raise InputError(f"{path} and {masks[match[1]]} are both the {code} mask of {match[1]}; keep one of them")
        masks[match[1]] = path
    return masks


def find_set(base: Path, split: str) -> list[SampleFiles]:
    """The samples of one IDRiD set ('train' = a. Training Set, 'test' = b. Testing Set), sorted by id."""
    image_dir, mask_dir = base / IMAGES_DIR / SET_DIRS[split], base / MASKS_DIR / SET_DIRS[split]
    if not image_dir.is_dir():
        raise MissingError(f"folder {image_dir} does not exist; {EXPECTED_LAYOUT}")
    images = _images(image_dir)
    masks = {}
    for folder_name, code in LESION_DIRS.items():
        folder = mask_dir / folder_name
        if not folder.is_dir():
            raise MissingError(
                f"ground-truth folder {folder} does not exist; restore it from the IDRiD release ({EXPECTED_LAYOUT})"
            )
        masks[code] = _lesion_masks(folder, code, images)
    return [
        SampleFiles(
            id=sid,
            image=images[sid],
            masks={lesion: masks[lesion].get(sid) for lesion in LESIONS},
            absent_is_empty=True,
            strict_values=True,
        )
        for sid in sorted(images, key=_id_key)
    ]


def _id_key(sample_id: str) -> tuple[int, str]:
    """IDRiD_9 before IDRiD_10 even where a copy dropped the zero padding."""
    return int(sample_id.rsplit("_", 1)[1]), sample_id


def carve_valid(ids: list[str], valid_fraction: float, seed: int) -> set[str]:
    """The ids that become the validation split: round(fraction × n) of them (at least 1 when fraction > 0, never
    all), picked by a permutation seeded with `seed` over the sorted ids, so the same inputs give the same split."""
    if valid_fraction <= 0:
        return set()
    ordered = sorted(ids, key=_id_key)
    count = min(len(ordered) - 1, max(1, round(valid_fraction * len(ordered))))
    picked = np.random.default_rng([seed, 0x1D1D]).permutation(len(ordered))[:count]
    return {ordered[i] for i in picked}


class IDRiDReader:
    """IDRiD's segmentation release behind the reader interface of data/layouts.py (splits train, valid, test)."""

    layout = "idrid"
    dataset = "IDRiD"
    root_option = "--root"

    def __init__(self, root: str | Path, valid_fraction: float = 0.2, split_seed: int = 0) -> None:
        if not 0 <= valid_fraction < 1:
            raise InputError(
                f"valid_fraction: got {valid_fraction}; it must be in [0, 1) (CLI: --valid-fraction; 0: no valid split)"
            )
        self.root, self.valid_fraction, self.split_seed = Path(root), valid_fraction, split_seed

    @property
    def source(self) -> Path:
        return resolve_root(self.root)

    @cached_property
    def _sets(self) -> dict[str, list[SampleFiles]]:
        base = self.source
        present = [split for split, name in SET_DIRS.items() if (base / IMAGES_DIR / name).is_dir()]
        if not present:
            raise MissingError(
                f"{base / IMAGES_DIR} holds neither '{SET_DIRS['train']}' nor '{SET_DIRS['test']}'; {EXPECTED_LAYOUT}"
            )
        sets = {split: find_set(base, split) for split in present}
        if "train" in sets and self.valid_fraction > 0:
            if len(sets["train"]) < 2:
                raise InputError(
                    f"{base / IMAGES_DIR / SET_DIRS['train']} has {len(sets['train'])} image(s): too few to carve a "
                    "validation split; pass --valid-fraction 0"
                )
            valid = carve_valid([s.id for s in sets["train"]], self.valid_fraction, self.split_seed)
            sets["valid"] = [s for s in sets["train"] if s.id in valid]
            sets["train"] = [s for s in sets["train"] if s.id not in valid]
        return {split: sets[split] for split in ("train", "valid", "test") if split in sets}

    def splits(self) -> list[str]:
        return list(self._sets)

    def samples(self, split: str) -> list[SampleFiles]:
        if split not in self._sets:
            raise MissingError(f"split '{split}' is not in the IDRiD tree {self.source}; available: {self.splits()}")
        return self._sets[split]

    def manifest_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"valid_fraction": self.valid_fraction, "split_seed": self.split_seed}
        if "valid" in self._sets:
            fields["valid_from"] = "train"  # the validation images are IDRiD training images
        return fields
