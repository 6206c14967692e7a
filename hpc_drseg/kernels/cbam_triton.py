"""Fused Triton CBAM (Woo et al., ECCV 2018; paper-code semantics as models/cbam.py): forward and backward in a few
passes over x, registered as the custom op `hpc_drseg::cbam_fused` with fake and autograd parts, so it composes with
autocast, torch.compile and DDP. `cbam_forward(x, w_fc1, w_fc2, w_spatial)` is the hook models/cbam.py calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hpc_drseg.errors import InputError

# Passes over x (B, C, H, W); everything else is fp32 and tiny: `chan` (4, B, C) = [avg_HW, max_HW, count of the
# HW max, channel gate], `plane` (B, 4, H, W) = [mean_C x1, max_C x1, count of the C max, spatial gate].
#   forward   F1 pool_hw: partial sum/max/count over HW chunks -> (torch: merge, MLP, sigmoid) -> chan
#             F2 channel_stats: x1 = x·cg on the fly -> plane[0:3]           (x1 never stored)
#             F3 spatial_gate: 7×7 conv of plane[0:2] + sigmoid -> plane[3]; out = x·cg·sg
#   backward  B1 spatial_grad: dz = Σ_C(g·x1) · sg(1 − sg)
#             B2 channel_grad: ds = conv_transpose(dz), dW_spatial partials, dcg partials = Σ_HW dx1·x
#                (torch: MLP backward -> per-channel coefficients of the pooling gradients)
#             B4 input_grad: dx = dx1·cg + davg/HW + dmax·[x = max_HW]/count, dx1 = g·sg + ds routed to x1
# Max ties follow torch.amax's backward (the eager reference): the gradient is split evenly among all tied entries,
# for both the global HW max and the per-pixel channel max; the counts are taken in the forward pass.

MAX_TILE = 2048  # elements of one [BLOCK_C, BLOCK_HW] register tile (16 fp32 per thread at 4 warps)
MIN_BLOCK_HW, MAX_BLOCK_HW = 16, 64  # pixels per program; 64 keeps the [taps, BLOCK_HW] conv gathers at 4096
PROGRAMS_PER_SM = 4  # programs per launch we aim for on a GPU, so small maps (256×16×16) still fill the chip
INTERPRETER_PROGRAMS = 1  # the CPU interpreter runs programs one after another: fewest programs is fastest
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pool_hw_kernel(
    x_ptr,
    sum_ptr,
    max_ptr,
    count_ptr,
    C,
    HW,
    chunk,
    splits,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F1, grid (B, C blocks, HW splits): per (b, c), sum, max and count of the max over one chunk of pixels."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = c < C
    rows = x_ptr + b * stride_b + c[:, None] * stride_c
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    acc_cnt = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for start in range(0, chunk, BLOCK_HW):
        hw = split * chunk + start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        v = tl.load(rows + hw[None, :] * stride_hw, mask=ok, other=0.0).to(tl.float32)
        acc_sum += v
        # per-lane running max and tie count; merged across lanes once, after the loop
        v = tl.where(ok, v, float("-inf"))
        acc_cnt = tl.where(v > acc_max, 1.0, tl.where(ok & (v == acc_max), acc_cnt + 1.0, acc_cnt))
        acc_max = tl.maximum(acc_max, v)
    row_max = tl.max(acc_max, axis=1)
    out = (b * C + c) * splits + split
    tl.store(sum_ptr + out, tl.sum(acc_sum, axis=1), mask=c_ok)
    tl.store(max_ptr + out, row_max, mask=c_ok)
    tl.store(count_ptr + out, tl.sum(tl.where(acc_max == row_max[:, None], acc_cnt, 0.0), axis=1), mask=c_ok)


@triton.jit
def _channel_stats_kernel(
    x_ptr,
    cg_ptr,
    plane_ptr,
    C,
    HW,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F2, grid (HW blocks, B): plane[b, 0:3, pixels] = mean_C, max_C and count of the max of x1 = x·cg."""
    b = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    acc_cnt = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        v = tl.load(x_ptr + b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw, mask=ok, other=0.0)
        x1 = v.to(tl.float32) * tl.load(cg_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
        acc_sum += x1
        x1 = tl.where(ok, x1, float("-inf"))
        acc_cnt = tl.where(x1 > acc_max, 1.0, tl.where(ok & (x1 == acc_max), acc_cnt + 1.0, acc_cnt))
        acc_max = tl.maximum(acc_max, x1)
    col_max = tl.max(acc_max, axis=0)
    plane = plane_ptr + b * 4 * HW + hw
    tl.store(plane, tl.sum(acc_sum, axis=0) / C, mask=hw_ok)
    tl.store(plane + HW, col_max, mask=hw_ok)
    tl.store(plane + 2 * HW, tl.sum(tl.where(acc_max == col_max[None, :], acc_cnt, 0.0), axis=0), mask=hw_ok)


@triton.jit
def _spatial_gate_kernel(
    x_ptr,
    cg_ptr,
    plane_ptr,
    w_ptr,
    out_ptr,
    C,
    H,
    W,
    c_chunk,
    stride_b,
    stride_c,
    stride_hw,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F3, grid (HW blocks, B, C chunks): sg = sigmoid(conv_K×K(plane[0:2])) -> plane[3]; out = x·cg·sg."""
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    HW = H * W
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    h, w = hw // W, hw % W
    # the K×K taps as one gather: rows = taps (padded to a power of two), columns = pixels; zero padding K // 2
    tap = tl.arange(0, TAPS)
    hh = h[None, :] + (tap // K - K // 2)[:, None]
    ww = w[None, :] + (tap % K - K // 2)[:, None]
    ok = (tap < K * K)[:, None] & hw_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    plane = plane_ptr + b * 4 * HW
    w_mean = tl.load(w_ptr + tap, mask=tap < K * K, other=0.0)
    w_max = tl.load(w_ptr + K * K + tap, mask=tap < K * K, other=0.0)
    z = tl.sum(w_mean[:, None] * tl.load(plane + hh * W + ww, mask=ok, other=0.0), axis=0)
    z += tl.sum(w_max[:, None] * tl.load(plane + HW + hh * W + ww, mask=ok, other=0.0), axis=0)
    sg = tl.sigmoid(z)
    # one program per pixel block stores the gate; a scalar branch, not a block mask `hw_ok & (pid_c == 0)`: the
    # Triton 3.9 interpreter rejects a mask that mixes a block with a scalar ("mask has unsupported dtype")
    if pid_c == 0:
        tl.store(plane + 3 * HW + hw, sg, mask=hw_ok)
    for c0 in range(0, c_chunk, BLOCK_C):
        c = pid_c * c_chunk + c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        gate = tl.load(cg_ptr + b * C + c, mask=c_ok, other=0.0)  # masked lanes must not be NaN: they enter sums
        x1 = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * gate[:, None]
        tl.store(out_ptr + offs, (x1 * sg[None, :]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _spatial_grad_kernel(
    g_ptr,
    x_ptr,
    cg_ptr,
    plane_ptr,
    dz_ptr,
    C,
    HW,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """B1, grid (HW blocks, B): dz = dL/d(conv output) = Σ_C(g·x1) · sg·(1 − sg)."""
    b = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        gate = tl.load(cg_ptr + b * C + c, mask=c_ok, other=0.0)  # masked lanes must not be NaN: they enter sums
        x1 = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * gate[:, None]
        acc += tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * x1
    sg = tl.load(plane_ptr + b * 4 * HW + 3 * HW + hw, mask=hw_ok, other=0.0)
    tl.store(dz_ptr + b * HW + hw, tl.sum(acc, axis=0) * sg * (1.0 - sg), mask=hw_ok)


@triton.jit
def _channel_grad_kernel(
    g_ptr,
    x_ptr,
    cg_ptr,
    plane_ptr,
    dz_ptr,
    w_ptr,
    route_ptr,
    dcg_ptr,
    dws_ptr,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_hw,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """B2, grid (HW blocks, B): per program, its share of dW_spatial and of dcg = Σ_HW dx1·x, plus the per-pixel
    gradient reaching x1 through the [mean, max] map: route[b, 0] = ds_mean / C, route[b, 1] = ds_max / count."""
    b = tl.program_id(1)
    prog = b * tl.num_programs(0) + tl.program_id(0)
    HW = H * W
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    h, w = hw // W, hw % W
    plane = plane_ptr + b * 4 * HW
    tap = tl.arange(0, TAPS)
    tap_ok = tap < K * K
    di, dj = (tap // K - K // 2)[:, None], (tap % K - K // 2)[:, None]
    # transposed conv: output pixel q read input q + (di, dj) with tap t, so input p gets dz[p − (di, dj)]·w[t]
    hh, ww = h[None, :] - di, w[None, :] - dj
    ok = tap_ok[:, None] & hw_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    dz_taps = tl.load(dz_ptr + b * HW + hh * W + ww, mask=ok, other=0.0)
    ds_mean = tl.sum(tl.load(w_ptr + tap, mask=tap_ok, other=0.0)[:, None] * dz_taps, axis=0)
    ds_max = tl.sum(tl.load(w_ptr + K * K + tap, mask=tap_ok, other=0.0)[:, None] * dz_taps, axis=0)
    # weight gradient: dW[k, t] = Σ_q dz[q] · s_k[q + (di, dj)], this program's pixels only
    hh, ww = h[None, :] + di, w[None, :] + dj
    ok = tap_ok[:, None] & hw_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    dz_here = tl.load(dz_ptr + b * HW + hw, mask=hw_ok, other=0.0)[None, :]
    dws = dws_ptr + prog * 2 * K * K + tap
    tl.store(dws, tl.sum(dz_here * tl.load(plane + hh * W + ww, mask=ok, other=0.0), axis=1), mask=tap_ok)
    tl.store(dws + K * K, tl.sum(dz_here * tl.load(plane + HW + hh * W + ww, mask=ok, other=0.0), axis=1), mask=tap_ok)
    col_max = tl.load(plane + HW + hw, mask=hw_ok, other=0.0)
    mean_part = ds_mean / C
    max_part = ds_max / tl.load(plane + 2 * HW + hw, mask=hw_ok, other=1.0)
    sg = tl.load(plane + 3 * HW + hw, mask=hw_ok, other=0.0)
    tl.store(route_ptr + b * 2 * HW + hw, mean_part, mask=hw_ok)
    tl.store(route_ptr + b * 2 * HW + HW + hw, max_part, mask=hw_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = v * tl.load(cg_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
        dx1 = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * sg[None, :] + mean_part[None, :]
        dx1 += tl.where(x1 == col_max[None, :], max_part[None, :], 0.0)
        tl.store(dcg_ptr + prog * C + c, tl.sum(tl.where(ok, dx1 * v, 0.0), axis=1), mask=c_ok)


@triton.jit
def _input_grad_kernel(
    g_ptr,
    x_ptr,
    cg_ptr,
    hw_max_ptr,
    coef_avg_ptr,
    coef_max_ptr,
    plane_ptr,
    route_ptr,
    dx_ptr,
    C,
    HW,
    c_chunk,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """B4, grid (HW blocks, B, C chunks): dx = dx1·cg + coef_avg + coef_max·[x = max_HW x], x1 recomputed."""
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    plane = plane_ptr + b * 4 * HW + hw
    col_max = tl.load(plane + HW, mask=hw_ok, other=0.0)[None, :]
    sg = tl.load(plane + 3 * HW, mask=hw_ok, other=0.0)[None, :]
    mean_part = tl.load(route_ptr + b * 2 * HW + hw, mask=hw_ok, other=0.0)[None, :]
    max_part = tl.load(route_ptr + b * 2 * HW + HW + hw, mask=hw_ok, other=0.0)[None, :]
    for c0 in range(0, c_chunk, BLOCK_C):
        c = pid_c * c_chunk + c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        bc = b * C + c
        cg = tl.load(cg_ptr + bc, mask=c_ok, other=0.0)[:, None]
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = v * cg
        dx1 = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * sg + mean_part
        dx1 += tl.where(x1 == col_max, max_part, 0.0)
        hw_max = tl.load(hw_max_ptr + bc, mask=c_ok, other=0.0)[:, None]
        dx = dx1 * cg + tl.load(coef_avg_ptr + bc, mask=c_ok, other=0.0)[:, None]
        dx += tl.where(v == hw_max, tl.load(coef_max_ptr + bc, mask=c_ok, other=0.0)[:, None], 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _interpreted(fn: object) -> bool | None:
    name = type(fn).__name__
    return {"InterpretedFunction": True, "JITFunction": False}.get(name)


# triton.jit reads TRITON_INTERPRET when it wraps a function: triton.language's own helpers (tl.zeros, tl.sum …) are
# wrapped when triton is first imported (torch.utils.flop_counter imports it), ours when this module is imported.
# Both must agree, and CPU tensors need the interpreted flavour.
_KERNELS_INTERPRETED = _interpreted(_pool_hw_kernel)
_LANGUAGE_INTERPRETED = _interpreted(tl.zeros)


def unavailable_reason(device_type: str) -> str | None:
    """Why the kernels cannot run on this device type ("cuda", "cpu", …) in this process (None if they can):
    models/cbam.py falls back to eager then."""
    if _LANGUAGE_INTERPRETED is not None and _LANGUAGE_INTERPRETED != _KERNELS_INTERPRETED:
        return (
            "TRITON_INTERPRET changed between the first import of triton and the import of "
            f"{__name__}; set it before Python starts"
        )
    if device_type == "cpu" and not _KERNELS_INTERPRETED:
        return (
            "CPU tensors need Triton's interpreter, but triton was imported without TRITON_INTERPRET=1 "
            "(torch imports triton early: set it before Python starts)"
        )
    if device_type not in ("cpu", "cuda"):
        return f"device type {device_type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    return None


# --------------------------------------------------------------------------------------------------- launch sizes
@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes (powers of two) and how the work is split across programs."""

    block_c: int
    block_hw: int
    pool_chunk: int  # pixels per F1 program (a multiple of block_hw)
    c_chunk: int  # channels per F3/B4 program (a multiple of block_c)

    def grids(self, batch: int, channels: int, hw: int) -> tuple[tuple[int, int, int], ...]:
        """(F1 grid, per-pixel-block grid of F2/B1/B2, chunked grid of F3/B4). Pixel blocks go on axis 0, the only
        axis not limited to 65535 programs."""
        blocks_hw = triton.cdiv(hw, self.block_hw)
        return (
            (batch, triton.cdiv(channels, self.block_c), triton.cdiv(hw, self.pool_chunk)),
            (blocks_hw, batch, 1),
            (blocks_hw, batch, triton.cdiv(channels, self.c_chunk)),
        )


def launch_config(batch: int, channels: int, hw: int, programs: int) -> LaunchConfig:
    """Blocks for a (batch, channels, hw) map so that each launch has about `programs` programs, within tile limits."""
    target = max(1, programs)
    per_program = triton.next_power_of_2(max(1, batch * hw // target) + 1) // 2  # largest power of two <= quotient
    block_hw = min(MAX_BLOCK_HW, max(MIN_BLOCK_HW, per_program))
    block_c = max(2, min(triton.next_power_of_2(channels), MAX_TILE // block_hw))
    blocks_c, blocks_hw = triton.cdiv(channels, block_c), triton.cdiv(hw, block_hw)
    splits = min(blocks_hw, triton.cdiv(target, batch * blocks_c))
    chunks = min(blocks_c, triton.cdiv(target, batch * blocks_hw))
    return LaunchConfig(
        block_c=block_c,
        block_hw=block_hw,
        pool_chunk=triton.cdiv(blocks_hw, splits) * block_hw,
        c_chunk=triton.cdiv(blocks_c, chunks) * block_c,
    )


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ------------------------------------------------------------------------------------------------ host-side passes
def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is stored that way, else NCHW (a tensor dense in neither is copied to NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _strides(channels: int, hw: int, fmt: torch.memory_format) -> dict[str, int]:
    """Batch, channel and pixel strides of a dense tensor, as kernel arguments; H and W merge into one pixel index in
    both formats."""
    if fmt == torch.channels_last:
        return {"stride_b": channels * hw, "stride_c": 1, "stride_hw": channels}
    return {"stride_b": channels * hw, "stride_c": hw, "stride_hw": 1}


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
        if tuple(weight.shape) != expected[name] or weight.device != x.device:
            raise InputError(
                f"fused CBAM: {name} has shape {tuple(weight.shape)} on {weight.device}; expected {expected[name]} on "
                f"{x.device} for x of shape {tuple(x.shape)}"
            )
    if k % 2 == 0 or hw == 0 or x.numel() >= 2**31:
        raise InputError(
            f"fused CBAM: got kernel size {k}, H·W = {hw}, {x.numel()} elements; it needs an odd kernel size, "
            "a non-empty map and fewer than 2**31 elements (32-bit indexing)"
        )


def _autocast_off(device: torch.device) -> torch.autocast:
    # the tiny MLP must stay fp32 even when the caller runs under autocast
    return torch.autocast(device.type, enabled=False)


def _channel_gate(partial: Tensor, hw: int, w_fc1: Tensor, w_fc2: Tensor) -> Tensor:
    """Merges F1's per-split partials (3, B, C, splits) and runs the shared MLP: chan (4, B, C) in fp32."""
    part_sum, part_max, part_count = partial
    hw_max = part_max.amax(-1)
    count = torch.where(part_max == hw_max[..., None], part_count, 0.0).sum(-1)
    avg = part_sum.sum(-1) / hw
    w1 = w_fc1.flatten(1).float()  # (hidden, C)
    hidden = F.relu(avg @ w1.T) + F.relu(hw_max @ w1.T)  # the second layer is linear: MLP(a) + MLP(m) = W2(h_a + h_m)
    gate = torch.sigmoid(hidden @ w_fc2.flatten(1).float().T)
    return torch.stack([avg, hw_max, count, gate])


def _forward(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    batch, channels, height, width = x.shape
    hw, k = height * width, w_spatial.shape[-1]
    f32 = {"dtype": torch.float32, "device": x.device}
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    plane = torch.empty(batch, 4, height, width, **f32)
    if batch == 0:
        return out, torch.empty(4, 0, channels, **f32), plane
    cfg = launch_config(batch, channels, hw, _target_programs(x.device))
    grid_pool, grid_pixels, grid_chunks = cfg.grids(batch, channels, hw)
    strides = _strides(channels, hw, fmt)
    blocks = {"BLOCK_C": cfg.block_c, "BLOCK_HW": cfg.block_hw}
    partial = torch.empty(3, batch, channels, grid_pool[2], **f32)
    _pool_hw_kernel[grid_pool](
        x_ptr=x,
        sum_ptr=partial[0],
        max_ptr=partial[1],
        count_ptr=partial[2],
        C=channels,
        HW=hw,
        chunk=cfg.pool_chunk,
        splits=grid_pool[2],
        **strides,
        **blocks,
    )
    with _autocast_off(x.device):
        chan = _channel_gate(partial, hw, w_fc1, w_fc2)
    _channel_stats_kernel[grid_pixels](x_ptr=x, cg_ptr=chan[3], plane_ptr=plane, C=channels, HW=hw, **strides, **blocks)
    w32 = w_spatial.detach().float().contiguous()
    taps = {"K": k, "TAPS": triton.next_power_of_2(k * k)}
    _spatial_gate_kernel[grid_chunks](
        x_ptr=x,
        cg_ptr=chan[3],
        plane_ptr=plane,
        w_ptr=w32,
        out_ptr=out,
        C=channels,
        H=height,
        W=width,
        c_chunk=cfg.c_chunk,
        **strides,
        **taps,
        **blocks,
    )
    return out, chan, plane


def _mlp_backward(dcg: Tensor, chan: Tensor, w_fc1: Tensor, w_fc2: Tensor, hw: int) -> tuple[Tensor, ...]:
    """Backward of the channel gate from dL/dcg (B, C): (dW_fc1, dW_fc2, coef_avg, coef_max), all fp32, where
    coef_avg = dL/davg / HW and coef_max = dL/dmax / count are what each pixel of x gets back through the pools."""
    avg, hw_max, count, gate = chan
    w1, w2 = w_fc1.flatten(1).float(), w_fc2.flatten(1).float()  # (hidden, C), (C, hidden)
    pre_avg, pre_max = avg @ w1.T, hw_max @ w1.T
    d_logit = dcg * gate * (1.0 - gate)
    d_w2 = d_logit.T @ (F.relu(pre_avg) + F.relu(pre_max))
    d_hidden = d_logit @ w2
    d_pre_avg, d_pre_max = d_hidden * (pre_avg > 0), d_hidden * (pre_max > 0)  # ReLU'(0) = 0, as torch
    d_w1 = d_pre_avg.T @ avg + d_pre_max.T @ hw_max
    return d_w1, d_w2, (d_pre_avg @ w1) / hw, (d_pre_max @ w1) / count


def _backward(
    grad: Tensor, x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor, chan: Tensor, plane: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)  # the same strides as x (autograd may hand in an expanded tensor)
    batch, channels, height, width = x.shape
    hw, k = height * width, w_spatial.shape[-1]
    f32 = {"dtype": torch.float32, "device": x.device}
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if batch == 0:
        return dx, torch.zeros_like(w_fc1), torch.zeros_like(w_fc2), torch.zeros_like(w_spatial)
    cfg = launch_config(batch, channels, hw, _target_programs(x.device))
    _, grid_pixels, grid_chunks = cfg.grids(batch, channels, hw)
    strides = _strides(channels, hw, fmt)
    blocks = {"BLOCK_C": cfg.block_c, "BLOCK_HW": cfg.block_hw}
    taps = {"K": k, "TAPS": triton.next_power_of_2(k * k)}
    dz = torch.empty(batch, height, width, **f32)
    _spatial_grad_kernel[grid_pixels](
        g_ptr=grad, x_ptr=x, cg_ptr=chan[3], plane_ptr=plane, dz_ptr=dz, C=channels, HW=hw, **strides, **blocks
    )
    route = torch.empty(batch, 2, height, width, **f32)
    dcg_part = torch.empty(batch, grid_pixels[0], channels, **f32)
    dws_part = torch.empty(batch * grid_pixels[0], 2, k, k, **f32)
    w32 = w_spatial.detach().float().contiguous()
    _channel_grad_kernel[grid_pixels](
        g_ptr=grad,
        x_ptr=x,
        cg_ptr=chan[3],
        plane_ptr=plane,
        dz_ptr=dz,
        w_ptr=w32,
        route_ptr=route,
        dcg_ptr=dcg_part,
        dws_ptr=dws_part,
        C=channels,
        H=height,
        W=width,
        **strides,
        **taps,
        **blocks,
    )
    with _autocast_off(x.device):
        d_w1, d_w2, coef_avg, coef_max = _mlp_backward(dcg_part.sum(1), chan, w_fc1, w_fc2, hw)
    _input_grad_kernel[grid_chunks](
        g_ptr=grad,
        x_ptr=x,
        cg_ptr=chan[3],
        hw_max_ptr=chan[1],
        coef_avg_ptr=coef_avg.contiguous(),
        coef_max_ptr=coef_max.contiguous(),
        plane_ptr=plane,
        route_ptr=route,
        dx_ptr=dx,
        C=channels,
        HW=hw,
        c_chunk=cfg.c_chunk,
        **strides,
        **blocks,
    )
    d_ws = dws_part.sum(0, keepdim=True)
    return dx, d_w1.view_as(w_fc1).to(w_fc1.dtype), d_w2.view_as(w_fc2).to(w_fc2.dtype), d_ws.to(w_spatial.dtype)


# ------------------------------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("hpc_drseg::cbam_fused", mutates_args=())
def cbam_fused(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(out, chan, plane): the CBAM output in x's dtype and memory format, plus the fp32 statistics the backward
    reuses: chan (4, B, C) = [avg_HW, max_HW, tie count, channel gate], plane (B, 4, H, W) = [mean_C, max_C, tie
    count, spatial gate] of x1 = x · channel gate."""
    _check_inputs(x, w_fc1, w_fc2, w_spatial)
    reason = unavailable_reason(x.device.type)
    if reason is not None:
        raise RuntimeError(f"fused CBAM cannot run: {reason}")
    return _forward(x, w_fc1, w_fc2, w_spatial)


@cbam_fused.register_fake
def _cbam_fused_fake(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(x, w_fc1, w_fc2, w_spatial)
    batch, channels, height, width = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return (
        out,
        x.new_empty((4, batch, channels), dtype=torch.float32),
        x.new_empty((batch, 4, height, width), dtype=torch.float32),
    )


@torch.library.custom_op("hpc_drseg::cbam_fused_backward", mutates_args=())
def cbam_fused_backward(
    grad: Tensor, x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor, chan: Tensor, plane: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_fc1, dW_fc2, dW_spatial) of `cbam_fused`'s first output, from the saved chan and plane."""
    return _backward(grad, x, w_fc1, w_fc2, w_spatial, chan, plane)


@cbam_fused_backward.register_fake
def _cbam_fused_backward_fake(
    grad: Tensor, x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor, chan: Tensor, plane: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return dx, torch.empty_like(w_fc1), torch.empty_like(w_fc2), torch.empty_like(w_spatial)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001 (autograd's ctx)
    x, w_fc1, w_fc2, w_spatial = inputs
    _, chan, plane = output
    ctx.mark_non_differentiable(chan, plane)
    ctx.save_for_backward(x, w_fc1, w_fc2, w_spatial, chan, plane)


def _cbam_fused_autograd(ctx, grad_out: Tensor, _grad_chan: Tensor, _grad_plane: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
    # chan and plane are saved statistics, not results: their gradients are ignored (and never double-differentiated)
    return cbam_fused_backward(grad_out, *ctx.saved_tensors)


cbam_fused.register_autograd(_cbam_fused_autograd, setup_context=_setup_context)


def cbam_forward(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> Tensor:
    """CBAM of x (B, C, H, W) with weights (C//r, C, 1, 1), (C, C//r, 1, 1), (1, 2, k, k): the hook of models/cbam.py.

    Same function, dtype rule and gradients as `hpc_drseg.models.cbam.cbam_eager` (fp32 arithmetic, x's dtype and
    memory format out, max ties split evenly), differentiable in all four inputs. CUDA tensors run compiled kernels;
    CPU tensors run Triton's interpreter (thousands of times slower: tests only).
    """
    return cbam_fused(x, w_fc1, w_fc2, w_spatial)[0]
