"""The dataset layouts `drseg shard` reads, behind one interface: a Reader lists each split's samples as SampleFiles
(id, image path, {lesion: mask path or None}) sorted by id, after checking the layout, so that shards.py writes any
of them the same way. DDR: data/ddr.py; IDRiD: data/idrid.py; a plain folder layout: data/folders.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from hpc_drseg.errors import InputError

if TYPE_CHECKING:  # the readers import numpy and PIL; `drseg --help` imports this module for LAYOUTS
    from hpc_drseg.data.ddr import SampleFiles

LAYOUTS: tuple[str, ...] = ("ddr", "idrid", "folders")
LEGACY_DATASET = "DDR"  # manifests written before the dataset was recorded came from DDR trees only
DEFAULT_VALID_FRACTION = 0.2  # IDRiD has no validation set: this share of its training images becomes one


@runtime_checkable
class Reader(Protocol):
    """One dataset on disk. Constructing it reads nothing; splits() and samples() check the layout and raise a
    DrsegError naming the path and the fix."""

    layout: str
    """One of LAYOUTS; recorded in the manifest."""
    dataset: str
    """The dataset's name as reports show it (DDR, IDRiD, or the folder layout's --dataset-name)."""
    root: Path
    """The root as the user gave it (checked against --out)."""
    root_option: str
    """The command-line option that gave `root`, for messages."""

    @property
    def source(self) -> Path:
        """The resolved root recorded in the manifest."""

    def splits(self) -> list[str]:
        """The splits present, in SPLITS order."""

    def samples(self, split: str) -> list[SampleFiles]:
        """The split's samples sorted by id (a deterministic order)."""

    def manifest_fields(self) -> dict[str, Any]:
        """Layout options that shaped the splits (e.g. IDRiD's valid_fraction), recorded in the manifest."""


def build_reader(
    layout: str,
    root: str | Path,
    allow_missing_masks: bool = False,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    split_seed: int = 0,
    mask_pattern: Optional[str] = None,
    split: Optional[str] = None,
    dataset: Optional[str] = None,
) -> Reader:
    """The reader of `layout` for `root`. valid_fraction/split_seed: idrid only; mask_pattern/split/dataset: folders
    only (see data/folders.py); allow_missing_masks: ddr and folders (IDRiD's absent files always mean no lesion)."""
    if layout == "ddr":
        from hpc_drseg.data.ddr import DDRReader

        return DDRReader(root, allow_missing_masks)
    if layout == "idrid":
        from hpc_drseg.data.idrid import IDRiDReader

        return IDRiDReader(root, valid_fraction=valid_fraction, split_seed=split_seed)
    if layout == "folders":
        from hpc_drseg.data.folders import DEFAULT_MASK_PATTERN, FoldersReader

        return FoldersReader(
            root,
            mask_pattern=mask_pattern or DEFAULT_MASK_PATTERN,
            split=split,
            dataset=dataset,
            allow_missing_masks=allow_missing_masks,
        )
    raise InputError(f"layout: got {layout!r}; choose one of {list(LAYOUTS)} (CLI: --layout)")


def dataset_name(manifest: dict[str, Any]) -> str:
    """The dataset a shard manifest was made from; manifests older than the field were all DDR."""
    name = manifest.get("dataset")
    return name if isinstance(name, str) and name else LEGACY_DATASET
