"""Checks of the data a training needs, run before anything slow or written: a mistake found here costs a second,
not an epoch of compute (the validation split, for one, is otherwise read only after the first epoch)."""

from __future__ import annotations

from typing import Any

from hpc_drseg.config import RunConfig
from hpc_drseg.data.manifest import shard_groups, split_info
from hpc_drseg.errors import InputError


def check_image_size(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """The shards were written at data.image_px."""
    shard_px = manifest["image_px"]
    if shard_px != cfg.data.image_px:
        raise InputError(
            f"shards in {cfg.data.shards} are {shard_px}px but data.image_px={cfg.data.image_px}; "
            f"set data.image_px={shard_px} or re-shard with --image-px {cfg.data.image_px}"
        )


def check_split(cfg: RunConfig, manifest: dict[str, Any], split: str, key: str) -> None:
    """The split (named by config key `key`) exists, holds images and all its shard files."""
    shards = cfg.data.shards
    info = split_info(manifest, split, shards)
    if info["images"] < 1:
        raise InputError(
            f"split '{split}' ({key}) in the shards {shards} holds no images; shard a DDR tree whose "
            f"lesion_segmentation/{split}/ has images, or set {key} to another split"
        )
    shard_groups(shards, info)  # MissingError naming the first shard file that is listed but absent
