"""ResNet backbone: a file with torchvision's exact ResNet-50 keys and shapes (listed here by rule, independently of
the package) loads strictly; wrong key / wrong shape / missing file fail naming it; feature names, strides, channels."""

from __future__ import annotations

import pytest
import torch

from hpc_drseg.models.backbone import ResNet, build_backbone, load_pretrained


def bn_entries(prefix, channels, with_counter=True):
    entries = [(f"{prefix}.{name}", (channels,)) for name in ("weight", "bias", "running_mean", "running_var")]
    return entries + ([(f"{prefix}.num_batches_tracked", ())] if with_counter else [])


def torchvision_resnet50_entries(with_counter=True):
    """(key, shape) of torchvision.models.resnet50().state_dict(), written from the published architecture."""
    entries = [("conv1.weight", (64, 3, 7, 7))] + bn_entries("bn1", 64, with_counter)
    in_ch = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            entries += [(f"{p}.conv1.weight", (planes, in_ch, 1, 1))] + bn_entries(f"{p}.bn1", planes, with_counter)
            entries += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn_entries(f"{p}.bn2", planes, with_counter)
            entries += [(f"{p}.conv3.weight", (4 * planes, planes, 1, 1))]
            entries += bn_entries(f"{p}.bn3", 4 * planes, with_counter)
            if b == 0:
                entries += [(f"{p}.downsample.0.weight", (4 * planes, in_ch, 1, 1))]
                entries += bn_entries(f"{p}.downsample.1", 4 * planes, with_counter)
            in_ch = 4 * planes
    return entries + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def make_state(entries, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen)
        for k, s in entries
    }


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    state = make_state(torchvision_resnet50_entries())
    path = tmp_path_factory.mktemp("weights") / "resnet50-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_key_list_by_rule_has_torchvision_size():
    entries = torchvision_resnet50_entries()
    assert len(entries) == 320  # torchvision resnet50: 320 state-dict entries, 25,557,032 parameters
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_params = sum(torch.Size(s).numel() for k, s in entries if not k.endswith(buffers))
    assert n_params == 25_557_032


@pytest.mark.parametrize("output_stride", [32, 16])
def test_torchvision_file_loads_strictly(resnet50_file, output_stride):
    path, state = resnet50_file
    backbone = build_backbone("resnet50", output_stride, pretrained_path=path)
    loaded = backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key in ("conv1.weight", "layer3.5.conv2.weight", "layer4.0.downsample.1.running_var", "bn1.bias"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


def test_file_without_batch_counters_loads(tmp_path):
    """Older torchvision files predate BatchNorm's num_batches_tracked."""
    entries = [e for e in torchvision_resnet50_entries(with_counter=False) if not e[0].startswith("fc.")]
    path = tmp_path / "old.pth"
    torch.save(make_state(entries, seed=1), path)
    backbone = ResNet("resnet50")
    load_pretrained(backbone, path)
    expected = make_state(entries, seed=1)["layer1.0.conv1.weight"]
    torch.testing.assert_close(backbone.layer1[0].conv1.weight.detach(), expected, rtol=0, atol=0)


def test_wrong_key_fails_naming_key_and_file(tmp_path, resnet50_file):
    _, state = resnet50_file
    bad = dict(state)
    bad["layer2.1.conv9.weight"] = bad.pop("layer2.1.conv2.weight")
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(ResNet("resnet50"), path)
    message = str(info.value)
    assert "layer2.1.conv9.weight" in message and "layer2.1.conv2.weight" in message and str(path) in message


def test_wrong_shape_fails_naming_key(tmp_path, resnet50_file):
    _, state = resnet50_file
    bad = dict(state)
    bad["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3)
    path = tmp_path / "reshaped.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"layer4\.2\.conv3\.weight: file \(2048, 512, 3, 3\) vs model"):
        load_pretrained(ResNet("resnet50"), path)


def test_other_depth_fails(resnet50_file):
    path, _ = resnet50_file
    with pytest.raises(ValueError, match="resnet18"):
        load_pretrained(ResNet("resnet18"), path)


def test_missing_file_says_how_to_fix(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="pretrained_path=null") as info:
        build_backbone("resnet50", pretrained_path=path)
    assert str(path) in str(info.value)


def test_not_a_state_dict_fails(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_pretrained(ResNet("resnet18"), path)


@pytest.mark.parametrize("name,output_stride", [("resnet18", 32), ("resnet18", 16), ("resnet34", 16)])
def test_named_features_strides_and_channels(name, output_stride):
    channels = (64, 512)  # BasicBlock ResNets
    backbone = ResNet(name, output_stride).eval()
    features = backbone(torch.randn(1, 3, 64, 96))
    assert set(features) == {"low_level", "out"} == set(backbone.strides) == set(backbone.channels)
    assert backbone.strides == {"low_level": 4, "out": output_stride}
    assert (backbone.channels["low_level"], backbone.channels["out"]) == channels
    for key, feat in features.items():
        stride = backbone.strides[key]
        assert feat.shape == (1, backbone.channels[key], 64 // stride, 96 // stride)


def test_resnet50_channels_and_dilation():
    backbone = ResNet("resnet50", output_stride=16)
    assert backbone.channels == {"low_level": 256, "out": 2048}
    convs = [backbone.layer4[i].conv2 for i in range(3)]
    assert all(c.stride == (1, 1) and c.dilation == (2, 2) and c.padding == (2, 2) for c in convs)
    assert backbone.layer4[0].downsample[0].stride == (1, 1)
    assert backbone.layer3[0].conv2.stride == (2, 2) and backbone.layer3[0].conv2.dilation == (1, 1)


def test_unknown_backbone_or_stride_fails():
    with pytest.raises(ValueError, match="resnet152"):
        ResNet("resnet152")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_stride"):
        ResNet("resnet18", output_stride=8)
