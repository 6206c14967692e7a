"""Synthetic DDR-like data: layout, file formats, determinism, lesion statistics, atomic writing."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from tree_snapshot import snapshot as _snapshot

from hpc_drseg import __version__
from hpc_drseg.atomic import NoSpaceError
from hpc_drseg.constants import LESIONS, SPLITS
from hpc_drseg.data import fundus, synth
from hpc_drseg.data.fundus import PREVALENCE, render_fundus
from hpc_drseg.data.synth import write_synthetic_ddr

COUNTS = {"train": 3, "valid": 2, "test": 2}
SIZE_PX = 128


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    return mask


def _image_ids(root: Path, split: str) -> list[str]:
    return sorted(p.stem for p in (root / "lesion_segmentation" / split / "image").glob("*.jpg"))


def _mask_paths(root: Path) -> list[Path]:
    return sorted((root / "lesion_segmentation").glob("*/label/*/*"))


def _temp_siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ddr"
    return write_synthetic_ddr(out, COUNTS, SIZE_PX, seed=3, progress=False, workers=1)


# ------------------------------------------------------------------------------------------------ layout, formats
def test_layout_and_file_counts(tree: Path) -> None:
    assert sorted(p.name for p in (tree / "lesion_segmentation").iterdir()) == sorted(SPLITS)
    all_ids = []
    for split, count in COUNTS.items():
        folder = tree / "lesion_segmentation" / split
        ids = _image_ids(tree, split)
        assert len(ids) == count
        assert sorted(p.name for p in (folder / "label").iterdir()) == sorted(LESIONS)
        for lesion in LESIONS:
            assert sorted(p.stem for p in (folder / "label" / lesion).iterdir()) == ids  # four masks per image
        all_ids += ids
    assert len(set(all_ids)) == len(all_ids)
    assert all(re.fullmatch(r"\d{3}-\d{4}-\d{3}", image_id) for image_id in all_ids)


def test_both_mask_formats_and_one_format_per_image(tree: Path) -> None:
    suffixes = {p.suffix for p in _mask_paths(tree)}
    assert suffixes == {".tif", ".png"}
    for split in COUNTS:
        for image_id in _image_ids(tree, split):
            found = {p.suffix for p in (tree / "lesion_segmentation" / split / "label").glob(f"*/{image_id}.*")}
            assert len(found) == 1


def test_masks_are_binary_single_channel_and_match_image_size(tree: Path) -> None:
    for split in COUNTS:
        for image_id in _image_ids(tree, split):
            image = cv2.imread(str(tree / "lesion_segmentation" / split / "image" / f"{image_id}.jpg"))
            assert image.ndim == 3 and image.shape[2] == 3
            assert min(image.shape[:2]) >= synth.MIN_SIDE_PX
            for path in (tree / "lesion_segmentation" / split / "label").glob(f"*/{image_id}.*"):
                mask = _read_mask(path)
                assert mask.dtype == np.uint8 and mask.shape == image.shape[:2], path
                assert set(np.unique(mask).tolist()) <= {0, 255}, path


def test_images_are_saved_as_rgb_not_swapped(tree: Path) -> None:
    # cv2 reads BGR: a fundus is orange-red, so the third channel must dominate the first inside the field of view.
    for split in COUNTS:
        for image_id in _image_ids(tree, split):
            bgr = cv2.imread(str(tree / "lesion_segmentation" / split / "image" / f"{image_id}.jpg"))
            fov = bgr.max(axis=2) > 40
            assert bgr[..., 2][fov].mean() > 1.5 * bgr[..., 0][fov].mean()


def test_sizes_vary_around_size_px(tmp_path: Path) -> None:
    shapes = {fundus.image_shape(np.random.default_rng(i), 512) for i in range(40)}
    assert all(0.85 * 512 - 1 <= side <= 1.15 * 512 + 1 for shape in shapes for side in shape)
    assert any(h != w for h, w in shapes) and any(h == w for h, w in shapes)
    assert len(shapes) > 20


# -------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_files_whatever_the_workers(tree: Path, tmp_path: Path) -> None:
    again = write_synthetic_ddr(tmp_path / "again", COUNTS, SIZE_PX, seed=3, progress=False, workers=2)
    masks_a, masks_b = _mask_paths(tree), _mask_paths(again)
    assert [p.relative_to(tree) for p in masks_a] == [p.relative_to(again) for p in masks_b]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(masks_a, masks_b))
    for split in COUNTS:
        assert _image_ids(tree, split) == _image_ids(again, split)
        for image_id in _image_ids(tree, split):
            rel = Path("lesion_segmentation", split, "image", f"{image_id}.jpg")
            assert np.array_equal(cv2.imread(str(tree / rel)), cv2.imread(str(again / rel)))


def test_different_seeds_differ(tree: Path, tmp_path: Path) -> None:
    other = write_synthetic_ddr(tmp_path / "other", COUNTS, SIZE_PX, seed=4, progress=False, workers=1)
    assert _image_ids(tree, "train") != _image_ids(other, "train")
    first = [cv2.imread(str(p)) for p in sorted((tree / "lesion_segmentation/train/image").iterdir())]
    second = [cv2.imread(str(p)) for p in sorted((other / "lesion_segmentation/train/image").iterdir())]
    assert all(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first, second))


def test_render_fundus_contract_and_determinism() -> None:
    image, masks = render_fundus(np.random.default_rng(7), 150, 170)
    assert image.shape == (150, 170, 3) and image.dtype == np.uint8
    assert list(masks) == list(LESIONS)
    assert all(m.shape == (150, 170) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255} for m in masks.values())
    image2, masks2 = render_fundus(np.random.default_rng(7), 150, 170)
    assert np.array_equal(image, image2) and all(np.array_equal(masks[k], masks2[k]) for k in LESIONS)
    with pytest.raises(ValueError, match="64"):
        render_fundus(np.random.default_rng(0), 32, 200)


# --------------------------------------------------------------------------------------------- lesion statistics
def _render_sample(n: int, size_px: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([11, 0, i])
        out.append(render_fundus(rng, *fundus.image_shape(rng, size_px)))
    return out


def test_lesions_are_sparse_and_prevalence_is_ddr_like() -> None:
    sample = _render_sample(120, 96)
    present = {k: np.mean([(m[k] > 0).any() for _, m in sample]) for k in LESIONS}
    for lesion in LESIONS:  # DDR: MA 75 %, EX 64 %, SE 32 %, HE 79 % of images
        assert abs(present[lesion] - PREVALENCE[lesion]) < 0.12, (lesion, present[lesion])
    lesion_free = sum(not any((m[k] > 0).any() for k in LESIONS) for _, m in sample)
    assert 1 <= lesion_free <= 0.1 * len(sample)


def test_lesion_pixels_below_one_percent_at_realistic_size() -> None:
    sample = _render_sample(16, 320)
    lesion_px = sum(int(((m["MA"] | m["EX"] | m["SE"] | m["HE"]) > 0).sum()) for _, m in sample)
    total_px = sum(image.shape[0] * image.shape[1] for image, _ in sample)
    assert 0 < lesion_px / total_px < 0.01
    # Lesions differ in colour from their surroundings, so a model can learn them: dark red MA/HE, bright EX/SE.
    for lesion, brighter in (("MA", False), ("HE", False), ("EX", True), ("SE", True)):
        inside, around = [], []
        for image, masks in sample:
            grey = image.mean(axis=2)
            inside.append(grey[masks[lesion] > 0])
            around.append(grey[cv2.dilate(masks[lesion], np.ones((9, 9), np.uint8)) > masks[lesion]])
        inside, around = np.concatenate(inside), np.concatenate(around)
        assert (inside.mean() > around.mean() + 15) if brighter else (inside.mean() < around.mean() - 15), lesion


@pytest.mark.parametrize("lesion", LESIONS)
def test_mask_marks_exactly_the_pixels_painted_at_least_halfway(lesion: str) -> None:
    # On a flat grey canvas a pixel's colour change is alpha x |tint - grey|, and the lesion's centre gets the full
    # alpha (0.85-0.95): so masked pixels changed >= 1/2 of the tint distance, unmasked ones < 1/2 of it.
    rng = np.random.default_rng(5)
    eye = fundus._draw_eye(rng, 400, 400)
    image = np.full((3, 400, 400), 100.0, np.float32)
    mask = np.zeros((400, 400), bool)
    blob = fundus._lesion_blobs(rng, eye, lesion, severity=1.0)[0]
    fundus._paint_lesion(rng, image, mask, np.ones_like(mask), lesion, blob)
    change = np.abs(image - 100.0).sum(axis=0)
    assert mask.any() and change[mask].min() >= 0.5 * change.max() - 1e-3
    assert change[~mask].max() < 0.5 / 0.85 * change.max()
    assert change[~mask].max() > 0  # a soft fringe is painted but not marked


def test_lesions_lie_inside_the_field_of_view() -> None:
    for image, masks in _render_sample(12, 256):
        h, w = image.shape[:2]
        assert image[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]].max() < 20  # black corners outside the disc
        points = cv2.findNonZero((image[..., 0] > 25).astype(np.uint8))
        fov = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(fov, cv2.convexHull(points), 1)
        for lesion in LESIONS:
            assert not ((masks[lesion] > 0) & (fov == 0)).any(), lesion


# ------------------------------------------------------------------------------------------- atomicity, errors
def _small(out: Path, counts: dict | None = None, **kwargs) -> Path:
    return write_synthetic_ddr(out, counts or {"train": 1}, 96, **{"progress": False, "workers": 1, **kwargs})


def test_every_tree_carries_the_marker(tree: Path) -> None:
    marker = json.loads((tree / synth.MARKER).read_text())
    assert marker == {
        "tool": "hpc_drseg",
        "command": "synth",
        "version": __version__,
        "counts": COUNTS,
        "size_px": SIZE_PX,
        "seed": 3,
    }
    assert sorted(p.name for p in tree.iterdir()) == [synth.MARKER, "lesion_segmentation"]


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path: Path) -> None:
    out = _small(tmp_path / "ddr")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _small(out, {"valid": 2})
    assert _image_ids(out, "train") and _temp_siblings(out) == []
    assert _small(out, {"valid": 2}, overwrite=True) == out
    assert [p.name for p in (out / "lesion_segmentation").iterdir()] == ["valid"]  # splits with 0 are not written
    assert len(_image_ids(out, "valid")) == 2 and _temp_siblings(out) == []


def _real_ddr(out: Path) -> None:
    _small(out)
    (out / synth.MARKER).unlink()  # what a real DDR copy looks like: the layout, no marker


def _synth_plus(relative: str):
    def setup(out: Path) -> None:
        _small(out)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text("the user's")

    return setup


def _symlink_to_synth(out: Path) -> None:
    _small(out.parent / "real-synth")
    out.symlink_to(out.parent / "real-synth")


def _foreign_marker(out: Path) -> None:
    _small(out)
    (out / synth.MARKER).write_text(json.dumps({"tool": "hpc_drseg", "command": "shard"}))


REFUSED_OUTPUTS = {
    "user folder": (lambda out: (out.mkdir(), (out / "keep.txt").write_text("mine")), "no .hpc_drseg-synth.json"),
    "real DDR copy": (_real_ddr, "no .hpc_drseg-synth.json"),
    "marker of another command": (_foreign_marker, "no .hpc_drseg-synth.json"),
    "synth tree plus shards": (_synth_plus("shards/manifest.json"), "it holds shards, which drseg synth"),
    "synth tree plus a note": (_synth_plus("lesion_segmentation/train/notes.txt"), "holds lesion_segmentation/train/"),
    "synth tree plus an image": (_synth_plus("lesion_segmentation/train/image/x.png"), "train/image/x.png"),
    "regular file": (lambda out: out.write_text("a file"), "is a file, not a folder"),
    "symlink to a synth tree": (_symlink_to_synth, r"is a symlink \(to "),
}


@pytest.mark.parametrize("case", REFUSED_OUTPUTS, ids=list(REFUSED_OUTPUTS))
def test_overwrite_replaces_only_a_previous_synth_tree(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    setup, reason = REFUSED_OUTPUTS[case]
    setup(out)
    before = _snapshot(tmp_path)
    for overwrite in (True, False):  # without --overwrite, the error says at once that it would not help
        with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(out))} .*{reason}"):
            _small(out, overwrite=overwrite)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert _image_ids(_small(tmp_path / "out", overwrite=True), "train")


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    out = tmp_path / "ddr"
    if existing:
        _small(out)
    before = _snapshot(tmp_path)
    calls = []
    real_write = synth._write_sample

    def flaky_write(*args, **kwargs) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(synth, "_write_sample", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_ddr(out, COUNTS, 96, progress=False, workers=1, overwrite=existing)
    assert len(calls) == 3
    assert _temp_siblings(out) == [] and _snapshot(tmp_path) == before


def test_disk_full_is_one_line_and_keeps_the_previous_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _small(tmp_path / "ddr")
    before = _snapshot(tmp_path)

    def full_disk(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth, "_write_sample", full_disk)
    full = rf"^no space left on device writing {re.escape(str(out))} \([0-9.]+ GB free\); free space or choose"
    with pytest.raises(NoSpaceError, match=full):
        _small(out, overwrite=True)
    assert _snapshot(tmp_path) == before


KILLED_SYNTH_RUN = """
import os, signal, sys
from hpc_drseg.data import fundus, synth
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)  # as a preempted job or the OOM killer: no cleanup runs
synth._write_marker = die
synth.write_synthetic_ddr(sys.argv[1], {"train": 1}, 96, progress=False, workers=1)
"""


def test_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "ddr"
    done = subprocess.run([sys.executable, "-c", KILLED_SYNTH_RUN, str(out)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    (killed,) = _temp_siblings(out)
    assert list(killed.glob("lesion_segmentation/train/image/*.jpg")) and not out.exists()
    keep = tmp_path / ".ddr.tmp-1a2b3c4d"  # a name of the old scheme, with no owner to check: never touched
    keep.mkdir()
    for path in (killed, keep):
        os.utime(path, (time.time() - 600, time.time() - 600))
    _small(out)
    assert _temp_siblings(out) == [keep]


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic_ddr(tmp_path / "ddr", {"test": 1}, 96, progress=True, workers=1)
    captured = capsys.readouterr()
    assert "synth DDR" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"counts": {"train": 0, "valid": 0, "test": 0}}, "at least one split"),
        ({"counts": {"training": 3}}, "unknown split"),
        ({"counts": {"train": -1}}, "integer >= 0"),
        ({"counts": {"train": 1}, "size_px": 40}, "size_px"),
        ({"counts": {"train": 1}, "seed": -1}, "seed"),
        ({"counts": {"train": 1}, "workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic_ddr(tmp_path / "ddr", progress=False, **kwargs)
    assert not (tmp_path / "ddr").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ IDRiD layout
def test_idrid_layout_same_seed_same_files_and_overwrite_only_its_own_trees(tmp_path: Path) -> None:
    from hpc_drseg.data.synth_idrid import write_synthetic_idrid

    one = write_synthetic_idrid(tmp_path / "one", {"train": 2, "test": 1}, 96, seed=5, progress=False, workers=1)
    two = write_synthetic_idrid(tmp_path / "two", {"train": 2, "test": 1}, 96, seed=5, progress=False, workers=2)
    assert _snapshot(one) == _snapshot(two)
    assert json.loads((one / synth.MARKER).read_text())["layout"] == "idrid"
    again = write_synthetic_idrid(one, {"train": 1}, 96, seed=6, overwrite=True, progress=False, workers=1)
    assert sorted(p.name for p in again.rglob("*.jpg")) == ["IDRiD_01.jpg"]
    ddr = write_synthetic_ddr(tmp_path / "ddr", {"test": 1}, 96, progress=False, workers=1)
    with pytest.raises(FileExistsError, match="it holds lesion_segmentation, which drseg synth does not write"):
        write_synthetic_idrid(ddr, {"train": 1}, 96, overwrite=True, progress=False, workers=1)


def test_idrid_layout_has_no_valid_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpc_drseg.cli import main

    assert main(["synth", "--layout", "idrid", "--out", str(tmp_path / "i"), "--valid", "3", "--quiet"]) == 2
    assert "IDRiD has no validation set" in capsys.readouterr().err and not (tmp_path / "i").exists()
