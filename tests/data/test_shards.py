"""Sharder: the three mask-resize rules (nearest default, area, any) on hand-made masks and a synthetic batch, the
rule recorded in the manifest (and read back by the run report), exact round trip of images/masks/native masks,
manifest counts, atomicity, worker-count independence, compatibility with the webdataset library."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from tree_snapshot import snapshot as _snapshot

from hpc_drseg import __version__, atomic
from hpc_drseg.atomic import NoSpaceError
from hpc_drseg.cli import main
from hpc_drseg.config import load_config, save_config
from hpc_drseg.config.choices import MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import available_splits, find_samples, read_sample
from hpc_drseg.data.encoding import pack_masks, unpack_masks
from hpc_drseg.data.fundus import render_fundus
from hpc_drseg.data.manifest import iter_shard_samples, mask_resize_rule, read_manifest, shard_groups, split_info
from hpc_drseg.data.pipeline import decode_sample
from hpc_drseg.data.resize import MASK_RESIZE_DESCRIPTIONS, resize_image, resize_mask
from hpc_drseg.data.shards import write_shards
from hpc_drseg.errors import ExistsError, InputError
from hpc_drseg.report import _mask_resize_line

AREA_BOUNDS = (0.75, 1.33)  # lesion area after resizing / area-true value, for the area-true rules


def _footprint_max(mask: np.ndarray, size: int) -> np.ndarray:
    """Reference rule, one axis at a time: shrink = max over the source pixels the target footprint overlaps,
    enlarge = the source pixel under the target centre."""
    out = mask
    for axis in (1, 0):
        length = out.shape[axis]
        scale = length / size
        rows = []
        for i in range(size):
            if scale > 1:
                lo, hi = int(np.floor(i * scale)), int(np.ceil((i + 1) * scale))
            else:
                lo = int(np.floor((i + 0.5) * scale))
                hi = lo + 1
            rows.append(np.take(out, range(lo, hi), axis=axis).max(axis=axis))
        out = np.stack(rows, axis=axis)
    return out


# ------------------------------------------------------------------------------------------------ resize rules
# The `any` tests below predate the other rules; they ask for `any` explicitly now that `nearest` is the default.
@pytest.mark.parametrize("y, x", [(0, 0), (1, 2), (3, 3), (37, 18), (63, 63)])
def test_single_pixel_lesion_survives_4x_downscale(y: int, x: int) -> None:
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[y, x, 0] = 1
    small = resize_mask(mask, 16, "any")
    assert small.shape == (16, 16, 4) and small.dtype == np.uint8
    assert small[..., 0].sum() == 1 and small[y // 4, x // 4, 0] == 1
    assert not small[..., 1:].any()
    nearest = cv2.resize(mask, (16, 16), interpolation=cv2.INTER_NEAREST)
    if (y % 4, x % 4) != (0, 0):  # nearest keeps one source pixel in 16: a 1-px microaneurysm elsewhere vanishes
        assert not nearest[..., 0].any()


@pytest.mark.parametrize("shape, size", [((203, 197), 64), ((300, 310), 96), ((50, 40), 64), ((40, 90), 64)])
def test_resize_mask_is_footprint_max_pooling(shape: tuple[int, int], size: int) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = (rng.random((*shape, 4)) < 0.004).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(mask, size, "any"), _footprint_max(mask, size))


def _dot(y: int, x: int) -> np.ndarray:
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[y, x, 2] = 1
    return mask


@pytest.mark.parametrize("y, x", [(2, 2), (1, 2), (3, 3), (38, 18), (37, 18), (62, 62)])
def test_one_pixel_dot_at_4x_downscale_by_rule(y: int, x: int) -> None:
    """64 → 16 px: target pixel i covers source 4i..4i+3 and its centre lies on source pixel 4i+2."""
    sampled = y % 4 == 2 and x % 4 == 2
    for rule, kept in (("nearest", sampled), ("area", False), ("any", True)):  # a dot covers 1/16 of a footprint
        small = resize_mask(_dot(y, x), 16, rule)
        assert small.shape == (16, 16, 4) and small.dtype == np.uint8, rule
        assert small[..., 2].sum() == int(kept) and small[y // 4, x // 4, 2] == int(kept), rule
        assert not small[..., [0, 1, 3]].any(), rule


def test_nearest_is_the_default_rule() -> None:
    assert MASK_RESIZE_RULES[0] == "nearest"
    mask = (np.random.default_rng(1).random((203, 197, 4)) < 0.05).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(mask, 64), resize_mask(mask, 64, "nearest"))
    np.testing.assert_array_equal(
        resize_mask(mask, 64), cv2.resize(mask, (64, 64), interpolation=cv2.INTER_NEAREST_EXACT)
    )


def test_large_disc_by_rule() -> None:
    """320 → 64 px (5 × 5 footprints): exact expectations, and area within bounds for the area-true rules."""
    disc = cv2.circle(np.zeros((320, 320), np.uint8), (161, 158), 60, 1, -1)
    mask = np.zeros((320, 320, 4), np.uint8)
    mask[..., 1] = disc
    blocks = mask.reshape(64, 5, 64, 5, 4)
    expected = {
        "nearest": mask[2::5, 2::5],  # the centre pixel of each footprint
        "area": (blocks.mean(axis=(1, 3)) >= 0.5).astype(np.uint8),  # fractions are k/25: none is near 1/2
        "any": blocks.max(axis=(1, 3)),
    }
    native = mask[..., 1].sum()
    for rule, want in expected.items():
        small = resize_mask(mask, 64, rule)
        np.testing.assert_array_equal(small, want, err_msg=rule)
        ratio = small[..., 1].sum() * 25 / native
        if rule == "any":
            assert ratio > 1.05, "any dilates the border by up to a footprint"
        else:
            assert AREA_BOUNDS[0] <= ratio <= AREA_BOUNDS[1] and abs(ratio - 1) < 0.03, (rule, ratio)


@pytest.mark.parametrize("rows", [(9,), (10,), (9, 10), (8, 9)])
def test_thin_horizontal_line_by_rule(rows: tuple[int, ...]) -> None:
    """64 → 16 px: footprint rows 8..11 hold target row 2, sampled at source row 10; a line 1 or 2 px thick."""
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[list(rows), 5:61, 3] = 1  # source columns 5..60 → targets 1..15 whole or in part
    # Target columns: 1 covers source 4..7 (line coverage 3/4 along x, sampled at 6), 2..14 lie wholly on the line,
    # 15 covers 60..63 (coverage 1/4, sampled at 62, off the line).
    any_rule = np.zeros((16, 16), np.uint8)
    any_rule[2, 1:16] = 1
    nearest = np.zeros((16, 16), np.uint8)
    if 10 in rows:
        nearest[2, 1:15] = 1
    # Coverage of a footprint = x fraction × y fraction; y fraction is 1/4 (1 px) or exactly 1/2 (2 px), and 1/2
    # counts: only the wholly crossed columns 2..14 of a 2-px line are kept (column 1: 3/8, column 15: 1/8).
    area = np.zeros((16, 16), np.uint8)
    if len(rows) == 2:
        area[2, 2:15] = 1
    expected = {"nearest": nearest, "area": area, "any": any_rule}
    for rule, want in expected.items():
        small = resize_mask(mask, 16, rule)
        np.testing.assert_array_equal(small[..., 3], want, err_msg=rule)
        assert not small[..., :3].any(), rule


@pytest.mark.parametrize("rule", MASK_RESIZE_RULES)
def test_enlarging_is_nearest_for_every_rule(rule: str) -> None:
    mask = (np.random.default_rng(2).random((16, 16, 4)) < 0.2).astype(np.uint8)
    big = resize_mask(mask, 64, rule)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1))
    tall = np.zeros((40, 90, 4), np.uint8)  # height enlarged, width shrunk
    tall[10:30, 20:70, 0] = 1
    out = resize_mask(tall, 64, rule)
    assert out.shape == (64, 64, 4)
    assert abs(out[..., 0].sum() * (40 * 90) / 64**2 / tall[..., 0].sum() - 1) < 0.1, rule
    one_channel = resize_mask(mask[..., :1], 8, rule)
    assert one_channel.shape == (8, 8, 1), "a single channel keeps its axis"


def test_unknown_rule_names_the_option(tmp_path: Path, make_ddr) -> None:
    with pytest.raises(ValueError, match=r"mask_resize: got 'max'; choose one of \['nearest', 'area', 'any'\]"):
        resize_mask(np.zeros((8, 8, 4), np.uint8), 4, "max")
    root = make_ddr(tmp_path / "ddr", counts={"train": 1}, size_px=64)
    with pytest.raises(ValueError, match=r"mask_resize: got 'max'.*\(CLI: --mask-resize\)"):
        write_shards(root, tmp_path / "s", image_px=32, workers=1, progress=False, mask_resize="max")
    assert not (tmp_path / "s").exists()


def test_area_true_rules_keep_lesion_area_on_a_synthetic_batch() -> None:
    """8 synthetic fundus images of ~1600 px → 512 px (the paper's setting on DDR-sized images)."""
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(8):
        _, planes = render_fundus(rng, 1600, 1600)
        masks.append(np.stack([planes[lesion] > 0 for lesion in LESIONS], axis=2).astype(np.uint8))
    native = sum(m.reshape(-1, 4).sum(axis=0) for m in masks)
    assert native.min() > 500, "every lesion type is present in the batch"
    ratios = {}
    for rule in MASK_RESIZE_RULES:
        scaled = sum(resize_mask(m, 512, rule).reshape(-1, 4).sum(axis=0) * m[..., 0].size / 512**2 for m in masks)
        ratios[rule] = dict(zip(LESIONS, scaled / native))
    for rule in ("nearest", "area"):
        for lesion, ratio in ratios[rule].items():
            assert AREA_BOUNDS[0] <= ratio <= AREA_BOUNDS[1], (rule, lesion, ratio)
    assert ratios["any"]["MA"] > 1.5 and all(ratios["any"][x] > 1.05 for x in LESIONS), "any dilates every lesion"
    ma = LESIONS.index("MA")
    for m in masks:  # any keeps every microaneurysm: each component still has a lesion pixel in its footprint
        count, labels = cv2.connectedComponents(m[..., ma], connectivity=8)
        back = cv2.resize(
            resize_mask(m, 512, "any")[..., ma], labels.shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT
        )
        assert len(np.unique(labels[(back > 0) & (labels > 0)])) == count - 1


def test_resize_image_shrinks_by_area_and_enlarges_bicubic() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, :4] = 200
    np.testing.assert_array_equal(resize_image(image, 2)[..., 0], [[200, 0], [0, 0]])  # exact 4×4 block means
    big = resize_image(image, 16)
    assert big.shape == (16, 16, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big, cv2.resize(image, (16, 16), interpolation=cv2.INTER_CUBIC))


def test_pack_unpack_all_lesion_combinations() -> None:
    combos = ((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(np.uint8).reshape(4, 4, 4)
    packed = pack_masks(combos)
    assert packed.dtype == np.uint8 and packed.shape == (4, 4)
    np.testing.assert_array_equal(packed.ravel(), np.arange(16))
    np.testing.assert_array_equal(unpack_masks(packed), combos)
    np.testing.assert_array_equal(unpack_masks(packed, channels_first=True), combos.transpose(2, 0, 1))
    assert unpack_masks(packed, channels_first=True).flags.c_contiguous
    with pytest.raises(ValueError, match="x.png: packed mask values must be 0..15"):
        unpack_masks(packed + 1, name="x.png")


# ------------------------------------------------------------------------------------------------ round trip
def test_shards_decode_to_the_source_resized_by_the_same_rule(ddr_root: Path, shards_dir: Path) -> None:
    manifest = read_manifest(shards_dir)
    image_px = manifest["image_px"]
    for split in available_splits(ddr_root):
        source = {files.id: read_sample(files) for files in find_samples(ddr_root, split)}
        info = split_info(manifest, split)
        seen = []
        for path, ids in shard_groups(shards_dir, info):
            raws = list(iter_shard_samples(path))
            assert [raw["__key__"] for raw in raws] == ids
            for raw in raws:
                sample = decode_sample(raw, path, with_native=info["has_native"])
                expected = source[sample.id]
                np.testing.assert_array_equal(sample.image, resize_image(expected.image, image_px))
                small = resize_mask(expected.masks, image_px, manifest["mask_resize"])
                for channel, lesion in enumerate(LESIONS):
                    np.testing.assert_array_equal(sample.mask[..., channel], small[..., channel], err_msg=lesion)
                if info["has_native"]:
                    np.testing.assert_array_equal(sample.native, expected.masks.transpose(2, 0, 1))
                meta = json.loads(raw["json"])
                assert meta == {"id": sample.id, "split": split, "native_hw": list(expected.image.shape[:2])}
                seen.append(sample.id)
        assert seen == sorted(source) == info["ids"]
        assert info["has_native"] == (split in ("valid", "test"))


def test_manifest_counts_match_a_direct_count(ddr_root: Path, shards_dir: Path) -> None:
    manifest = read_manifest(shards_dir)
    assert manifest["tool"] == "hpc_drseg" and manifest["version"] == __version__
    assert manifest["image_px"] == 128 and manifest["lesions"] == list(LESIONS)
    assert manifest["mask_resize"] == "nearest" and manifest["mask_resize_description"].startswith("shrink = the")
    assert list(manifest["splits"]) == ["train", "valid", "test"]
    for split, info in manifest["splits"].items():
        samples = [read_sample(files) for files in find_samples(ddr_root, split)]
        masks = [s.masks for s in samples]
        assert info["images"] == len(samples)
        assert list(info["lesion_images"]) == list(info["lesion_pixels"]) == list(LESIONS)
        for channel, lesion in enumerate(LESIONS):
            assert info["lesion_images"][lesion] == sum(int(m[..., channel].any()) for m in masks)
            assert info["lesion_pixels"][lesion] == sum(int(m[..., channel].sum()) for m in masks)
            resized = sum(int(resize_mask(m, 128, "nearest")[..., channel].sum()) for m in masks)
            assert info["lesion_pixels_resized"][lesion] == resized
        assert info["total_pixels"] == sum(m.shape[0] * m.shape[1] for m in masks)
        assert info["shards"] == [f"{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert sum(info["shard_sizes"]) == len(samples) and max(info["shard_sizes"]) == 2
        assert info["missing_masks"] == info["non_binary_masks"] == 0
    assert sum(manifest["splits"]["train"]["lesion_images"].values()) > 0


def test_webdataset_library_reads_the_shards(shards_dir: Path) -> None:
    info = read_manifest(shards_dir)["splits"]["valid"]
    urls = [str(shards_dir / name) for name in info["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == info["ids"]
    assert all({"image.png", "mask.png", "native.png", "json"} <= set(s) for s in samples)


def test_npy_image_codec_decodes_to_the_same_samples(ddr_root: Path, shards_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "npy"
    manifest = write_shards(
        ddr_root, out, image_px=128, samples_per_shard=2, workers=1, progress=False, image_codec="npy"
    )
    assert manifest["image_codec"] == "npy" and read_manifest(shards_dir)["image_codec"] == "png"
    for split in ("train", "test"):
        info_png, info_npy = read_manifest(shards_dir)["splits"][split], manifest["splits"][split]
        pairs = zip(shard_groups(shards_dir, info_png), shard_groups(out, info_npy))
        for (png_path, _), (npy_path, _) in pairs:
            for raw_png, raw_npy in zip(iter_shard_samples(png_path), iter_shard_samples(npy_path)):
                assert "image.npy" in raw_npy and "image.png" not in raw_npy
                a = decode_sample(raw_png, png_path, with_native=split == "test")
                b = decode_sample(raw_npy, npy_path, with_native=split == "test")
                assert a.id == b.id and np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
                assert split == "train" or np.array_equal(a.native, b.native)
    raw = next(iter_shard_samples(out / "train-000000.tar"))
    raw["image.npy"] = raw["image.npy"][:100]  # truncated
    with pytest.raises(ValueError, match=r"image.npy: corrupt .npy in the shard"):
        decode_sample(raw, out / "train-000000.tar")
    with pytest.raises(ValueError, match="image_codec: got 'jpg'; choose one of"):
        write_shards(ddr_root, tmp_path / "jpg", image_px=128, progress=False, image_codec="jpg")


# ------------------------------------------------------------------------------------------ the rule on record
@pytest.mark.parametrize("rule", MASK_RESIZE_RULES)
def test_manifest_records_the_rule_and_masks_follow_it(tmp_path: Path, make_ddr, rule: str) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 2}, size_px=96)
    manifest = write_shards(root, tmp_path / "s", image_px=32, workers=1, progress=False, mask_resize=rule)
    assert read_manifest(tmp_path / "s") == manifest
    assert manifest["mask_resize"] == rule and mask_resize_rule(manifest) == rule
    assert manifest["mask_resize_description"] == MASK_RESIZE_DESCRIPTIONS[rule]
    masks = [read_sample(f).masks for f in find_samples(root, "train")]
    resized = [sum(int(resize_mask(m, 32, rule)[..., c].sum()) for m in masks) for c in range(len(LESIONS))]
    assert list(manifest["splits"]["train"]["lesion_pixels_resized"].values()) == resized


def test_older_manifests_read_as_any(tmp_path: Path, shards_dir: Path) -> None:
    manifest = read_manifest(shards_dir)
    old_sentence = "per axis: shrink = any lesion coverage in the footprint (INTER_AREA > 0), enlarge = nearest"
    for value in (None, old_sentence):  # no key, or the description older versions wrote under it
        older = {k: v for k, v in manifest.items() if not k.startswith("mask_resize")}
        if value is not None:
            older["mask_resize"] = value
        (tmp_path / "manifest.json").write_text(json.dumps(older))
        assert mask_resize_rule(read_manifest(tmp_path)) == "any"


def test_cli_flag_reaches_the_manifest(tmp_path: Path, make_ddr, capsys) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 1}, size_px=64)
    common = ["shard", "--ddr-root", str(root), "--image-px", "32", "--workers", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a"), "--mask-resize", "area"]) == 0
    assert read_manifest(tmp_path / "a")["mask_resize"] == "area"
    assert "masks resized by rule 'area'" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "d")]) == 0
    assert read_manifest(tmp_path / "d")["mask_resize"] == "nearest"
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x"), "--mask-resize", "max"])
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_run_report_header_names_the_rule(tmp_path: Path, shards_dir: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert "mask resize rule of the shards: unknown" in _mask_resize_line(run)  # no config.yaml
    save_config(load_config(None, [f"data.shards={shards_dir}"]), run / "config.yaml")
    assert "mask resize rule of the shards: `nearest`" in _mask_resize_line(run)
    save_config(load_config(None, [f"data.shards={tmp_path / 'gone'}"]), run / "config.yaml")
    assert "mask resize rule of the shards: unknown" in _mask_resize_line(run)


# --------------------------------------------------------------------------------------- determinism, atomicity
def test_output_bytes_do_not_depend_on_worker_count(tmp_path: Path, make_ddr) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 5, "test": 3}, size_px=80)
    one = write_shards(root, tmp_path / "w1", image_px=64, samples_per_shard=2, workers=1, progress=False)
    two = write_shards(root, tmp_path / "w2", image_px=64, samples_per_shard=2, workers=2, progress=False)
    assert one == two
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert "train-000002.tar" in names and "test-000001.tar" in names
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_way_leaves_no_output(tmp_path: Path, make_ddr, workers: int) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 4, "test": 2}, size_px=64)
    bad = root / "lesion_segmentation" / "test" / "image" / "test_001.jpg"  # the last image written
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=rf"image {bad} is corrupt"):
        write_shards(root, out, image_px=64, workers=workers, progress=False)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path: Path, make_ddr) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 2}, size_px=64)
    out = tmp_path / "shards"
    write_shards(root, out, image_px=32, workers=1, progress=False, samples_per_shard=1)
    with pytest.raises(FileExistsError, match=r"already exists; pass --overwrite \(overwrite=True\)"):
        write_shards(root, out, image_px=64, workers=1, progress=False)
    assert read_manifest(out)["image_px"] == 32
    manifest = write_shards(root, out, image_px=64, overwrite=True, workers=1, progress=False)
    assert manifest["image_px"] == read_manifest(out)["image_px"] == 64
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]  # train-000001 is gone
    assert _leftovers(tmp_path) == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o700), "the output folder should not stay private like a tempdir"


def test_failed_overwrite_keeps_the_old_output(tmp_path: Path, make_ddr) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 2}, size_px=64)
    out = tmp_path / "shards"
    write_shards(root, out, image_px=32, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = root / "lesion_segmentation" / "train" / "image" / "train_001.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        write_shards(root, out, image_px=64, overwrite=True, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- reported problems
def test_missing_and_non_binary_masks_are_counted(tmp_path: Path, make_ddr, caplog) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 3}, size_px=64)
    labels = root / "lesion_segmentation" / "train" / "label"
    (labels / "SE" / "train_002.tif").unlink()
    grey = cv2.imread(str(labels / "HE" / "train_000.tif"), cv2.IMREAD_UNCHANGED)
    grey[0, :3] = (60, 120, 200)
    cv2.imwrite(str(labels / "HE" / "train_000.tif"), grey)
    with pytest.raises(FileNotFoundError, match="--allow-missing-masks"):
        write_shards(root, tmp_path / "refused", image_px=32, workers=1, progress=False)
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING):
        manifest = write_shards(root, tmp_path / "s", image_px=32, allow_missing_masks=True, workers=1, progress=False)
    info = manifest["splits"]["train"]
    assert info["missing_masks"] == 1 and info["non_binary_masks"] == 1
    assert "binarised" in caplog.text and "train_000.tif" in caplog.text and "missing mask" in caplog.text


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `drseg shard"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"tool": "other", "splits": {}}))
    with pytest.raises(ValueError, match="not written by `drseg shard`"):
        read_manifest(tmp_path)


def test_unknown_split_lists_the_available_ones(shards_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"split 'val' .*available: \['test', 'train', 'valid'\]"):
        split_info(read_manifest(shards_dir), "val", shards_dir)


def test_bad_arguments_and_dotted_ids(tmp_path: Path, make_ddr) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 1}, size_px=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_shards(root, tmp_path / "s", image_px=100, progress=False)
    image = next((root / "lesion_segmentation" / "train" / "image").iterdir())
    image.rename(image.with_name("a.b.jpg"))
    for path in (root / "lesion_segmentation" / "train" / "label").glob("*/*.tif"):
        path.rename(path.with_name("a.b.tif"))
    with pytest.raises(ValueError, match=r"id 'a\.b' holds a '\.'"):
        write_shards(root, tmp_path / "s", image_px=32, workers=1, progress=False)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ data safety
KILLED_SHARD_RUN = """
import os, signal, sys
from hpc_drseg.data import shards
real_add = shards._SplitWriter.add
def add_then_die(self, sample):
    real_add(self, sample)
    os.kill(os.getpid(), signal.SIGKILL)  # as a preempted job or the OOM killer: no cleanup runs
shards._SplitWriter.add = add_then_die
shards.write_shards(sys.argv[1], sys.argv[2], image_px=32, workers=1, progress=False)
"""


def _age(path: Path, seconds: float = 600.0) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


@pytest.fixture
def small_ddr(tmp_path: Path, make_ddr) -> Path:
    return make_ddr(tmp_path / "DDR-dataset", counts={"train": 2, "test": 1}, size_px=64)


def _shard(root: Path, out: Path, **kwargs) -> dict:
    return write_shards(root, out, **{"image_px": 32, "workers": 1, "progress": False, **kwargs})


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    ("out", "relation"),
    [
        ("DDR-dataset", "is"),
        ("", "contains"),
        ("DDR-dataset/shards", "lies inside"),
        ("DDR-dataset/lesion_segmentation/train", "lies inside"),
        ("link-to-ddr", "is"),
        ("link-to-ddr/shards", "lies inside"),
    ],
)
def test_out_overlapping_the_ddr_tree_is_refused(tmp_path: Path, small_ddr: Path, out, relation, overwrite) -> None:
    (tmp_path / "link-to-ddr").symlink_to(small_ddr)
    given = tmp_path / out
    before = _snapshot(tmp_path)
    message = rf"^--out {re.escape(str(given))} {relation} the input --ddr-root {re.escape(str(small_ddr))}"
    with pytest.raises(InputError, match=message):
        _shard(small_ddr, given, overwrite=overwrite)
    assert _snapshot(tmp_path) == before


def test_ddr_root_given_as_lesion_segmentation_is_protected_too(tmp_path: Path, small_ddr: Path) -> None:
    with pytest.raises(InputError, match="contains the input --ddr-root"):
        _shard(small_ddr / "lesion_segmentation", small_ddr, overwrite=True)
    _shard(small_ddr / "lesion_segmentation", tmp_path / "DDR-dataset-shards")  # a sibling with a longer name is fine


def _user_folder(out: Path, previous: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")


def _shards_plus(name: str, folder: bool = False):
    def setup(out: Path, previous: Path) -> None:
        shutil.copytree(previous, out)
        (out / name).mkdir() if folder else (out / name).write_text("mine")

    return setup


def _foreign_manifest(out: Path, previous: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"tool": "someone else", "splits": {}}))
    (out / "train-000000.tar").write_bytes(b"their data")


def _symlinked_tar(out: Path, previous: Path) -> None:
    shutil.copytree(previous, out)
    (out / "test-000000.tar").unlink()
    (out / "test-000000.tar").symlink_to(previous / "test-000000.tar")


REFUSED_OUTPUTS = {
    "user folder": (_user_folder, r"no manifest.json of drseg shard in it"),
    "shards plus a user file": (_shards_plus("notes.md"), r"it holds notes.md, which drseg shard does not write"),
    "shards plus a folder": (_shards_plus("backup", folder=True), r"it holds backup,"),
    "shards plus a foreign tar": (_shards_plus("my-000000.tar"), r"it holds my-000000.tar,"),
    "foreign manifest": (_foreign_manifest, r"no manifest.json of drseg shard in it"),
    "symlinked shard": (_symlinked_tar, r"it holds test-000000.tar,"),
    "regular file": (lambda out, previous: out.write_text("a file"), r"is a file, not a folder"),
    "symlink to shards": (lambda out, previous: out.symlink_to(previous), r"is a symlink \(to "),
    "dangling symlink": (lambda out, previous: out.symlink_to(out.parent / "gone"), r"is a symlink \(to "),
}


@pytest.mark.parametrize("case", REFUSED_OUTPUTS, ids=list(REFUSED_OUTPUTS))
def test_overwrite_replaces_only_a_previous_shard_folder(tmp_path: Path, small_ddr: Path, case: str) -> None:
    previous = tmp_path / "previous"
    _shard(small_ddr, previous, samples_per_shard=1)
    out = tmp_path / "out"
    setup, reason = REFUSED_OUTPUTS[case]
    setup(out, previous)
    before = _snapshot(tmp_path)
    for overwrite in (True, False):  # without --overwrite, the error says at once that it would not help
        with pytest.raises(ExistsError, match=rf"^--out {re.escape(str(out))} .*{reason}"):
            _shard(small_ddr, out, overwrite=overwrite)
    assert _snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_an_empty_folder(tmp_path: Path, small_ddr: Path) -> None:
    (tmp_path / "out").mkdir()
    _shard(small_ddr, tmp_path / "out", overwrite=True)
    assert read_manifest(tmp_path / "out")["image_px"] == 32


def test_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path: Path, small_ddr: Path) -> None:
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-c", KILLED_SHARD_RUN, str(small_ddr), str(out)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    (killed,) = _leftovers(tmp_path)
    assert (tmp_path / killed / "train-000000.tar").is_file() and not out.exists()
    similar = [".shards.notes.tmp", ".shards.tmp-1a2b3c4d", f".shards-2.{killed.split('.', 2)[2]}", ".shards.old"]
    for name in similar:
        (tmp_path / name).write_text("not a temporary of this run")
        _age(tmp_path / name)
    _age(tmp_path / killed)
    _shard(small_ddr, out)
    assert _leftovers(tmp_path) == sorted(similar)


def test_disk_full_is_one_line_and_keeps_the_previous_shards(tmp_path: Path, small_ddr: Path, monkeypatch, capsys):
    out = tmp_path / "shards"
    _shard(small_ddr, out)
    before = _snapshot(out)
    real_open = tarfile.open

    def tar_on_a_full_disk(*args, **kwargs) -> tarfile.TarFile:
        tar = real_open(*args, **kwargs)
        real_write = tar.fileobj.write

        def write(data) -> int:
            if tar.offset > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)

        tar.fileobj.write = write
        return tar

    monkeypatch.setattr(tarfile, "open", tar_on_a_full_disk)
    full = rf"^no space left on device writing {re.escape(str(out))} \([0-9.]+ GB free\); free space or choose another"
    with pytest.raises(NoSpaceError, match=full + " --out$"):
        _shard(small_ddr, out, image_px=64, overwrite=True)
    argv = ["shard", "--ddr-root", str(small_ddr), "--out", str(out), "--image-px", "64", "--workers", "1"]
    assert main([*argv, "--overwrite", "--quiet"]) == 2
    assert re.fullmatch("drseg shard: error: " + full[1:] + " --out\n", capsys.readouterr().err)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file behind a descriptor")
def test_manifest_and_shards_are_synced_before_the_rename(tmp_path: Path, small_ddr: Path, monkeypatch) -> None:
    synced, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    out = tmp_path / "shards"
    _shard(small_ddr, out)
    names = {Path(path).name for path in synced if Path(path).parent.name.startswith(".shards.")}
    assert names == {"manifest.json", "train-000000.tar", "test-000000.tar"}
    assert synced[-1] == str(tmp_path)  # the rename itself


BAD_FIELDS = {
    "images as a string": (lambda m: m["splits"]["train"].update(images="8"), "splits.train.images"),
    "negative images": (lambda m: m["splits"]["train"].update(images=-1), "splits.train.images"),
    "image_px as a string": (lambda m: m.update(image_px="128"), "image_px"),
    "image_px as a bool": (lambda m: m.update(image_px=True), "image_px"),
    "no image_px": (lambda m: m.pop("image_px"), "image_px"),
    "shards as a string": (lambda m: m["splits"]["test"].update(shards="test-000000.tar"), "splits.test.shards"),
    "shard outside the folder": (lambda m: m["splits"]["test"]["shards"].__setitem__(0, "../x.tar"), "splits.test"),
    "shard sizes as floats": (
        lambda m: m["splits"]["valid"].update(shard_sizes=[2.0, 2.0]),
        "splits.valid.shard_sizes",
    ),
    "ids as numbers": (lambda m: m["splits"]["valid"].update(ids=[1, 2, 3, 4]), "splits.valid.ids"),
    "has_native as a string": (lambda m: m["splits"]["test"].update(has_native="yes"), "splits.test.has_native"),
    "image_codec unknown": (lambda m: m.update(image_codec="jpg"), "image_codec"),
    "mask_resize as a number": (lambda m: m.update(mask_resize=1), "mask_resize"),
    "samples_per_shard zero": (lambda m: m.update(samples_per_shard=0), "samples_per_shard"),
    "splits as a list": (lambda m: m.update(splits=["train"]), "splits"),
    "split as a string": (lambda m: m["splits"].update(train="train-000000.tar"), "splits"),
}


@pytest.mark.parametrize("case", BAD_FIELDS, ids=list(BAD_FIELDS))
def test_manifest_field_of_the_wrong_type_names_field_and_file(tmp_path: Path, shards_dir: Path, case: str) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    edit, field = BAD_FIELDS[case]
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    path = re.escape(str(tmp_path / "manifest.json"))
    with pytest.raises(InputError, match=rf"^{path}: field '{re.escape(field)}[.'].* must be .*re-run `drseg shard"):
        read_manifest(tmp_path)


def test_manifest_counts_that_disagree_are_refused(tmp_path: Path, shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["images"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest.json: split 'train' lists 7 images, 8 ids and shard sizes"):
        read_manifest(tmp_path)


def test_missing_split_names_split_folder_and_available_ones(tmp_path: Path, make_ddr, caplog) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"test": 1}, size_px=64)
    with caplog.at_level(logging.WARNING):
        manifest = _shard(root, tmp_path / "s")
    assert "has no train split" in caplog.text
    with pytest.raises(
        InputError,
        match=rf"^split 'train' is not in the shards {re.escape(str(tmp_path / 's'))}; "
        r"available: \['test'\] .*lesion_segmentation/train/",
    ):
        split_info(manifest, "train", tmp_path / "s")
    with pytest.raises(InputError, match=r"^split 'valid' is not in these shards; available: \['test'\]"):
        split_info(manifest, "valid")
