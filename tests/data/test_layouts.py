"""Other dataset layouts behind the reader interface: IDRiD (absent lesion files, 0/255 or 0/1 masks, the valid split
carved from training) and plain folders, sharded by `drseg shard --layout`; every bad input is one line naming the
path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from hpc_drseg.cli import main
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.ddr import read_sample
from hpc_drseg.data.idrid import IMAGES_DIR, MASKS_DIR, SEGMENTATION_DIR, carve_valid
from hpc_drseg.data.layouts import Reader, build_reader, dataset_name
from hpc_drseg.data.manifest import read_manifest
from hpc_drseg.data.synth_idrid import write_synthetic_idrid

TRAIN_SET, TEST_SET = "a. Training Set", "b. Testing Set"
# IDRiD's folders are numbered in another order than LESIONS: folder → (file code, channel in LESIONS)
FOLDERS = {"1. Microaneurysms": "MA", "2. Haemorrhages": "HE", "3. Hard Exudates": "EX", "4. Soft Exudates": "SE"}


@pytest.fixture(scope="module")
def idrid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 training and 3 test images of ~128 px, written by `drseg synth --layout idrid`."""
    out = tmp_path_factory.mktemp("idrid") / "IDRiD"
    return write_synthetic_idrid(out, {"train": 5, "test": 3}, size_px=128, seed=0, progress=False, workers=1)


@pytest.fixture
def idrid_copy(idrid_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(idrid_root, tmp_path / "IDRiD"))


def _masks(root: Path, split_set: str = TRAIN_SET) -> Path:
    return root / SEGMENTATION_DIR / MASKS_DIR / split_set


def test_synthetic_idrid_tree_omits_absent_lesions_and_holds_0_255_tifs(idrid_root: Path) -> None:
    images = sorted((idrid_root / SEGMENTATION_DIR / IMAGES_DIR / TEST_SET).iterdir())
    assert [p.name for p in images] == ["IDRiD_06.jpg", "IDRiD_07.jpg", "IDRiD_08.jpg"]  # numbered across sets
    masks = sorted(_masks(idrid_root).glob("*/*.tif")) + sorted(_masks(idrid_root, TEST_SET).glob("*/*.tif"))
    assert 0 < len(masks) < 8 * 4, "some lesion files must be absent, as in IDRiD"
    for path in masks:
        values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert values.ndim == 2 and set(np.unique(values)) == {0, 255}, path
        assert path.stem.endswith("_" + FOLDERS[path.parent.name])


def test_idrid_reader_maps_folders_to_lesions_and_absent_files_to_empty(idrid_root: Path) -> None:
    reader = build_reader("idrid", idrid_root, valid_fraction=0)
    assert isinstance(reader, Reader) and reader.splits() == ["train", "test"]
    samples = reader.samples("train")
    assert [s.id for s in samples] == [f"IDRiD_0{i}" for i in range(1, 6)]
    absent = 0
    for files in samples:
        sample = read_sample(files)  # no allow_missing_masks needed: IDRiD's absent file means no lesion
        assert sample.missing_masks == () and sample.non_binary_masks == ()
        for channel, lesion in enumerate(LESIONS):
            path = files.masks[lesion]
            if path is None:
                absent += 1
                assert not sample.masks[..., channel].any()
            else:  # the channel of LESIONS holds the file of the same lesion (HE = haemorrhages, EX = hard exudates)
                assert FOLDERS[path.parent.name] == lesion and path.stem.endswith(f"_{lesion}")
                np.testing.assert_array_equal(sample.masks[..., channel], cv2.imread(str(path), 0) // 255)
    assert absent > 0


def test_masks_of_0_1_are_read_and_other_values_are_an_error(idrid_copy: Path) -> None:
    path = next(_masks(idrid_copy).glob("3. Hard Exudates/*.tif"))
    mask = cv2.imread(str(path), 0)
    cv2.imwrite(str(path), mask // 255)  # 0/1
    reader = build_reader("idrid", idrid_copy, valid_fraction=0)
    files = next(f for f in reader.samples("train") if f.masks["EX"] == path)
    np.testing.assert_array_equal(read_sample(files).masks[..., LESIONS.index("EX")], mask // 255)
    cv2.imwrite(str(path), mask // 2)  # 0/127
    with pytest.raises(
        ValueError, match=rf"mask {re.escape(str(path))} holds values 0, 127; a mask must hold 0/255 or 0/1 only"
    ):
        read_sample(files)


def test_valid_fraction_is_deterministic_disjoint_and_leaves_test_alone(idrid_root: Path) -> None:
    ids = [f"IDRiD_{i:02d}" for i in range(1, 55)]
    valid = carve_valid(ids, 0.2, seed=0)
    assert len(valid) == 11 and valid == carve_valid(list(reversed(ids)), 0.2, seed=0)  # input order is irrelevant
    assert valid != carve_valid(ids, 0.2, seed=1)
    reader = build_reader("idrid", idrid_root, valid_fraction=0.4, split_seed=3)
    again = build_reader("idrid", idrid_root, valid_fraction=0.4, split_seed=3)
    split_ids = {split: [s.id for s in reader.samples(split)] for split in reader.splits()}
    assert split_ids == {split: [s.id for s in again.samples(split)] for split in again.splits()}
    assert len(split_ids["valid"]) == 2 and not set(split_ids["valid"]) & set(split_ids["train"])
    assert sorted(split_ids["train"] + split_ids["valid"]) == [f"IDRiD_0{i}" for i in range(1, 6)]
    assert split_ids["test"] == ["IDRiD_06", "IDRiD_07", "IDRiD_08"]


def test_shard_idrid_cli_records_dataset_and_layout(idrid_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    argv = ["shard", "--layout", "idrid", "--root", str(idrid_root), "--out", str(out), "--image-px", "64"]
    assert main([*argv, "--workers", "1", "--quiet", "--valid-fraction", "0.2"]) == 0
    manifest = read_manifest(out)
    assert (manifest["layout"], dataset_name(manifest), manifest["valid_fraction"]) == ("idrid", "IDRiD", 0.2)
    assert {split: info["images"] for split, info in manifest["splits"].items()} == {"train": 4, "valid": 1, "test": 3}
    assert manifest["splits"]["test"]["has_native"] and manifest["splits"]["test"]["missing_masks"] == 0
    assert "dataset IDRiD (layout idrid)" in capsys.readouterr().out


def test_manifests_without_a_dataset_read_as_ddr(shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert dataset_name(manifest) == "DDR" and manifest["layout"] == "ddr"
    del manifest["dataset"]
    assert dataset_name(manifest) == "DDR"


def _folders_tree(root: Path, pattern: str = "{stem}.png", splits: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        base = root / split
        (base / "images").mkdir(parents=True)
        for index in range(2):
            stem = f"eye{index}"
            cv2.imwrite(str(base / "images" / f"{stem}.jpg"), rng.integers(0, 255, (40, 48, 3), np.uint8))
            for lesion in LESIONS:
                (base / "masks" / lesion).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((40, 48), np.uint8)
                mask[5 + index : 9, 3 : 7 + LESIONS.index(lesion)] = 255
                cv2.imwrite(str(base / "masks" / lesion / pattern.format(stem=stem, lesion=lesion)), mask)
    return root


def test_folders_layout_single_split_with_a_pattern(tmp_path: Path, capsys) -> None:
    root = _folders_tree(tmp_path / "e-ophtha", pattern="{stem}_{lesion}.png")
    reader = build_reader("folders", root, mask_pattern="{stem}_{lesion}.png")
    assert reader.splits() == ["test"] and reader.dataset == "e-ophtha"
    files = reader.samples("test")[1]
    assert files.id == "eye1" and files.masks["HE"] == root / "masks" / "HE" / "eye1_HE.png"
    sample = read_sample(files)
    assert [int(sample.masks[..., c].sum()) for c in range(4)] == [
        3 * (4 + c) for c in range(4)
    ]  # rows 6-8, 4+c columns
    out = tmp_path / "shards"
    argv = ["shard", "--layout", "folders", "--root", str(root), "--mask-pattern", "{stem}_{lesion}.png"]
    assert main([*argv, "--out", str(out), "--image-px", "32", "--quiet", "--dataset-name", "e-ophtha EX"]) == 0
    assert dataset_name(read_manifest(out)) == "e-ophtha EX" and list(read_manifest(out)["splits"]) == ["test"]


def test_folders_layout_split_subfolders(tmp_path: Path) -> None:
    root = _folders_tree(tmp_path / "fgadr", splits=("train", "test"))
    reader = build_reader("folders", root)
    assert reader.splits() == ["train", "test"] and [s.id for s in reader.samples("train")] == ["eye0", "eye1"]
    with pytest.raises(ValueError, match="--split valid is for a single images/ folder"):
        build_reader("folders", root, split="valid").splits()


def _break(root: Path, case: str) -> str:
    """Damages an IDRiD copy; returns the expected message (regex)."""
    ex = _masks(root) / "3. Hard Exudates"
    if case == "missing folder":
        shutil.rmtree(ex)
        return rf"ground-truth folder {re.escape(str(ex))} does not exist; restore it"
    if case == "image without id":
        (root / SEGMENTATION_DIR / IMAGES_DIR / TRAIN_SET / "photo 1.jpg").write_bytes(b"x")
        return r"photo 1\.jpg: not an IDRiD image name \(IDRiD_NN\.jpg\); rename it"
    if case == "mask in the wrong folder":
        shutil.copy(next(ex.glob("*.tif")), ex.parent / "2. Haemorrhages" / "IDRiD_01_EX.tif")
        return r"IDRiD_01_EX\.tif: not an IDRiD HE mask name .* move it to the folder of its lesion"
    if case == "mask without image":
        shutil.copy(next(ex.glob("*.tif")), ex / "IDRiD_99_EX.tif")
        return r"IDRiD_99_EX\.tif has no image IDRiD_99\.jpg"
    path = next(ex.glob("*.tif"))
    if case == "mask of wrong size":
        cv2.imwrite(str(path), np.zeros((10, 12), np.uint8))
        return rf"mask {re.escape(str(path))} is 12×10 but its image .*re-export the mask"
    path.write_bytes(b"not a tiff")  # unreadable
    return rf"mask {re.escape(str(path))} is corrupt or unreadable .*; replace it"


@pytest.mark.parametrize(
    "case",
    ["missing folder", "image without id", "mask in the wrong folder", "mask without image", "mask of wrong size",
     "unreadable file"],
)  # fmt: skip
def test_bad_idrid_inputs_are_one_line_naming_the_path(idrid_copy: Path, tmp_path: Path, capsys, case: str) -> None:
    expected = _break(idrid_copy, case)
    argv = ["shard", "--layout", "idrid", "--root", str(idrid_copy), "--out", str(tmp_path / "s"), "--image-px", "32"]
    assert main([*argv, "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("drseg shard: error: ")
    assert re.search(expected, err), err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("make", "layout_args", "message"),
    [
        (lambda r: r, ["--layout", "idrid"], r"IDRiD root .* does not exist; expected A\. Segmentation/"),
        (lambda r: r.mkdir(), ["--layout", "idrid"], r"is not an IDRiD segmentation tree \(no '1\. Original Images'"),
        (lambda r: r.mkdir(), ["--layout", "folders"], r"has no images/ folder \(nor train\|valid\|test/images/\)"),
        (lambda r: _folders_tree(r), ["--layout", "folders", "--mask-pattern", "{name}.png"], r"must contain \{stem\}"),
        (lambda r: shutil.rmtree(_folders_tree(r) / "masks" / "SE"), ["--layout", "folders"], r"masks/SE does not"),
        (
            lambda r: (_folders_tree(r) / "masks" / "MA" / "eye1.png").unlink(),
            ["--layout", "folders"],
            r"e\.g\. .*eye1",
        ),
        (lambda r: r.mkdir(), ["--layout", "idrid", "--valid-fraction", "1"], r"valid_fraction: got 1\.0; it must be"),
        (lambda r: r.mkdir(), ["--layout", "ddr", "--mask-pattern", "x"], r"only for --layout folders"),
    ],
)
def test_bad_layout_arguments_and_trees(tmp_path: Path, capsys, make, layout_args: list, message: str) -> None:
    root = tmp_path / "data"
    make(root)
    assert main(["shard", *layout_args, "--root", str(root), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_layout_ddr_root_gives_the_same_shards_as_ddr_root(tmp_path: Path, make_ddr) -> None:
    from tree_snapshot import snapshot

    root = make_ddr(tmp_path / "DDR", counts={"train": 2, "test": 2}, size_px=48)
    common = ["--image-px", "32", "--workers", "1", "--quiet"]
    assert main(["shard", "--ddr-root", str(root), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["shard", "--layout", "ddr", "--root", str(root), "--out", str(tmp_path / "b"), *common]) == 0
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert (read_manifest(tmp_path / "a")["layout"], dataset_name(read_manifest(tmp_path / "a"))) == ("ddr", "DDR")
