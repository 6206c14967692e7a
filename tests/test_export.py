"""`drseg export` with tiny checkpoints written here (Attention-DeepLab on ResNet-18 with CBAM asking for Triton, and a
U-Net): ONNX Runtime against PyTorch at two input sizes, a safetensors round trip through the model class alone, the
sidecar, and the output rules (no overwrite unasked, never the checkpoint, nothing half-written).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

from hpc_drseg import export
from hpc_drseg.cli import main
from hpc_drseg.config import config_to_dict, load_config
from hpc_drseg.constants import IMAGENET_MEAN, IMAGENET_STD, LESIONS
from hpc_drseg.inference import load_model
from hpc_drseg.models import build_model

TOLERANCE = 1e-3
# The Attention-DeepLab checkpoint asks for the Triton CBAM, which falls back to eager PyTorch without CUDA, with a
# warning: the PyTorch side of the comparisons runs that way on purpose (export itself always uses the eager path).
pytestmark = pytest.mark.filterwarnings("ignore:CBAM impl='triton' falls back:RuntimeWarning")
MANIFEST_SHA = "ab" * 32


def write_checkpoint(path, overrides, **extra):
    """A checkpoint as drseg train writes it (weights, config, progress), with non-default BatchNorm statistics."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    progress = {"epoch": 4, "step_in_epoch": 0, "global_step": 20, "history": []}
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "progress": progress, **extra}, path)
    return path


@pytest.fixture(scope="module")
def attention_checkpoint(tmp_path_factory):
    overrides = ["model.init=random", "model.backbone=resnet18", "data.image_px=64", "model.cbam.impl=triton"]
    path = tmp_path_factory.mktemp("adl") / "best.pt"
    return write_checkpoint(path, overrides, **{export.MANIFEST_HASH_KEY: MANIFEST_SHA})


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    overrides = ["model.name=unet", "model.unet_base_width=4", "data.image_px=32"]
    return write_checkpoint(tmp_path_factory.mktemp("unet") / "last.pt", overrides)


def pytorch_logits(checkpoint, image):
    with torch.no_grad():
        return load_model(checkpoint, device="cpu")(image)


def test_onnx_matches_pytorch_at_two_input_sizes(attention_checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "adl.onnx"
    assert main(["export", "--checkpoint", str(attention_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch: max |Δlogit|" in printed and "1×3×64×64" in printed and "2×3×96×128" in printed
    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (3, 3, 96, 160)]:  # other batch and sides than the command's own check
        image = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        expected = pytorch_logits(attention_checkpoint, image).numpy()
        got = session.run(["logits"], {"image": image.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], len(LESIONS), *shape[2:])
        assert abs(got - expected).max() <= TOLERANCE
    sidecar = json.loads((tmp_path / "adl.onnx.json").read_text())
    assert sidecar["onnx"]["check"]["checked"] and max(sidecar["onnx"]["check"]["max_abs_diff"].values()) <= TOLERANCE
    assert sidecar["weights"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    embedded = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(embedded["hpc_drseg"])["lesions"] == list(LESIONS)


def test_safetensors_round_trip_through_the_model_class_alone(attention_checkpoint, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from hpc_drseg.models.deeplab import DeepLabV3Plus  # the model class only: no config, registry or checkpoint code

    out = tmp_path / "adl.safetensors"
    args = ["export", "--checkpoint", str(attention_checkpoint), "--format", "safetensors", "--out", str(out)]
    assert main(args) == 0
    sidecar = json.loads((tmp_path / "adl.safetensors.json").read_text())
    model_cfg = sidecar["model"]
    model = DeepLabV3Plus(
        backbone=model_cfg["backbone"],
        output_stride=model_cfg["output_stride"],
        aspp_rates=model_cfg["aspp_rates"],
        separable=model_cfg["aspp_separable"],
        use_aux_head=model_cfg["use_aux_head"],
        cbam_sites=model_cfg["cbam"]["sites"],
        cbam_reduction=model_cfg["cbam"]["reduction"],
        cbam_kernel_size=model_cfg["cbam"]["kernel_size"],
        align_corners=model_cfg["align_corners"],
    )
    model.load_state_dict(safetensors_torch.load_file(out), strict=True)
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), pytorch_logits(attention_checkpoint, image))
    assert sidecar["model_class"] == "hpc_drseg.models.deeplab.DeepLabV3Plus"
    assert sidecar["lesions"] == list(LESIONS)
    assert sidecar["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert sidecar["normalization"]["std"] == list(IMAGENET_STD)
    assert (sidecar["input"]["image_px"], sidecar["input"]["input_multiple"]) == (64, 32)
    assert sidecar["initialisation"] == {"init": "random", "pretrained_path": None}
    assert sidecar["data_manifest_sha256"] == MANIFEST_SHA
    assert (sidecar["source"]["epoch"], sidecar["source"]["global_step"]) == (4, 20)
    assert sidecar["source"]["checkpoint_sha256"] == hashlib.sha256(attention_checkpoint.read_bytes()).hexdigest()
    assert sidecar["weights"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_unet_safetensors_without_a_recorded_manifest(unet_checkpoint, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from hpc_drseg.models.unet import UNet

    result = export.export_model(unet_checkpoint, tmp_path / "unet.safetensors", "safetensors")
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["data_manifest_sha256"] is None and sidecar["input"]["input_multiple"] == 16
    model = UNet(sidecar["model"]["unet_base_width"], sidecar["model"]["unet_bilinear"])
    model.load_state_dict(safetensors_torch.load_file(result.out), strict=True)
    image = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), pytorch_logits(unet_checkpoint, image))


def test_outputs_are_refused_unless_overwrite_and_the_checkpoint_always(unet_checkpoint, tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "unet.safetensors"
    base = ["export", "--checkpoint", str(unet_checkpoint), "--format", "safetensors"]
    assert main([*base, "--out", str(out)]) == 0
    first = out.read_bytes()
    sidecar = tmp_path / "unet.safetensors.json"
    sidecar.write_text("my notes")
    assert main([*base, "--out", str(out)]) == 2
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    out.unlink()  # the sidecar alone is refused too
    assert main([*base, "--out", str(out)]) == 2
    assert f"{sidecar} already exists; pass --overwrite" in capsys.readouterr().err
    assert sidecar.read_text() == "my notes" and not out.exists()
    assert main([*base, "--out", str(out), "--overwrite"]) == 0 and out.read_bytes() == first
    checkpoint_bytes = unet_checkpoint.read_bytes()
    link = tmp_path / "link.safetensors"
    os.symlink(unet_checkpoint, link)
    assert main([*base, "--out", str(link), "--overwrite"]) == 2
    assert "over the checkpoint" in capsys.readouterr().err
    assert main([*base, "--out", str(unet_checkpoint), "--overwrite"]) == 2
    assert "over the checkpoint" in capsys.readouterr().err
    assert unet_checkpoint.read_bytes() == checkpoint_bytes
    assert main([*base, "--out", str(tmp_path / "unet.onnx")]) == 2
    assert "--format safetensors writes a *.safetensors file" in capsys.readouterr().err
    (tmp_path / "folder.safetensors").mkdir()
    assert main([*base, "--out", str(tmp_path / "folder.safetensors"), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_onnx_mismatch_is_the_figure_and_exit_1_with_nothing_written(unet_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # any real difference, even 0, now fails the check
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(unet_checkpoint), "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ONNX Runtime differs from PyTorch by max |Δlogit|" in err and "at 1×3×32×32" in err and "2×3×48×64" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_without_onnxruntime_the_file_is_written_unchecked_and_says_so(unet_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees where it is not installed
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(unet_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "note: onnxruntime is not installed: not checked against PyTorch" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "unet.onnx.json").read_text())
    assert sidecar["onnx"]["check"]["checked"] is False and out.stat().st_size > 0


def test_a_missing_export_package_is_one_line_with_the_fix(unet_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert (
        main(["export", "--checkpoint", str(unet_checkpoint), "--format", "onnx", "--out", str(tmp_path / "u.onnx")])
        == 2
    )
    assert "needs the Python package onnx: pip install 'hpc_drseg[export]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
