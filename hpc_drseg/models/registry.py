"""Maps a ModelConfig to a model (Attention-DeepLab, DeepLab-V3+, U-Net), checks input sizes, and describes a model:
parameter counts, training FLOPs per image, output shape, the CBAM implementation that really runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hpc_drseg.config import ModelConfig
from hpc_drseg.config.choices import MODEL_NAMES
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError, MissingError
from hpc_drseg.models.backbone import check_divisible
from hpc_drseg.models.cbam import active_impl
from hpc_drseg.models.deeplab import DeepLabV3Plus
from hpc_drseg.models.unet import UNet


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by cfg.name, on CPU in fp32, backbone loaded from cfg.pretrained_path when set.

    "deeplabv3plus" has no CBAM whatever cfg.cbam.sites says; "attention_deeplab" puts CBAM at cfg.cbam.sites
    ([] gives the plain DeepLab-V3+). "unet" ignores the backbone/ASPP/aux/CBAM fields (warns if a pretrained_path
    is set, since U-Net has no ImageNet encoder to load it into).
    """
    return _build(cfg, cbam_impl=cfg.cbam.impl, load_weights=True)


def _build(cfg: ModelConfig, cbam_impl: str, load_weights: bool) -> nn.Module:
    if cfg.name == "unet":
        if cfg.pretrained_path is not None and load_weights:
            warnings.warn(
                f"model.pretrained_path={cfg.pretrained_path} is ignored: unet has no ImageNet backbone", stacklevel=3
            )
        return UNet(cfg.unet_base_width, cfg.unet_bilinear)
    if cfg.name not in MODEL_NAMES:
        raise InputError(f"model.name: got {cfg.name!r}; choose one of {list(MODEL_NAMES)}")
    return DeepLabV3Plus(
        backbone=cfg.backbone,
        pretrained_path=cfg.pretrained_path if load_weights else None,
        output_stride=cfg.output_stride,
        aspp_rates=tuple(cfg.aspp_rates),
        separable=cfg.aspp_separable,
        use_aux_head=cfg.use_aux_head,
        cbam_sites=tuple(cfg.cbam.sites) if cfg.name == "attention_deeplab" else (),
        cbam_reduction=cfg.cbam.reduction,
        cbam_kernel_size=cfg.cbam.kernel_size,
        cbam_impl=cbam_impl,  # type: ignore[arg-type]
        align_corners=cfg.align_corners,
    )


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The model.* fields that fix a model's parameters and what it computes, by dotted key.

    Not the initialisation (init, pretrained_path: a checkpoint's weights replace it) nor cbam.impl (the same CBAM
    computed by other kernels); nor, for a model, the fields it ignores (U-Net: every DeepLab field; plain
    DeepLab-V3+ and Attention-DeepLab without sites: the CBAM fields).
    """
    fields: dict[str, Any] = {"name": cfg.name}
    if cfg.name == "unet":
        fields.update(unet_base_width=cfg.unet_base_width, unet_bilinear=cfg.unet_bilinear)
    else:
        fields.update(backbone=cfg.backbone, output_stride=cfg.output_stride, aspp_rates=list(cfg.aspp_rates))
        fields.update(aspp_separable=cfg.aspp_separable, use_aux_head=cfg.use_aux_head)
        fields.update(align_corners=cfg.align_corners)
        cbam = uses_cbam(cfg)
        fields["cbam.sites"] = list(cfg.cbam.sites) if cbam else []
        fields["cbam.reduction"] = cfg.cbam.reduction if cbam else None
        fields["cbam.kernel_size"] = cfg.cbam.kernel_size if cbam else None
    return {f"model.{key}": value for key, value in fields.items()}


def architecture_differences(saved: ModelConfig, built: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(model.<key>, saved value, built value) for every architecture field that differs; [] = same architecture.
    Only fields both models have are compared: between U-Net and a DeepLab model the name is the difference."""
    old, new = architecture(saved), architecture(built)
    return [(key, old[key], new[key]) for key in old if key in new and old[key] != new[key]]


def check_initialisation(cfg: ModelConfig) -> None:
    """Before training: model.init=imagenet needs a readable weights file (DeepLab models)."""
    if cfg.init == "random" or cfg.name == "unet":  # U-Net has no ImageNet backbone: always random, as in the paper
        return
    if not cfg.pretrained_path:
        raise InputError(
            "model.init=imagenet needs model.pretrained_path, a local torchvision-format ResNet state dict (e.g. "
            f"torchvision's {cfg.backbone} ImageNet weights, downloaded once: see README 'Pretrained weights'); "
            "or set model.init=random to train from random weights"
        )
    if not Path(cfg.pretrained_path).expanduser().is_file():
        raise MissingError(
            f"model.pretrained_path={cfg.pretrained_path} does not exist (model.init=imagenet); download the weights "
            "file there, or set model.init=random"
        )


def check_input_size(cfg: ModelConfig, height: int, width: int) -> None:
    """Raises an error naming sizes that work unless height and width are multiples of cfg.input_multiple."""
    check_divisible(height, width, cfg.input_multiple, cfg.name)


def uses_cbam(cfg: ModelConfig) -> bool:
    return cfg.name == "attention_deeplab" and len(cfg.cbam.sites) > 0


def describe_model(cfg: ModelConfig, image_px: int) -> dict[str, Any]:
    """Facts about the configured model at image_px × image_px input, for `drseg info`.

    Training GFLOPs per image: torch.utils.flop_counter.FlopCounterMode over forward + backward (of the sum of every
    output, parameters requiring grad, the image not) of a batch of 2 in train mode, divided by 2. Batch 2 because
    BatchNorm fails on batch 1 in train mode; train mode so the aux head (if any) counts. FLOP = 2 per multiply-add;
    convolutions and matmuls only (elementwise ops, BN, pooling are not counted). The model for counting is built on
    the meta device (no memory, no real compute, so 512² takes about a second) with eager CBAM (same arithmetic).
    """
    check_input_size(cfg, image_px, image_px)
    with torch.device("meta"):
        model = _build(cfg, cbam_impl="eager", load_weights=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops, out_shape = _training_flops(model, image_px)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.empty(0, device=device)
    return {
        "name": cfg.name,
        "backbone": None if cfg.name == "unet" else cfg.backbone,
        "pretrained_path": None if cfg.name == "unet" else cfg.pretrained_path,  # reported, not read
        "output_stride": None if cfg.name == "unet" else cfg.output_stride,
        "input_multiple": cfg.input_multiple,
        "image_px": image_px,
        "params_total": total,
        "params_trainable": trainable,
        "train_gflops_per_image": round(flops / 1e9, 3),
        "gflops_method": "FlopCounterMode, train mode, batch 2 forward+backward / 2, meta device",
        "output_shape": list(out_shape),
        "output_channels": list(LESIONS),
        "cbam_sites": list(cfg.cbam.sites) if uses_cbam(cfg) else [],
        "cbam_impl_requested": cfg.cbam.impl if uses_cbam(cfg) else None,
        "cbam_impl_active": active_impl(cfg.cbam.impl, probe) if uses_cbam(cfg) else None,
        "cbam_impl_device": str(device) if uses_cbam(cfg) else None,
        "aux_head": cfg.use_aux_head and cfg.name != "unet",
    }


def _training_flops(model: nn.Module, image_px: int) -> tuple[int, tuple[int, ...]]:
    """(FLOPs per image of one training step, output logits shape for batch 1) of a meta-device model."""
    model.train()
    image = torch.empty(2, 3, image_px, image_px, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(image)
        outputs = list(out.values()) if isinstance(out, dict) else [out]
        sum(o.float().sum() for o in outputs).backward()
    logits = out["logits"] if isinstance(out, dict) else out
    return counter.get_total_flops() // 2, (1, *logits.shape[1:])
