"""hpc_drseg.inference with a tiny U-Net checkpoint written here: Predictor gives what `drseg predict` writes, batches
images of any size, and names a wrong image in one line; load_model; the package's lazy exports.
"""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from hpc_drseg.cli import main
from hpc_drseg.config import config_to_dict, load_config
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.fundus import render_fundus
from hpc_drseg.inference import Predictor, load_model
from hpc_drseg.models import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, ["model.name=unet", "model.unet_base_width=4", "data.image_px=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for module in model.modules():  # BatchNorm statistics other than the defaults: eval mode must use them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    progress = {"epoch": 3, "step_in_epoch": 0, "global_step": 12, "history": []}
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "progress": progress}, path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, device="cpu")


def fundus(height: int, width: int, seed: int = 0) -> np.ndarray:
    return render_fundus(np.random.default_rng(seed), height, width)[0]


def test_predictor_gives_what_drseg_predict_writes(checkpoint, predictor, tmp_path):
    image = fundus(150, 170)
    assert cv2.imwrite(str(tmp_path / "eye.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))  # lossless: same pixels
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "eye.png"), "--out", str(out)]
    assert main([*args, "--save-probs"]) == 0
    written = np.load(out / "eye_probs.npz")["probs"]
    probs = predictor.predict(image)
    assert probs.dtype == np.float32 and probs.shape == (len(LESIONS), 150, 170)
    assert 0.0 <= probs.min() and probs.max() <= 1.0 and probs.std() > 1e-3
    assert np.array_equal(probs.astype(np.float16), written)  # drseg predict stores float16 of the same values
    assert predictor.lesions == LESIONS and predictor.image_px == 64


def test_predict_many_batches_images_of_any_size(checkpoint):
    sizes = [(150, 170), (64, 64), (97, 51), (300, 260), (40, 90)]
    rng = np.random.default_rng(1)
    images = [fundus(*sizes[0])] + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes[1:]]
    predictor = Predictor(checkpoint, device="cpu", batch_size=2)
    batched = predictor.predict_many(image for image in images)  # any iterable; 3 forward passes
    assert [p.shape for p in batched] == [(4, h, w) for h, w in sizes]
    for image, probs in zip(images, batched):
        np.testing.assert_allclose(probs, predictor.predict(image), atol=1e-5)
    assert predictor.predict_many([]) == []


def test_load_model_is_the_trained_model_in_eval_mode(checkpoint):
    model = load_model(checkpoint, device="cpu")
    assert not any(module.training for module in model.modules())
    saved = torch.load(checkpoint, weights_only=True)["model"]
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in saved)
    image = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert model(image).shape == (2, 4, 48, 80)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(checkpoint, device="cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        load_model(checkpoint, device="gpu0")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((20, 30, 3), np.float32), r"image: got dtype float32; expected uint8 0-255 of shape \(H, W, 3\)"),
        (np.zeros((20, 30), np.uint8), r"image: got shape \(20, 30\); expected \(H, W, 3\) RGB"),
        (np.zeros((20, 30, 4), np.uint8), r"got shape \(20, 30, 4\); expected \(H, W, 3\).*RGBA: image\[\.\.\., :3\]"),
        (np.zeros((3, 20, 30), np.uint8), r"got shape \(3, 20, 30\).*CHW: image.transpose\(1, 2, 0\)"),
        (np.zeros((0, 30, 3), np.uint8), r"got shape \(0, 30, 3\), an empty image"),
        ([[0, 0, 0]], r"image: got a list; expected an RGB uint8 numpy array of shape \(H, W, 3\)"),
    ],
)
def test_wrong_images_are_named_with_the_expected_shape(predictor, image, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(image)


def test_predict_many_names_the_wrong_image_and_batch_size_is_checked(predictor, checkpoint):
    with pytest.raises(ValueError, match=r"images\[1\]: got dtype float64"):
        predictor.predict_many([np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3))])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size: got"):
            Predictor(checkpoint, batch_size=bad)


def test_package_exports_the_api_lazily():
    import hpc_drseg
    import hpc_drseg.inference as inference

    assert hpc_drseg.Predictor is inference.Predictor and hpc_drseg.load_model is inference.load_model
    assert {"Predictor", "load_model"} <= set(hpc_drseg.__all__) <= set(dir(hpc_drseg))
    with pytest.raises(AttributeError, match="has no attribute 'predictor'"):
        hpc_drseg.predictor  # noqa: B018
    # ...while importing the package alone (as `drseg --help` does) still imports no torch
    code = "import sys, hpc_drseg; assert hasattr(hpc_drseg, '__version__'); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr
