"""Sharder: MA-preserving mask resize, exact round trip of images/masks/native masks, manifest counts, atomicity,
worker-count independence, compatibility with the webdataset library."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from hpc_drseg import __version__
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import available_splits, find_samples, read_sample
from hpc_drseg.data.pipeline import decode_sample
from hpc_drseg.data.shards import (
    iter_shard_samples,
    pack_masks,
    read_manifest,
    resize_image,
    resize_mask,
    shard_groups,
    split_info,
    unpack_masks,
    write_shards,
)


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
@pytest.mark.parametrize("y, x", [(0, 0), (1, 2), (3, 3), (37, 18), (63, 63)])
def test_single_pixel_lesion_survives_4x_downscale(y: int, x: int) -> None:
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[y, x, 0] = 1
    small = resize_mask(mask, 16)
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
    np.testing.assert_array_equal(resize_mask(mask, size), _footprint_max(mask, size))


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
                for channel, lesion in enumerate(LESIONS):
                    np.testing.assert_array_equal(
                        sample.mask[..., channel], resize_mask(expected.masks, image_px)[..., channel], err_msg=lesion
                    )
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
    assert list(manifest["splits"]) == ["train", "valid", "test"]
    for split, info in manifest["splits"].items():
        samples = [read_sample(files) for files in find_samples(ddr_root, split)]
        masks = [s.masks for s in samples]
        assert info["images"] == len(samples)
        assert list(info["lesion_images"]) == list(info["lesion_pixels"]) == list(LESIONS)
        for channel, lesion in enumerate(LESIONS):
            assert info["lesion_images"][lesion] == sum(int(m[..., channel].any()) for m in masks)
            assert info["lesion_pixels"][lesion] == sum(int(m[..., channel].sum()) for m in masks)
            resized = sum(int(resize_mask(m, 128)[..., channel].sum()) for m in masks)
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
    write_shards(root, out, image_px=32, workers=1, progress=False)
    (out / "stale.txt").write_text("from an older run")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True \(CLI: --overwrite\)"):
        write_shards(root, out, image_px=64, workers=1, progress=False)
    assert read_manifest(out)["image_px"] == 32
    manifest = write_shards(root, out, image_px=64, overwrite=True, workers=1, progress=False)
    assert manifest["image_px"] == read_manifest(out)["image_px"] == 64
    assert not (out / "stale.txt").exists()
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
