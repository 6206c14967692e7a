"""Registry: config → model wiring (CBAM sites, impl, pretrained file), input-size checks, describe_model numbers
(parameter counts of the paper's models, training FLOPs at 512² against a reference measurement; docs/method.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

from hpc_drseg.config import CBAMConfig, ModelConfig
from hpc_drseg.models import CBAM, build_model, check_input_size, describe_model
from hpc_drseg.models import cbam as cbam_module
from hpc_drseg.models.deeplab import DeepLabV3Plus
from hpc_drseg.models.unet import UNet


def cbam_blocks(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, CBAM)}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_attention_deeplab_has_cbam_at_configured_sites():
    model = build_model(ModelConfig(backbone="resnet18", cbam=CBAMConfig(impl="compile")))
    blocks = cbam_blocks(model)
    assert set(blocks) == {"decoder.aspp_attention", "decoder.low_level_attention"}
    assert blocks["decoder.aspp_attention"].channel.fc1.in_channels == 256
    assert blocks["decoder.low_level_attention"].channel.fc1.in_channels == 48
    assert all(b.impl == "compile" for b in blocks.values())
    only_low = build_model(ModelConfig(backbone="resnet18", cbam=CBAMConfig(sites=["low_level"])))
    assert set(cbam_blocks(only_low)) == {"decoder.low_level_attention"}


def test_deeplabv3plus_ignores_cbam_sites_and_empty_sites_is_plain():
    plain = build_model(ModelConfig(name="deeplabv3plus", backbone="resnet18"))
    empty = build_model(ModelConfig(name="attention_deeplab", backbone="resnet18", cbam=CBAMConfig(sites=[])))
    assert isinstance(plain, DeepLabV3Plus) and not cbam_blocks(plain) and not cbam_blocks(empty)
    assert set(plain.state_dict()) == set(empty.state_dict())


def test_unet_width_and_upsampling_options():
    assert isinstance(build_model(ModelConfig(name="unet")), UNet)
    assert n_params(build_model(ModelConfig(name="unet", unet_base_width=16, unet_bilinear=False))) > n_params(
        build_model(ModelConfig(name="unet", unet_base_width=16))
    )


def test_paper_parameter_counts():
    """A plain-PyTorch build of the paper's Attention-DeepLab (ResNet-50, OS 32) has 40.36 M parameters; its U-Net
    (base 32, bilinear) ≈ 4.3 M (docs/method.md)."""
    attention = describe_model(ModelConfig(), image_px=64)["params_total"]
    assert abs(attention - 40.36e6) <= 0.01 * 40.36e6, attention
    assert attention == n_params(build_model(ModelConfig()))  # meta-device count = real count
    unet = describe_model(ModelConfig(name="unet", unet_base_width=32), image_px=64)["params_total"]
    assert abs(unet - 4.3e6) <= 0.1 * 4.3e6, unet


def test_paper_training_flops_at_512():
    """278 GFLOP per training image (forward + backward) at 512² for Attention-DeepLab, OS 32, as measured on an
    independent plain-PyTorch build of the paper's model (docs/method.md)."""
    info = describe_model(ModelConfig(), image_px=512)
    assert abs(info["train_gflops_per_image"] - 278) <= 0.01 * 278, info["train_gflops_per_image"]
    assert info["output_shape"] == [1, 4, 512, 512] and info["output_stride"] == info["input_multiple"] == 32


def test_describe_model_fields_and_scaling(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = ModelConfig(backbone="resnet18", use_aux_head=True, cbam=CBAMConfig(impl="triton"))
    small, large = describe_model(cfg, 64), describe_model(cfg, 128)
    assert small["params_total"] == small["params_trainable"] == n_params(build_model(cfg))
    assert small["output_shape"] == [1, 4, 64, 64] and large["output_shape"] == [1, 4, 128, 128]
    # convolution FLOPs scale with the pixel count
    assert large["train_gflops_per_image"] == pytest.approx(4 * small["train_gflops_per_image"], rel=0.01)
    without_aux = describe_model(ModelConfig(backbone="resnet18"), 64)["train_gflops_per_image"]
    assert small["train_gflops_per_image"] > without_aux  # the aux head counts: FLOPs are taken in train mode
    assert small["cbam_impl_requested"] == "triton"
    if not torch.cuda.is_available():
        assert small["cbam_impl_active"] == "eager"
    assert describe_model(ModelConfig(name="deeplabv3plus", backbone="resnet18"), 64)["cbam_impl_active"] is None
    unet = describe_model(ModelConfig(name="unet", unet_base_width=4), 64)
    assert unet["output_stride"] is None and unet["input_multiple"] == 16 and unet["backbone"] is None


def test_pretrained_file_is_loaded_through_the_config(tmp_path):
    donor = build_model(ModelConfig(backbone="resnet18")).backbone.state_dict()
    donor = {k: v + 1 if v.is_floating_point() else v for k, v in donor.items()}
    donor |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(donor, path)
    model = build_model(ModelConfig(backbone="resnet18", pretrained_path=str(path), output_stride=16))
    torch.testing.assert_close(model.backbone.layer2[1].conv2.weight.detach(), donor["layer2.1.conv2.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(ModelConfig(backbone="resnet18", pretrained_path=str(tmp_path / "missing.pth")))
    with pytest.warns(UserWarning, match="unet has no ImageNet backbone"):
        build_model(ModelConfig(name="unet", unet_base_width=4, pretrained_path=str(path)))


@pytest.mark.parametrize(
    "cfg,good,bad",
    [
        (ModelConfig(), (512, 1024), (500, 512)),
        (ModelConfig(output_stride=16), (496, 512), (500, 512)),
        (ModelConfig(name="unet"), (80, 1008), (72, 80)),
    ],
)
def test_check_input_size(cfg, good, bad):
    check_input_size(cfg, *good)
    with pytest.raises(ValueError, match=r"multiples of (16|32)") as info:
        check_input_size(cfg, *bad)
    assert f"{bad[0]}×{bad[1]}" in str(info.value)


def test_forward_with_wrong_size_raises():
    model = build_model(ModelConfig(name="unet", unet_base_width=4)).eval()
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 40, 48))
    deeplab = build_model(ModelConfig(backbone="resnet18")).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        deeplab(torch.randn(1, 3, 48, 64))


def test_triton_model_on_cpu_warns_once(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cbam_module, "_warned_reasons", set())
    model = build_model(ModelConfig(backbone="resnet18", cbam=CBAMConfig(impl="triton"))).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    assert len([w for w in caught if "falls back to eager" in str(w.message)]) == 1


def test_imagenet_init_needs_a_weights_file(tmp_path):
    from hpc_drseg.errors import DrsegError
    from hpc_drseg.models.registry import check_initialisation

    with pytest.raises(DrsegError, match="model.init=imagenet needs model.pretrained_path.*model.init=random"):
        check_initialisation(ModelConfig())
    with pytest.raises(DrsegError, match="does not exist"):
        check_initialisation(ModelConfig(pretrained_path=str(tmp_path / "missing.pth")))
    check_initialisation(ModelConfig(init="random"))
    check_initialisation(ModelConfig(name="unet"))  # no ImageNet backbone: always random
