"""DDR reader: layout discovery, sample reading in LESIONS order, and every bad-input error (names the file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import available_splits, find_samples, read_sample, resolve_root

COUNTS = {"train": 3, "valid": 2}


@pytest.fixture
def tree(tmp_path: Path, make_ddr) -> Path:
    return make_ddr(tmp_path / "DDR-dataset", counts=COUNTS, size_px=64)


def _split_dir(tree: Path, split: str = "train") -> Path:
    return tree / "lesion_segmentation" / split


def test_find_samples_lists_sorted_ids_with_one_mask_per_lesion(tree: Path) -> None:
    samples = find_samples(tree, "train")
    assert [s.id for s in samples] == ["train_000", "train_001", "train_002"]
    for sample in samples:
        assert list(sample.masks) == list(LESIONS)
        for lesion, path in sample.masks.items():
            assert path == _split_dir(tree) / "label" / lesion / f"{sample.id}.tif"
    assert available_splits(tree) == ["train", "valid"]


def test_root_may_be_the_lesion_segmentation_folder_itself(tree: Path) -> None:
    assert resolve_root(tree) == resolve_root(tree / "lesion_segmentation") == tree / "lesion_segmentation"
    assert find_samples(tree / "lesion_segmentation", "valid") == find_samples(tree, "valid")


@pytest.mark.parametrize("mask_ext", [".tif", ".png"])
def test_read_sample_gives_rgb_and_binary_masks_in_lesions_order(tmp_path: Path, make_ddr, mask_ext: str) -> None:
    root = make_ddr(tmp_path / "ddr", counts={"train": 2}, size_px=64, mask_ext=mask_ext)
    files = find_samples(root, "train")[1]
    sample = read_sample(files)
    bgr = cv2.imread(str(files.image))
    np.testing.assert_array_equal(sample.image, bgr[..., ::-1])  # RGB, not OpenCV's BGR
    assert sample.image.dtype == np.uint8 and sample.masks.dtype == np.uint8
    assert sample.masks.shape == (*bgr.shape[:2], 4)
    for channel, lesion in enumerate(LESIONS):
        on_disk = cv2.imread(str(files.masks[lesion]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(sample.masks[..., channel], (on_disk > 0).astype(np.uint8))
    assert set(np.unique(sample.masks)) <= {0, 1}
    assert sample.masks.any(), "the hand-made tree draws lesions; an all-zero read means the masks were lost"
    assert sample.missing_masks == () and sample.non_binary_masks == ()


def test_not_a_ddr_tree_says_which_layout_is_expected(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a DDR tree.*lesion_segmentation/\{train,valid,test\}/image"):
        resolve_root(tmp_path / "photos")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_root(tmp_path / "nowhere")


def test_empty_split_is_an_error_naming_the_folder(tree: Path) -> None:
    for path in (_split_dir(tree, "valid") / "image").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"split 'valid' is empty.*valid/image"):
        find_samples(tree, "valid")


def test_absent_split_folder_is_an_error(tree: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"test/image does not exist"):
        find_samples(tree, "test")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image_is_an_error_naming_the_file(tree: Path, damage: str) -> None:
    files = find_samples(tree, "train")[0]
    data = files.image.read_bytes()
    files.image.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg at all")
    with pytest.raises(ValueError, match=rf"image {files.image} is corrupt or unreadable"):
        read_sample(files)


def test_corrupt_mask_is_an_error_naming_the_file(tree: Path) -> None:
    files = find_samples(tree, "train")[0]
    files.masks["SE"].write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match=rf"mask {files.masks['SE']} is corrupt or unreadable"):
        read_sample(files)


def test_missing_mask_is_an_error_unless_allowed_then_zeros(tree: Path) -> None:
    missing = _split_dir(tree) / "label" / "HE" / "train_001.tif"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*--allow-missing-masks"):
        find_samples(tree, "train")
    files = find_samples(tree, "train", allow_missing_masks=True)[1]
    assert files.masks["HE"] is None
    with pytest.raises(FileNotFoundError, match=r"train_001.*no HE mask"):
        read_sample(files)
    sample = read_sample(files, allow_missing_masks=True)
    assert sample.missing_masks == ("HE",)
    assert not sample.masks[..., LESIONS.index("HE")].any()


def test_missing_lesion_folder_is_an_error_unless_allowed(tree: Path) -> None:
    shutil.rmtree(_split_dir(tree) / "label" / "SE")
    with pytest.raises(FileNotFoundError, match=r"label/SE does not exist.*--allow-missing-masks"):
        find_samples(tree, "train")
    samples = find_samples(tree, "train", allow_missing_masks=True)
    assert all(s.masks["SE"] is None for s in samples)


def test_mask_without_image_is_an_error_naming_the_mask(tree: Path) -> None:
    orphan = _split_dir(tree) / "label" / "MA" / "train_999.tif"
    cv2.imwrite(str(orphan), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=rf"have no image.*{orphan}"):
        find_samples(tree, "train")


def test_mask_of_another_size_is_an_error_naming_both_files(tree: Path) -> None:
    files = find_samples(tree, "train")[2]
    cv2.imwrite(str(files.masks["EX"]), np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match=rf"mask {files.masks['EX']} is 12×10 but its image {files.image}"):
        read_sample(files)


def test_non_binary_mask_is_binarised_and_reported(tree: Path) -> None:
    files = find_samples(tree, "train")[0]
    height, width = read_sample(files).image.shape[:2]
    values = np.zeros((height, width), np.uint8)
    values[1, 1], values[2, 3], values[5, 5] = 128, 255, 7  # anti-aliased edges, as some DDR copies have
    cv2.imwrite(str(files.masks["MA"]), values)
    binary = np.zeros((height, width), np.uint8)
    binary[4, 4] = 1  # {0, 1} is binary: one "on" value
    cv2.imwrite(str(files.masks["EX"]), binary)
    sample = read_sample(files)
    assert sample.non_binary_masks == ("MA",)
    np.testing.assert_array_equal(sample.masks[..., LESIONS.index("MA")], (values > 0).astype(np.uint8))
    np.testing.assert_array_equal(sample.masks[..., LESIONS.index("EX")], binary)


def test_colour_saved_mask_counts_any_channel(tree: Path) -> None:
    files = find_samples(tree, "train")[0]
    height, width = read_sample(files).image.shape[:2]
    colour = np.zeros((height, width, 3), np.uint8)
    colour[3, 4, 2] = 255
    path = files.masks["SE"].with_suffix(".png")
    files.masks["SE"].unlink()
    cv2.imwrite(str(path), colour)
    sample = read_sample(find_samples(tree, "train")[0])
    assert sample.masks[..., LESIONS.index("SE")].sum() == 1 and sample.masks[3, 4, LESIONS.index("SE")] == 1


def test_two_files_for_one_id_is_an_error(tree: Path) -> None:
    mask = _split_dir(tree) / "label" / "MA" / "train_000.tif"
    shutil.copy(mask, mask.with_suffix(".png"))
    with pytest.raises(ValueError, match="same id 'train_000'"):
        find_samples(tree, "train")
