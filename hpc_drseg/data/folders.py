"""Reader for a plain folder layout, for e-ophtha, FGADR or in-house data brought into this shape:

    ROOT/images/<stem>.{jpg,jpeg,png,tif,tiff}   +  ROOT/masks/{MA,EX,SE,HE}/<mask pattern>      (one split)
    ROOT/{train,valid,test}/images/…             +  ROOT/{train,valid,test}/masks/{MA,EX,SE,HE}/…  (several splits)

The mask pattern (default "{stem}.png") names each image's mask from its file stem and the lesion, e.g.
"{stem}_{lesion}.png". A missing mask folder or file is an error unless allow_missing_masks (then empty, counted).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Optional

from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.data.ddr import SampleFiles
from hpc_drseg.errors import InputError, MissingError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DEFAULT_MASK_PATTERN = "{stem}.png"
DEFAULT_SPLIT = "test"  # a single folder is most often a dataset to score a model on
_FIELDS = ("stem", "lesion")
EXPECTED_LAYOUT = (
    "expected ROOT/images/<stem>.jpg with ROOT/masks/{MA,EX,SE,HE}/<--mask-pattern> (one split), or "
    "ROOT/{train,valid,test}/images/ and .../masks/ (several splits)"
)


def check_mask_pattern(pattern: str) -> None:
    """A pattern must name {stem} and may name {lesion}; nothing else, no folders."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None]
    except ValueError as exc:
        raise InputError(f"--mask-pattern {pattern!r} is not a valid pattern ({exc}); e.g. '{{stem}}.png'") from exc
    unknown = sorted(set(fields) - set(_FIELDS))
    if "stem" not in fields or unknown or "/" in pattern or "\\" in pattern:
        raise InputError(
            f"--mask-pattern {pattern!r}: it must contain {{stem}}, may contain {{lesion}}, no other field"
            f"{' (got ' + ', '.join(unknown) + ')' if unknown else ''} and no folder; e.g. '{{stem}}.png' or "
            "'{stem}_{lesion}.tif'"
        )


class FoldersReader:
    """ROOT/images + ROOT/masks/<lesion>/ behind the reader interface of data/layouts.py."""

    layout = "folders"
    root_option = "--root"

    def __init__(
        self,
        root: str | Path,
        mask_pattern: str = DEFAULT_MASK_PATTERN,
        split: Optional[str] = None,
        dataset: Optional[str] = None,
        allow_missing_masks: bool = False,
    ) -> None:
        check_mask_pattern(mask_pattern)
        if split is not None and split not in SPLITS:
            raise InputError(f"--split: got {split!r}; choose one of {list(SPLITS)}")
        self.root, self.mask_pattern, self.single_split = Path(root), mask_pattern, split
        self.dataset = dataset or Path(root).expanduser().resolve().name
        self.allow_missing_masks = allow_missing_masks

    @property
    def source(self) -> Path:
        root = self.root.expanduser()
        if not root.is_dir():
            raise MissingError(f"folder {root} does not exist; {EXPECTED_LAYOUT}")
        return root

    def _split_dirs(self) -> dict[str, Path]:
        root = self.source
        nested = {split: root / split for split in SPLITS if (root / split / "images").is_dir()}
        if (root / "images").is_dir():
            if nested:
                raise InputError(
                    f"{root} holds both images/ and {'/, '.join(nested)}/images/; keep one layout (a single split "
                    "or split subfolders)"
                )
            return {self.single_split or DEFAULT_SPLIT: root}
        if not nested:
            raise MissingError(f"{root} has no images/ folder (nor train|valid|test/images/); {EXPECTED_LAYOUT}")
        if self.single_split is not None:
            raise InputError(
                f"--split {self.single_split} is for a single images/ folder, but {root} has split subfolders "
                f"({', '.join(nested)}); drop --split"
            )
        return nested

    def splits(self) -> list[str]:
        return list(self._split_dirs())

    def samples(self, split: str) -> list[SampleFiles]:
        folders = self._split_dirs()
        if split not in folders:
            raise MissingError(f"split '{split}' is not in {self.source}; available: {list(folders)}")
        images = _images(folders[split] / "images")
        masks = {lesion: self._lesion_masks(folders[split] / "masks" / lesion, lesion, images) for lesion in LESIONS}
        return [
            SampleFiles(id=stem, image=images[stem], masks={lesion: masks[lesion].get(stem) for lesion in LESIONS})
            for stem in sorted(images)
        ]

    def _lesion_masks(self, folder: Path, lesion: str, images: dict[str, Path]) -> dict[str, Path]:
        if not folder.is_dir():
            if self.allow_missing_masks:
                return {}
            raise MissingError(
                f"mask folder {folder} does not exist; create it (one mask per image, named by --mask-pattern "
                f"{self.mask_pattern!r}) or pass --allow-missing-masks to treat every {lesion} mask as empty"
            )
        expected = {self.mask_pattern.format(stem=stem, lesion=lesion): stem for stem in images}
        found = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.name not in expected:
                raise InputError(
                    f"mask {path} matches no image under --mask-pattern {self.mask_pattern!r}; restore its image, "
                    "remove the mask or fix --mask-pattern"
                )
            found[expected[path.name]] = path
        missing = [folder / name for name, stem in expected.items() if stem not in found]
        if missing and not self.allow_missing_masks:
            raise MissingError(
                f"{len(missing)} {lesion} mask file(s) missing, e.g. {missing[0]}; add them (an image without the "
                "lesion needs an all-zero mask) or pass --allow-missing-masks to treat them as empty"
            )
        return found

    def manifest_fields(self) -> dict[str, Any]:
        return {"mask_pattern": self.mask_pattern}


def _images(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"{path}: not an image ({'/'.join(IMAGE_SUFFIXES)}); move it out of {folder} or convert it"
            )
        if path.stem in images:
            raise InputError(f"{path} and {images[path.stem]} have the same stem '{path.stem}'; keep only one")
        images[path.stem] = path
    if not images:
        raise InputError(f"{folder} holds no image ({'/'.join(IMAGE_SUFFIXES)}); {EXPECTED_LAYOUT}")
    return images
