"""Reading what `drseg shard` wrote: manifest.json (checked field by field), the splits, the shard files and the
samples inside them; every error names the file and says how to fix it.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from hpc_drseg.config.choices import IMAGE_CODECS, MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError, MissingError

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the sample encoding changes; readers refuse other formats
LEGACY_MASK_RESIZE = "any"  # the only rule of shards written before the manifest named it


def mask_resize_rule(manifest: dict[str, Any]) -> str:
    """The mask-resize rule a manifest records; shards written before the manifest named it used `any` (their
    `mask_resize` entry, if any, is a description, not a rule name)."""
    rule = manifest.get("mask_resize")
    return rule if rule in MASK_RESIZE_RULES else LEGACY_MASK_RESIZE


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """Loads and checks `shards_dir/manifest.json`."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise MissingError(
            f"{path} not found: {shards_dir} is not a shard folder; run `drseg shard --ddr-root DIR --out "
            f"{shards_dir}` first"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); re-run `drseg shard --overwrite`") from exc
    if not isinstance(manifest, dict) or manifest.get("tool") != "hpc_drseg" or "splits" not in manifest:
        raise InputError(f"{path} was not written by `drseg shard`; re-run `drseg shard --overwrite`")
    if manifest.get("format") != FORMAT or manifest.get("lesions") != list(LESIONS):
        raise InputError(
            f"{path}: shard format {manifest.get('format')} with lesions {manifest.get('lesions')} does not match "
            f"this hpc_drseg ({FORMAT}, {list(LESIONS)}); re-run `drseg shard --overwrite`"
        )
    _check_manifest_types(manifest, path)
    return manifest


class _FieldCheck(NamedTuple):
    expected: str
    """What the field must be, as the error says it."""
    ok: Callable[[Any], bool]


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_list_of(value: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and all(item(v) for v in value)


def _is_file_name(value: Any) -> bool:
    """A shard named in the manifest is a plain file name in the shard folder, never a path elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


# Every manifest field a reader uses (trainer, loaders, bench, report). The optional ones are absent from manifests
# of older versions and checked when present.
_TOP_FIELDS = {
    "image_px": _FieldCheck("a positive integer", lambda v: _is_int(v, 1)),
    "image_codec": _FieldCheck(f"one of {list(IMAGE_CODECS)}", lambda v: isinstance(v, str) and v in IMAGE_CODECS),
    "mask_resize": _FieldCheck("a string", lambda v: isinstance(v, str)),
    "samples_per_shard": _FieldCheck("a positive integer", lambda v: _is_int(v, 1)),
}
_OPTIONAL_TOP = ("image_codec", "mask_resize", "samples_per_shard")
_SPLIT_FIELDS = {
    "images": _FieldCheck("an integer >= 0", lambda v: _is_int(v, 0)),
    "shards": _FieldCheck("a list of shard file names", lambda v: _is_list_of(v, _is_file_name)),
    "shard_sizes": _FieldCheck("a list of integers >= 0", lambda v: _is_list_of(v, lambda n: _is_int(n, 0))),
    "ids": _FieldCheck("a list of strings", lambda v: _is_list_of(v, lambda i: isinstance(i, str))),
    "has_native": _FieldCheck("true or false", lambda v: isinstance(v, bool)),
}


def _field_error(path: Path, field: str, expected: str, value: Any) -> InputError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return InputError(
        f"{path}: field '{field}' must be {expected}, got {shown} ({type(value).__name__}); "
        "re-run `drseg shard --overwrite`"
    )


def _check_manifest_types(manifest: dict[str, Any], path: Path) -> None:
    """Every field a reader uses has the type and the consistency the writer gives it, so that a hand-edited or
    damaged manifest is one error naming the field and the file, not a TypeError deep inside a loader."""
    for field, check in _TOP_FIELDS.items():
        if field in manifest or field not in _OPTIONAL_TOP:
            value = manifest.get(field)
            if not check.ok(value):
                raise _field_error(path, field, check.expected, value)
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not all(isinstance(info, dict) for info in splits.values()):
        raise _field_error(path, "splits", "an object mapping each split to an object", splits)
    for split, info in splits.items():
        for field, check in _SPLIT_FIELDS.items():
            value = info.get(field)
            if not check.ok(value):
                raise _field_error(path, f"splits.{split}.{field}", check.expected, value)
        _check_split_counts(path, split, info)


def _check_split_counts(path: Path, split: str, info: dict[str, Any]) -> None:
    """One size per shard, one id per image, and the shard sizes add up to the images."""
    shards, sizes, ids, images = info["shards"], info["shard_sizes"], info["ids"], info["images"]
    if len(sizes) != len(shards) or sum(sizes) != images or len(ids) != images:
        raise InputError(
            f"{path}: split '{split}' lists {images} images, {len(ids)} ids and shard sizes {sizes} for "
            f"{len(shards)} shards; they must agree (one size per shard, summing to the images); re-run "
            "`drseg shard --overwrite`"
        )


def split_info(manifest: dict[str, Any], split: str, shards_dir: str | Path = "") -> dict[str, Any]:
    """The manifest entry of `split`, with an error that names the shard folder and lists the available splits."""
    splits = manifest["splits"]
    if split not in splits:
        where = f"the shards {shards_dir}" if str(shards_dir) else "these shards"
        raise InputError(
            f"split '{split}' is not in {where}; available: {sorted(splits) or 'none'} (check data.train_split / "
            f"data.val_split / eval.split, or shard a DDR tree that has lesion_segmentation/{split}/)"
        )
    return splits[split]


def shard_groups(shards_dir: str | Path, info: dict[str, Any]) -> list[tuple[Path, list[str]]]:
    """(shard path, its sample ids) of one split's manifest entry, in order; every shard file must exist."""
    groups, start = [], 0
    for name, size in zip(info["shards"], info["shard_sizes"]):
        path = Path(shards_dir) / name
        if not path.is_file():
            raise MissingError(
                f"shard {path} listed in {Path(shards_dir) / MANIFEST} is missing; re-run `drseg shard --overwrite`"
            )
        groups.append((path, info["ids"][start : start + size]))
        start += size
    return groups


def iter_shard_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Yields {'__key__': id, '<ext>': bytes, ...} per sample of one tar; a damaged file is an error naming it."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"shard {path} is unreadable or truncated ({exc}); re-run `drseg shard --overwrite`") from exc
    if sample:
        yield sample
