"""CBAM, the Convolutional Block Attention Module (Woo et al., ECCV 2018), with the paper code's semantics: a
bias-free shared channel MLP and a bias-free 7×7 spatial conv without BatchNorm (timm's CbamModule adds a BN).
Channel and spatial parts are small modules composed by `CBAM`, as in timm; for impl="compile"/"triton" the whole
block goes through one function, `cbam_forward`, the boundary a fused kernel replaces.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_drseg.config.choices import CBAM_IMPLS, CBAMImpl
from hpc_drseg.errors import InputError

# Contract of the fused kernel module: `cbam_forward(x, w_fc1, w_fc2, w_spatial) -> Tensor`, differentiable w.r.t.
# all four inputs, same shapes, dtype rule (fp32 arithmetic, x's dtype out) and result as `cbam_eager`; optionally
# `unavailable_reason(device_type) -> str | None` (e.g. TRITON_INTERPRET set only after triton was imported).
# Imported only when impl="triton" is first used.
TRITON_MODULE = "hpc_drseg.kernels.cbam_triton"

_compiled_eager: Callable[..., Tensor] | None = None
_warned_reasons: set[str] = set()


def channel_gate(x: Tensor, w_fc1: Tensor, w_fc2: Tensor) -> Tensor:
    """sigmoid(MLP(avgpool_HW(x)) + MLP(maxpool_HW(x))), shape (B, C, 1, 1); MLP = 1×1 conv, ReLU, 1×1 conv."""
    pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])  # (2B, C, 1, 1): one MLP call
    hidden = F.relu(F.conv2d(pooled, w_fc1))  # (2B, C // r, 1, 1)
    avg_term, max_term = F.conv2d(hidden, w_fc2).chunk(2)
    return torch.sigmoid(avg_term + max_term)


def spatial_gate(x: Tensor, w_spatial: Tensor) -> Tensor:
    """sigmoid(conv_k×k([mean_C(x), max_C(x)])), shape (B, 1, H, W); 'same' padding, no bias, no BN."""
    stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
    return torch.sigmoid(F.conv2d(stats, w_spatial, padding=w_spatial.shape[-1] // 2))


def cbam_eager(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> Tensor:
    """Reference CBAM in plain PyTorch: channel attention first, then spatial attention.

    Computes in fp32 (fp64 stays fp64) with autocast off, returns x's dtype: bf16 rounding of the gated map flips
    channel-max ties and ReLU kinks of the 1-3-unit MLP; computing in bf16 moved gradients by up to 35 % (measured
    against fp64; fp32 inside leaves ≈0.2 %, the output rounding).
    The fp32 copy is small (CBAM sits on 256×(H/32)² and 48×(H/4)² maps).
    """
    dtype = _compute_dtype(x)
    with _autocast_off(x.device.type):
        xc = x.to(dtype)
        xc = xc * channel_gate(xc, w_fc1.to(dtype), w_fc2.to(dtype))
        out = xc * spatial_gate(xc, w_spatial.to(dtype))
    return out.to(x.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # the meta device (FLOP counting) has no autocast at all
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def triton_unavailable_reason(x: Tensor) -> str | None:
    """Why the fused kernel cannot run on `x` (None if it can): needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU."""
    return _triton_unavailable_reason(x.device.type)


@torch.compiler.assume_constant_result  # run once while torch.compile traces: dynamo cannot trace the import
def _triton_unavailable_reason(device_type: str) -> str | None:
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA tensor and TRITON_INTERPRET is not set"
    kernel, error = _load_kernel()
    if kernel is None or not hasattr(kernel, "unavailable_reason"):
        return error
    return kernel.unavailable_reason(device_type)


def active_impl(impl: CBAMImpl, x: Tensor) -> str:
    """The implementation `cbam_forward(x, ..., impl)` really runs ("triton" falls back to "eager")."""
    _check_impl(impl)
    if impl == "triton" and triton_unavailable_reason(x) is not None:
        return "eager"
    return impl


def cbam_forward(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor, impl: CBAMImpl = "eager") -> Tensor:
    """CBAM on x (B, C, H, W) with the MLP weights (C//r, C, 1, 1), (C, C//r, 1, 1) and the spatial weight (1, 2, k, k).

    impl: "eager" = `cbam_eager`; "compile" = torch.compile of it (compiled on first call, shared by all modules);
    "triton" = the fused kernel of `TRITON_MODULE`, falling back to eager with one warning per reason and process.
    Dtype: any float dtype in, same dtype out, arithmetic in fp32 whatever autocast says (see `cbam_eager`); weights
    may be in another dtype. The result keeps x's memory format (NCHW or channels_last).
    """
    if impl == "eager":
        return cbam_eager(x, w_fc1, w_fc2, w_spatial)
    if impl == "compile":
        return _compiled()(x, w_fc1, w_fc2, w_spatial)
    if impl == "triton":
        reason = triton_unavailable_reason(x)
        if reason is None:  # the check imported the module; sys.modules, unlike importlib, is traceable by dynamo
            return sys.modules[TRITON_MODULE].cbam_forward(x, w_fc1, w_fc2, w_spatial)
        _warn_fallback(reason)
        return cbam_eager(x, w_fc1, w_fc2, w_spatial)
    raise _bad_impl(impl)


@functools.cache
def _load_kernel() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why not); cached so a missing module is looked up once per process."""
    try:
        return importlib.import_module(TRITON_MODULE), None
    except ImportError as exc:
        return None, f"{TRITON_MODULE} cannot be imported ({exc})"


def _compiled() -> Callable[..., Tensor]:
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(cbam_eager)
    return _compiled_eager


def _check_impl(impl: str) -> None:
    if impl not in CBAM_IMPLS:
        raise _bad_impl(impl)


def _bad_impl(impl: str) -> InputError:
    return InputError(f"CBAM impl: got {impl!r}; choose one of {list(CBAM_IMPLS)}")


def _warn_fallback(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"CBAM impl='triton' falls back to eager PyTorch: {reason}", RuntimeWarning, stacklevel=3)


class ChannelAttention(nn.Module):
    """x · channel gate, the shared MLP being two bias-free 1×1 convs, C → max(1, C // reduction) → C.

    Computes in x's dtype; `CBAM` hands it an fp32 copy (see `cbam_eager` for why).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # the weights follow x: a bf16 model still gets fp32 gates from CBAM's fp32 copy of x
        return x * channel_gate(x, self.fc1.weight.to(x.dtype), self.fc2.weight.to(x.dtype))


class SpatialAttention(nn.Module):
    """x · spatial gate, from a bias-free 2 → 1 conv (kernel_size × kernel_size, 'same' padding, no BN).

    Computes in x's dtype; `CBAM` hands it an fp32 copy (see `cbam_eager` for why).
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise InputError(f"CBAM kernel_size: got {kernel_size}; it must be a positive odd number (paper: 7)")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * spatial_gate(x, self.conv.weight.to(x.dtype))


class CBAM(nn.Module):
    """x ← channel(x); x ← spatial(x), as timm's CbamModule composes its parts. Same parameters and state_dict for
    every `impl`: "eager" runs the submodules (in fp32, x's dtype out, as `cbam_eager`); "compile" and "triton" hand
    the whole block to `cbam_forward`, the boundary a fused kernel replaces."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, impl: CBAMImpl = "eager"):
        super().__init__()
        _check_impl(impl)
        if reduction < 1:
            raise InputError(f"CBAM reduction: got {reduction}; it must be >= 1 (paper: 16)")
        self.impl = impl
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl != "eager":
            return cbam_forward(
                x, self.channel.fc1.weight, self.channel.fc2.weight, self.spatial.conv.weight, self.impl
            )
        with _autocast_off(x.device.type):
            out = self.spatial(self.channel(x.to(_compute_dtype(x))))
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
