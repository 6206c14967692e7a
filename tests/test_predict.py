"""hpc_drseg.predict with a tiny U-Net checkpoint written here: overlays, probabilities and lesions.json on a synthetic
fundus photo next to a corrupt file; connected components, areas and the field of view on hand-made maps.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from hpc_drseg.config import config_to_dict, load_config
from hpc_drseg.constants import LESION_COLOURS, LESIONS
from hpc_drseg.data.fundus import render_fundus
from hpc_drseg.models import build_model
from hpc_drseg.predict import binarize, estimate_fov, measure_lesions, predict, render_overlay

HEIGHT, WIDTH = 150, 170


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, ["model.name=unet", "model.unet_base_width=4", "data.image_px=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    progress = {"epoch": 1, "step_in_epoch": 0, "global_step": 5, "history": []}
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "progress": progress}, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    image, _ = render_fundus(np.random.default_rng(0), HEIGHT, WIDTH)
    assert cv2.imwrite(str(folder / "eye1.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def test_predict_folder_with_a_corrupt_file(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    result = predict(checkpoint, photos, out, save_probs=True)
    assert "broken.jpg" in capsys.readouterr().err
    saved = json.loads((out / "lesions.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [e["file"] for e in saved["errors"]] == ["broken.jpg"]
    assert list(saved["images"]) == ["eye1.jpg"]
    record = saved["images"]["eye1.jpg"]
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    assert 0.3 * HEIGHT * WIDTH < record["fov_px"] < 0.95 * HEIGHT * WIDTH
    assert set(record["lesions"]) == set(LESIONS)
    for lesion in LESIONS:
        stats = record["lesions"][lesion]
        assert stats["components"] >= 0 and 0 <= stats["area_px"] <= record["fov_px"]
        assert stats["area_fov_fraction"] == pytest.approx(stats["area_px"] / record["fov_px"])
    overlay = cv2.imread(str(out / "eye1_overlay.png"))
    assert overlay is not None and overlay.shape == (HEIGHT, WIDTH, 3)
    probs = np.load(out / "eye1_probs.npz")["probs"]
    assert probs.dtype == np.float16 and probs.shape == (4, HEIGHT, WIDTH)
    assert 0.0 <= probs.min() and probs.max() <= 1.0 and probs.std() > 0
    assert not list(out.glob(".*.tmp"))


def test_threshold_extremes_cover_all_or_nothing_of_the_fov(checkpoint, photos, tmp_path):
    image_path = photos / "eye1.jpg"
    everything = predict(checkpoint, image_path, tmp_path / "all", threshold=0.0)["images"]["eye1.jpg"]
    nothing = predict(checkpoint, image_path, tmp_path / "none", threshold=1.0)["images"]["eye1.jpg"]
    for lesion in LESIONS:
        # sigmoid > 0 everywhere: each lesion is the whole FOV, one component, fraction 1.
        assert everything["lesions"][lesion] == {
            "components": 1,
            "area_px": everything["fov_px"],
            "area_fov_fraction": 1.0,
            "largest_px": everything["fov_px"],
        }
        assert nothing["lesions"][lesion] == {"components": 0, "area_px": 0, "area_fov_fraction": 0.0, "largest_px": 0}
    assert nothing["probs"] is None and not list((tmp_path / "none").glob("*.npz"))
    original = cv2.imread(str(image_path))
    untouched = cv2.imread(str(tmp_path / "none" / "eye1_overlay.png"))
    assert np.array_equal(original, untouched)  # no lesion → the overlay is the photo itself


def test_input_errors(checkpoint, photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty holds no image file"):
        predict(checkpoint, empty, tmp_path / "o1")
    with pytest.raises(ValueError, match="no readable image.*broken.jpg"):
        predict(checkpoint, photos / "broken.jpg", tmp_path / "o2")
    assert not (tmp_path / "o2" / "lesions.json").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        predict(checkpoint, tmp_path / "missing", tmp_path / "o3")
    with pytest.raises(ValueError, match="is the input folder"):
        predict(checkpoint, photos, photos)
    with pytest.raises(ValueError, match="threshold"):
        predict(checkpoint, photos, tmp_path / "o4", threshold=1.5)


def test_measure_lesions_on_a_hand_made_probability_map():
    probs = np.zeros((4, 20, 30), np.float32)
    probs[0, 2, 2] = probs[0, 3, 3] = 0.9  # MA: diagonal neighbours → one 8-connected component of 2 px
    probs[0, 10, 10] = 0.51  # MA: a second component, 1 px
    probs[0, 15, 15] = 0.5  # exactly the threshold: not a lesion (prob > threshold)
    probs[1, 5:8, 5:9] = 0.8  # EX: 3×4 block
    probs[1, 12:14, 20:22] = 0.7  # EX: 2×2 block
    probs[3, 0:4, 22:30] = 0.99  # HE: 4×8 block, half of it outside the FOV (columns ≥ 26)
    fov = np.zeros((20, 30), bool)
    fov[:, :26] = True  # 520 px
    stats = measure_lesions(binarize(probs, 0.5, fov), fov)
    assert stats["MA"] == {"components": 2, "area_px": 3, "area_fov_fraction": 3 / 520, "largest_px": 2}
    assert stats["EX"] == {"components": 2, "area_px": 16, "area_fov_fraction": 16 / 520, "largest_px": 12}
    assert stats["SE"] == {"components": 0, "area_px": 0, "area_fov_fraction": 0.0, "largest_px": 0}
    assert stats["HE"] == {"components": 1, "area_px": 16, "area_fov_fraction": 16 / 520, "largest_px": 16}
    # Without a FOV the whole image counts, and measure_lesions itself ignores pixels outside a given FOV.
    assert measure_lesions(probs > 0.5, None)["HE"]["area_px"] == 32
    assert measure_lesions(probs > 0.5, fov)["HE"]["area_px"] == 16
    with pytest.raises(ValueError, match="expected \\(4, H, W\\)"):
        measure_lesions(probs[:3] > 0.5, fov)


def test_fov_is_the_filled_largest_bright_region():
    image = np.zeros((100, 120, 3), np.uint8)
    cv2.circle(image, (60, 50), 40, (180, 90, 40), thickness=-1)
    cv2.circle(image, (60, 50), 8, (0, 0, 0), thickness=-1)  # a dark haemorrhage inside: a hole to fill
    image[2:5, 2:5] = 200  # a bright speck in the black border: not the largest region
    image[93:, :] = np.uint8(6)  # JPEG-like noise in the border, below FOV_LEVEL
    fov = estimate_fov(image)
    disc = np.zeros((100, 120), np.uint8)
    cv2.circle(disc, (60, 50), 40, 1, thickness=-1)
    assert np.array_equal(fov, disc.astype(bool))
    assert estimate_fov(np.full((50, 50, 3), 120, np.uint8)).all()  # no border: the whole image
    assert estimate_fov(np.zeros((50, 50, 3), np.uint8)).all()  # nothing bright: fall back to the whole image


def test_overlay_colours_and_contour_keep_tiny_lesions_visible():
    image = np.full((40, 40, 3), 100, np.uint8)
    binary = np.zeros((4, 40, 40), bool)
    binary[LESIONS.index("MA"), 20, 20] = True  # one-pixel microaneurysm
    binary[LESIONS.index("EX"), 5:15, 5:15] = True
    overlay = render_overlay(image, binary)
    assert tuple(overlay[20, 20]) == LESION_COLOURS["MA"]  # the contour paints the dot in full red
    assert tuple(overlay[20, 24]) == LESION_COLOURS["MA"]  # and a ring of radius 4 marks it
    assert tuple(overlay[5, 5]) == LESION_COLOURS["EX"]  # EX outline in full green
    inside = overlay[10, 10].astype(int)
    assert inside[1] > 100 and inside[0] < 100  # tinted green inside, the photo still shows through
    assert tuple(overlay[30, 30]) == (100, 100, 100)


def test_checkpoint_of_an_imagenet_run_needs_no_backbone_file(tmp_path, photos):
    """A run started from ImageNet weights records their path; predicting elsewhere must not need that file."""
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained_path=/nowhere/resnet18.pth"])
    values = config_to_dict(cfg)
    values["data"]["image_px"] = 64
    model = build_model(load_config(None, ["model.backbone=resnet18", "model.init=random"]).model)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": values}, path)
    result = predict(path, photos / "eye1.jpg", tmp_path / "out")
    assert list(result["images"]) == ["eye1.jpg"] and result["model"] == "attention_deeplab"


def test_files_that_are_no_checkpoint_of_this_model(checkpoint, photos, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    bare = tmp_path / "bare.pt"
    torch.save(state["model"], bare)
    with pytest.raises(ValueError, match=r"bare\.pt is not a hpc_drseg checkpoint"):
        predict(bare, photos, tmp_path / "o1")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.pt is not a readable hpc_drseg checkpoint"):
        predict(text, photos, tmp_path / "o2")
    wider = config_to_dict(load_config(None, ["model.name=unet", "model.unet_base_width=8", "data.image_px=64"]))
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**state, "config": wider}, mismatched)  # weights of width 4 under a config of width 8
    with pytest.raises(ValueError, match=r"mismatched\.pt does not fit the UNet its config builds: \d+ mis-shaped"):
        predict(mismatched, photos, tmp_path / "o3")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
