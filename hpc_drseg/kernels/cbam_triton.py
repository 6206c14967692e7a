"""Fused Triton CBAM (Woo et al., ECCV 2018; paper-code semantics as models/cbam.py), registered as the op
`hpc_drseg::cbam_fused` with torch.library.triton_op (Inductor traces into its kernels under torch.compile) and an
autograd formula built from `hpc_drseg::cbam_fused_backward`. `cbam_forward(x, w_fc1, w_fc2, w_spatial)` is the hook
models/cbam.py calls. Kernels: cbam_fwd.py, cbam_bwd.py; launches and buffers: cbam_launch.py.

Design: 8 launches and 9 passes over a (B, C, H, W) tensor for forward + backward. A pass is one read or write of
x, out, the upstream gradient g or dx; everything else is small: at most 4·B·H·W or B·C·P elements (P ≤ a few
programs per image). Stored for backward: chan (4, B, C) = [avg_HW x, max_HW x, tie count of that max, channel gate
cg], plane (B, 4, H, W) = [mean_C x1, max_C x1, tie count of that max, spatial gate sg], both fp32, and the argmax
planes chan_idx (B, C) (a pixel holding max_HW x) and plane_idx (B, H, W) (a channel holding max_C x1), int32;
x1 = x·cg is never stored.
  forward   F1 pool_hw         reads x      partial sum / max / tie count per H·W chunk
            F2 channel_mlp     (B programs) merges them -> chan[0:3], chan_idx; cg = sigmoid(W2(relu(W1 avg) +
                                            relu(W1 max)))
            F3 channel_stats   reads x      plane[0:3] of x1, plane_idx
            F4 spatial_gate    reads x, writes out   sg = sigmoid(conv_k×k(plane[0:2])) -> plane[3]; out = x1·sg
  backward  B1 spatial_grad    reads g, x   dz = Σ_C(g·x1)·sg(1 − sg); dL/dcg partials Σ_HW g·sg·x
            B2 channel_grad    reads x      ds = conv_transpose(dz) routed to x1 (ds_mean / C, ds_max / tie count);
                                            dL/dcg partials += Σ_HW x·routed; dW_spatial partials
            B3 mlp_backward    (B programs) the MLP's backward per image: per-channel coefficients of the pooling
                                            gradients, factors of dW1 and dW2
            B4 input_grad      reads g, writes dx   dx = dx1·cg + coef_avg + coef_max·[x = max_HW x]; its first
                                            programs also sum dW1, dW2, dW_spatial over the batch (fixed order)
Max ties follow torch.amax's backward (the eager reference): the gradient is split evenly among all tied entries,
for both the global H·W max and the per-pixel channel max, by the tie counts of the forward pass. Where a max is
unique, B4 takes it from the argmax planes; only rows or columns whose max ties (a dead channel after a ReLU, an
all-zero pixel) make B4 read x there to find the tied entries. No atomics: the same bits on every run.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from hpc_drseg.errors import InputError
from hpc_drseg.kernels.cbam_launch import (
    KERNELS_INTERPRETED,
    _interpreted,
    backward_passes,
    forward_passes,
    memory_format,
)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCHES_PER_STEP = 8  # forward + backward: F1–F4, B1–B4


# triton.language's own helpers were wrapped when triton was first imported (torch.utils.flop_counter imports it),
# ours when cbam_fwd was: both must agree, and CPU tensors need the interpreted flavour
_LANGUAGE_INTERPRETED = _interpreted(tl.zeros)


def unavailable_reason(device_type: str) -> str | None:
    """Why the kernels cannot run on this device type ("cuda", "cpu", …) in this process (None if they can):
    models/cbam.py falls back to eager then."""
    if _LANGUAGE_INTERPRETED is not None and _LANGUAGE_INTERPRETED != KERNELS_INTERPRETED:
        return (
            "TRITON_INTERPRET changed between the first import of triton and the import of "
            f"{__name__}; set it before Python starts"
        )
    if device_type == "cpu" and not KERNELS_INTERPRETED:
        return (
            "CPU tensors need Triton's interpreter, but triton was imported without TRITON_INTERPRET=1 "
            "(torch imports triton early: set it before Python starts)"
        )
    if device_type not in ("cpu", "cuda"):
        return f"device type {device_type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    return None


def _check_inputs(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> None:
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"fused CBAM: got x of shape {tuple(x.shape)} and dtype {x.dtype}; it needs a 4-D (B, C, H, W) tensor in "
            "float32, bfloat16 or float16 (use impl='eager' for other dtypes)"
        )
    channels, hw = x.shape[1], x.shape[2] * x.shape[3]
    hidden, k = w_fc1.shape[0], w_spatial.shape[-1]
    expected = {"w_fc1": (hidden, channels, 1, 1), "w_fc2": (channels, hidden, 1, 1), "w_spatial": (1, 2, k, k)}
    for name, weight in (("w_fc1", w_fc1), ("w_fc2", w_fc2), ("w_spatial", w_spatial)):
        if tuple(weight.shape) != expected[name] or weight.device != x.device or weight.dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"fused CBAM: {name} has shape {tuple(weight.shape)}, dtype {weight.dtype} on {weight.device}; "
                f"expected {expected[name]} in float32/bfloat16/float16 on {x.device} for x of shape {tuple(x.shape)}"
            )
    if k % 2 == 0 or hw == 0 or x.numel() >= 2**31:
        raise InputError(
            f"fused CBAM: got kernel size {k}, H·W = {hw}, {x.numel()} elements; it needs an odd kernel size, "
            "a non-empty map and fewer than 2**31 elements (32-bit indexing)"
        )


# ------------------------------------------------------------------------------------------------- the ops
def _cbam_fused(
    x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, chan, plane, chan_idx, plane_idx): the CBAM output in x's dtype and memory format, plus the statistics
    the backward reuses (see the module docstring)."""
    _check_inputs(x, w_fc1, w_fc2, w_spatial)
    return forward_passes(x, w_fc1, w_fc2, w_spatial)


def _cbam_fused_backward(
    grad: Tensor,
    x: Tensor,
    w_fc1: Tensor,
    w_fc2: Tensor,
    w_spatial: Tensor,
    chan: Tensor,
    plane: Tensor,
    chan_idx: Tensor,
    plane_idx: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_fc1, dW_fc2, dW_spatial) of `cbam_fused`'s first output, from the saved statistics."""
    return backward_passes(grad, x, w_fc1, w_fc2, w_spatial, chan, plane, chan_idx, plane_idx)


def _register(name: str, fn):  # noqa: ANN001, ANN202 (torch.library's own types)
    """triton_op for compiled kernels. Interpreted kernels cannot be traced (torch's wrap_triton passes them
    through and they would read fake tensors' data), so there the op is an opaque custom_op whose fake is the same
    function: its launches are skipped on fake tensors, leaving the outputs' shapes, dtypes and strides."""
    if KERNELS_INTERPRETED:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


cbam_fused = _register("hpc_drseg::cbam_fused", _cbam_fused)
cbam_fused_backward = _register("hpc_drseg::cbam_fused_backward", _cbam_fused_backward)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001 (autograd's ctx)
    _, *stats = output
    ctx.mark_non_differentiable(*stats)
    # the statistics get no gradient: without this autograd would fill zeros for them, four more launches
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, *stats)


def _cbam_fused_autograd(ctx, grad_out: Tensor | None, *_stat_grads: Tensor | None) -> tuple[Tensor, ...]:  # noqa: ANN001
    # the statistics are saved for backward, not results: their gradients are ignored (never double-differentiated)
    x = ctx.saved_tensors[0]
    if grad_out is None:  # out itself did not reach the loss
        grad_out = torch.zeros_like(x)
    return cbam_fused_backward(grad_out, *ctx.saved_tensors)


cbam_fused.register_autograd(_cbam_fused_autograd, setup_context=_setup_context)


def cbam_forward(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> Tensor:
    """CBAM of x (B, C, H, W) with weights (C//r, C, 1, 1), (C, C//r, 1, 1), (1, 2, k, k): the hook of models/cbam.py.

    Same function, dtype rule and gradients as `hpc_drseg.models.cbam.cbam_eager` (fp32 arithmetic, x's dtype and
    memory format out, max ties split evenly), differentiable in all four inputs. CUDA tensors run compiled kernels;
    CPU tensors run Triton's interpreter (thousands of times slower: tests only).
    """
    _check_inputs(x, w_fc1, w_fc2, w_spatial)
    reason = unavailable_reason(x.device.type)
    if reason is not None:
        raise RuntimeError(f"fused CBAM cannot run: {reason}")
    return cbam_fused(x, w_fc1, w_fc2, w_spatial)[0]


__all__ = [
    "LAUNCHES_PER_STEP",
    "cbam_forward",
    "cbam_fused",
    "cbam_fused_backward",
    "memory_format",
    "unavailable_reason",
]
