"""ResNet-18/34/50/101 encoders (He et al. 2016) with torchvision's module names, and strict loading of a local
torchvision-format ImageNet state-dict file. Output stride 32 (as the paper's model) or 16 (layer4 dilated, DeepLab).
Written here because torchvision's wheel fails to import beside the CPU torch build (docs/platform-notes.md); only
the state-dict key format matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hpc_drseg.config.choices import BackboneName
from hpc_drseg.errors import InputError, MissingError

# (block type, blocks per stage) as in torchvision.models.resnet
_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def check_divisible(height: int, width: int, stride: int, model: str) -> None:
    """Raises ValueError unless both sides are multiples of `stride` (the model's total downsampling)."""
    if height % stride or width % stride:
        raise InputError(
            f"{model}: input size {height}×{width} does not work; height and width must be multiples of {stride} "
            f"(e.g. {max(stride, height // stride * stride)}×{max(stride, width // stride * stride)}, 256, 512, 1024)"
        )


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34). Dilation applies to both convs when layer4 is dilated."""

    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 (ResNet-50/101); stride on the 3×3 conv ("ResNet v1.5", torchvision's layout)."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet encoder without the classifier (`fc`); forward returns named features.

    Features: "low_level" = layer1 (stride 4; 64 ch for 18/34, 256 for 50/101) and "out" = layer4 (stride
    `output_stride`; 512 or 2048 ch). `channels` and `strides` map those names to their sizes.
    output_stride 16 sets layer4's stride to 1 and dilates every 3×3 conv of layer4 by 2 (as SMP; torchvision keeps
    the first block undilated) — same parameters, so the same ImageNet file loads for both strides.
    """

    def __init__(self, name: BackboneName = "resnet50", output_stride: int = 32):
        super().__init__()
        if name not in _LAYOUTS:
            raise InputError(f"backbone: got {name!r}; choose one of {list(_LAYOUTS)}")
        if output_stride not in (16, 32):
            raise InputError(f"output_stride: got {output_stride}; choose 16 (dilated layer4) or 32 (paper)")
        kind, blocks = _LAYOUTS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, blocks[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, 256, blocks[2], stride=2, dilation=1)
        dilated = output_stride == 16
        self.layer4 = self._make_layer(block, 512, blocks[3], stride=1 if dilated else 2, dilation=2 if dilated else 1)
        self.channels = {"low_level": 64 * block.expansion, "out": 512 * block.expansion}
        self.strides = {"low_level": 4, "out": output_stride}
        self._init_weights()

    def _make_layer(self, block: type, planes: int, n_blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_ch, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_ch, planes, stride, dilation, downsample)]
        self.in_ch = planes * block.expansion
        layers += [block(self.in_ch, planes, 1, dilation) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's initialisation, so random-init runs match a torchvision ResNet
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        low_level = self.layer1(x)  # (B, 64|256, H/4, W/4)
        out = self.layer4(self.layer3(self.layer2(low_level)))  # (B, 512|2048, H/os, W/os)
        return {"low_level": low_level, "out": out}


def build_backbone(name: BackboneName, output_stride: int = 32, pretrained_path: str | Path | None = None) -> ResNet:
    """A ResNet encoder, ImageNet-initialised from a local file when `pretrained_path` is given (never downloads)."""
    backbone = ResNet(name, output_stride)
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return backbone


def load_pretrained(backbone: ResNet, path: str | Path) -> None:
    """Loads a torchvision-format ResNet state dict strictly; only the classifier `fc.*` keys may be left over.

    Raises FileNotFoundError if `path` is missing and ValueError naming the first offending keys on any missing or
    unexpected key or shape mismatch. BatchNorm `num_batches_tracked` counters may be absent (older torchvision files).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingError(
            f"pretrained backbone file {path} does not exist; download torchvision's ImageNet weights for "
            f"{backbone.name} to that path yourself (nothing is downloaded at run time) or set "
            f"model.pretrained_path=null for random initialisation"
        )
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    _check_keys_and_shapes(state, expected, path, backbone.name)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    backbone.load_state_dict(state, strict=True)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor objects refused by weights_only
        raise InputError(f"pretrained backbone file {path} could not be read as a torch state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(
            f"pretrained backbone file {path} is not a flat state dict of tensors (torchvision format, keys like "
            f"'conv1.weight', 'layer1.0.conv1.weight'); if it is a training checkpoint, save its model state dict"
        )
    return state


def _check_keys_and_shapes(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path, name: str) -> None:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise InputError(
            f"pretrained backbone file {path} does not match a torchvision {name}: {'; '.join(problems)}. "
            f"Check model.backbone matches the file (e.g. resnet50 weights for backbone=resnet50)"
        )
