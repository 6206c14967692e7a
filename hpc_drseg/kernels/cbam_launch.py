"""Host side of the fused CBAM (Woo et al., ECCV 2018): launch sizes, the buffers between kernels and the eight
launches of a forward and backward pass (cbam_fwd.py, cbam_bwd.py), each through `wrap_triton` so that
torch.library.triton_op can trace them. The design is described in cbam_triton.py.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

# kernels imported by name: triton_op's kernel finder resolves `wrap_triton(<name>)` calls, not attributes
from hpc_drseg.kernels.cbam_bwd import channel_grad_kernel, input_grad_kernel, mlp_backward_kernel, spatial_grad_kernel
from hpc_drseg.kernels.cbam_fwd import channel_mlp_kernel, channel_stats_kernel, pool_hw_kernel, spatial_gate_kernel

MAX_TILE = 2048  # elements of one [BLOCK_C, BLOCK_HW] register tile (8 fp32 per thread at 8 warps)
MIN_BLOCK_HW, MAX_BLOCK_HW = 16, 64  # pixels per program; 64 keeps the [taps, BLOCK_HW] conv gathers at 4096
PROGRAMS_PER_SM = 4  # programs per launch we aim for on a GPU, so small maps (256×16×16) still fill the chip
# Warps of the kernels that stream a [BLOCK_C, BLOCK_HW] tile (F1, F3, F4, B1, B2), from ptxas's register counts on
# sm_90 at the paper's two sites: 8 warps halve the registers per thread (≈150 → ≈75: more warps in flight to hide
# memory latency), and B2, which holds three [taps, BLOCK_HW] gathers, spills at 4. B4 spills at 8 and keeps the
# default 4, as do the one-program-per-image MLP kernels. Not yet timed on a GPU.
STREAM_WARPS = 8
INTERPRETER_PROGRAMS = 1  # the CPU interpreter runs programs one after another: fewest programs is fastest


def _interpreted(fn: object) -> bool | None:
    return {"InterpretedFunction": True, "JITFunction": False}.get(type(fn).__name__)


# triton.jit reads TRITON_INTERPRET when it wraps a function: ours are wrapped when cbam_fwd is first imported
KERNELS_INTERPRETED = _interpreted(pool_hw_kernel)
# real launches per kernel name since the process started (fake-tensor traces launch nothing and are not counted)
LAUNCHES: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Counts the kernel launches made inside the block, by kernel name."""
    start = LAUNCHES.copy()
    counted: collections.Counter[str] = collections.Counter()
    try:
        yield counted
    finally:
        counted.update(LAUNCHES - start)


class _Launcher:
    def __init__(self, kernel: Any):
        self.kernel = kernel

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], **kwargs: Any) -> None:
        traced = any(is_fake(v) for v in kwargs.values() if isinstance(v, Tensor))
        if not traced:
            LAUNCHES[self.kernel.__name__] += 1
        if not KERNELS_INTERPRETED:
            torch.library.wrap_triton(self.kernel)[grid](**kwargs)
        elif not traced:  # an interpreted kernel would read the fake tensors' (absent) data: shapes-only trace
            self.kernel[grid](**kwargs)


def wrap_triton(kernel: Any) -> _Launcher:
    """`torch.library.wrap_triton(kernel)` with a launch counter, and a plain launch for interpreted kernels (torch's
    wrapper cannot trace those). Named as torch's on purpose: triton_op finds an op's kernels, which key its compile
    cache, by looking for calls of a function named `wrap_triton`."""
    return _Launcher(kernel)


# --------------------------------------------------------------------------------------------------- launch sizes
class Grids(NamedTuple):
    pool: tuple[int, int, int]  # F1: (B, C blocks, H·W splits)
    pixels: tuple[int, int, int]  # F3: (H·W blocks, B, 1)
    chunks: tuple[int, int, int]  # F4, B4: (H·W blocks, B, C chunks)
    grad: tuple[int, int, int]  # B1, B2: (P pixel chunks, B, 1)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes (powers of two) and how the work is split across programs."""

    block_c: int
    block_hw: int
    pool_chunk: int  # pixels per F1 program (a multiple of block_hw)
    c_chunk: int  # channels per F4/B4 program (a multiple of block_c)
    grad_chunk: int  # pixels per B1/B2 program (a multiple of block_hw)

    def grids(self, batch: int, channels: int, hw: int) -> Grids:
        """Pixel blocks go on axis 0, the only axis not limited to 65535 programs."""
        blocks_hw = triton.cdiv(hw, self.block_hw)
        return Grids(
            pool=(batch, triton.cdiv(channels, self.block_c), triton.cdiv(hw, self.pool_chunk)),
            pixels=(blocks_hw, batch, 1),
            chunks=(blocks_hw, batch, triton.cdiv(channels, self.c_chunk)),
            grad=(triton.cdiv(hw, self.grad_chunk), batch, 1),
        )


def launch_config(batch: int, channels: int, hw: int, programs: int) -> LaunchConfig:
    """Blocks for a (batch, channels, hw) map so that each launch has about `programs` programs, within tile limits.
    Symbolic sizes (torch.compile with dynamic shapes) are specialised to their values: block sizes are compile-time
    constants of the kernels anyway, and bit tricks on symbols make tracing take minutes."""
    batch, channels, hw = int(batch), int(channels), int(hw)
    target = max(1, programs)
    per_program = triton.next_power_of_2(max(1, batch * hw // target) + 1) // 2  # largest power of two <= quotient
    block_hw = min(MAX_BLOCK_HW, max(MIN_BLOCK_HW, per_program))
    block_c = max(2, min(triton.next_power_of_2(channels), MAX_TILE // block_hw))
    blocks_c, blocks_hw = triton.cdiv(channels, block_c), triton.cdiv(hw, block_hw)
    splits = min(blocks_hw, triton.cdiv(target, batch * blocks_c))
    chunks = min(blocks_c, triton.cdiv(target, batch * blocks_hw))
    grad_programs = min(blocks_hw, triton.cdiv(target, batch))  # B3 sums C·P partials per image: keep P small
    return LaunchConfig(
        block_c=block_c,
        block_hw=block_hw,
        pool_chunk=triton.cdiv(blocks_hw, splits) * block_hw,
        c_chunk=triton.cdiv(blocks_c, chunks) * block_c,
        grad_chunk=triton.cdiv(blocks_hw, grad_programs) * block_hw,
    )


def target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _mlp_blocks(channels: int, hidden: int) -> dict[str, int]:
    """[BLOCK_H, BLOCK_C] tiles of the MLP weights within MAX_TILE."""
    block_h = triton.next_power_of_2(int(hidden))
    return {"BLOCK_H": block_h, "BLOCK_C": max(1, min(triton.next_power_of_2(int(channels)), MAX_TILE // block_h))}


def _weight_grad_blocks(channels: int, hidden: int) -> dict[str, int]:
    """Tiles of B4's weight-gradient products: at least 16 each way (tl.dot), images in blocks of 16."""
    block_h = max(16, triton.next_power_of_2(int(hidden)))
    block_b = 16  # also rows of the [BLOCK_B, 2·K·K] dW_spatial tile, so no more
    # 64 channels at a time: wider tiles raise the register count of all of B4 (its main part included) past 200
    block_wc = max(16, min(triton.next_power_of_2(int(channels)), 64, MAX_TILE // block_h))
    return {"BLOCK_H": block_h, "BLOCK_B": block_b, "BLOCK_WC": block_wc}


# ------------------------------------------------------------------------------------------------ host-side passes
def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is stored that way, else NCHW (a tensor dense in neither is copied to NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _strides(channels: int, hw: int, fmt: torch.memory_format) -> dict[str, int]:
    """Batch, channel and pixel strides of a dense tensor; H and W merge into one pixel index in both formats."""
    if fmt == torch.channels_last:
        return {"stride_b": channels * hw, "stride_c": 1, "stride_hw": channels}
    return {"stride_b": channels * hw, "stride_c": hw, "stride_hw": 1}


def _weight_strides(w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> dict[str, int]:
    # weights are read (and their gradients written) in place with their own strides: a channels_last model's
    # (1, 2, k, k) weight is not contiguous, and a copy would be one more launch
    return {
        "w1_s0": w_fc1.stride(0),
        "w1_s1": w_fc1.stride(1),
        "w2_s0": w_fc2.stride(0),
        "w2_s1": w_fc2.stride(1),
        "ws_c": w_spatial.stride(1),
        "ws_h": w_spatial.stride(2),
        "ws_w": w_spatial.stride(3),
    }


def forward_passes(x: Tensor, w_fc1: Tensor, w_fc2: Tensor, w_spatial: Tensor) -> tuple[Tensor, ...]:
    """(out, chan (4, B, C), plane (B, 4, H, W), chan_idx (B, C), plane_idx (B, H, W)) from launches F1–F4."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    batch, channels, height, width = x.shape
    hw, k, hidden = height * width, int(w_spatial.shape[-1]), w_fc1.shape[0]
    f32 = {"dtype": torch.float32, "device": x.device}
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    chan = torch.empty(4, batch, channels, **f32)
    plane = torch.empty(batch, 4, height, width, **f32)
    chan_idx = torch.empty(batch, channels, dtype=torch.int32, device=x.device)
    plane_idx = torch.empty(batch, height, width, dtype=torch.int32, device=x.device)
    if batch == 0:
        return out, chan, plane, chan_idx, plane_idx
    cfg = launch_config(batch, channels, hw, target_programs(x.device))
    grids = cfg.grids(batch, channels, hw)
    strides, weights = _strides(channels, hw, fmt), _weight_strides(w_fc1, w_fc2, w_spatial)
    blocks = {"BLOCK_C": cfg.block_c, "BLOCK_HW": cfg.block_hw}
    splits = grids.pool[2]
    part = torch.empty(3, batch, channels, splits, **f32)
    part_idx = torch.empty(batch, channels, splits, dtype=torch.int32, device=x.device)
    mlp = _mlp_blocks(channels, hidden)
    wrap_triton(pool_hw_kernel)[grids.pool](
        x_ptr=x, part_ptr=part, part_idx_ptr=part_idx, C=channels, HW=hw, n_part=part[0].numel(),
        chunk=cfg.pool_chunk, splits=splits, **strides, **blocks, num_warps=STREAM_WARPS,
    )  # fmt: skip
    wrap_triton(channel_mlp_kernel)[(batch,)](
        part_ptr=part, part_idx_ptr=part_idx, w1_ptr=w_fc1, w2_ptr=w_fc2, chan_ptr=chan, chan_idx_ptr=chan_idx,
        B=batch, C=channels, HIDDEN=hidden, HW=hw, splits=splits, w1_s0=weights["w1_s0"], w1_s1=weights["w1_s1"],
        w2_s0=weights["w2_s0"], w2_s1=weights["w2_s1"], **mlp,
        BLOCK_S=max(1, min(triton.next_power_of_2(splits), MAX_TILE // mlp["BLOCK_C"])),
    )  # fmt: skip
    wrap_triton(channel_stats_kernel)[grids.pixels](
        x_ptr=x, chan_ptr=chan, plane_ptr=plane, plane_idx_ptr=plane_idx, B=batch, C=channels, HW=hw, **strides,
        **blocks, num_warps=STREAM_WARPS,
    )  # fmt: skip
    wrap_triton(spatial_gate_kernel)[grids.chunks](
        x_ptr=x, chan_ptr=chan, plane_ptr=plane, w_ptr=w_spatial, out_ptr=out, B=batch, C=channels, H=height,
        W=width, c_chunk=cfg.c_chunk, ws_c=weights["ws_c"], ws_h=weights["ws_h"], ws_w=weights["ws_w"],
        K=k, TAPS=triton.next_power_of_2(k * k), **strides, **blocks, num_warps=STREAM_WARPS,
    )  # fmt: skip
    return out, chan, plane, chan_idx, plane_idx


def backward_passes(
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
    """(dx, dW_fc1, dW_fc2, dW_spatial) from launches B1–B4; weight gradients in the weights' dtypes and strides."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)  # the same strides as x (autograd may hand in an expanded tensor)
    batch, channels, height, width = x.shape
    hw, k, hidden = height * width, int(w_spatial.shape[-1]), w_fc1.shape[0]
    f32 = {"dtype": torch.float32, "device": x.device}
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    dws = (torch.empty_like(w_fc1), torch.empty_like(w_fc2), torch.empty_like(w_spatial))
    if batch == 0:  # empty sums: the weight gradients are zero (no launch counts here, so a plain fill is fine)
        return dx, *(w.zero_() for w in dws)
    cfg = launch_config(batch, channels, hw, target_programs(x.device))
    grids = cfg.grids(batch, channels, hw)
    strides, weights = _strides(channels, hw, fmt), _weight_strides(w_fc1, w_fc2, w_spatial)
    blocks = {"BLOCK_C": cfg.block_c, "BLOCK_HW": cfg.block_hw}
    taps = {"K": k, "TAPS": triton.next_power_of_2(k * k)}
    programs = grids.grad[0]
    dz = torch.empty(batch, hw, **f32)
    part = torch.empty(batch, programs, channels, **f32)
    route = torch.empty(batch, 2, hw, **f32)
    dws_part = torch.empty(batch, programs, 2 * k * k, **f32)
    wrap_triton(spatial_grad_kernel)[grids.grad](
        g_ptr=grad, x_ptr=x, chan_ptr=chan, plane_ptr=plane, dz_ptr=dz, part_ptr=part, B=batch, C=channels, HW=hw,
        chunk=cfg.grad_chunk, **strides, **blocks, num_warps=STREAM_WARPS,
    )  # fmt: skip
    wrap_triton(channel_grad_kernel)[grids.grad](
        x_ptr=x, chan_ptr=chan, plane_ptr=plane, dz_ptr=dz, w_ptr=w_spatial, route_ptr=route, part_ptr=part,
        dws_part_ptr=dws_part, B=batch, C=channels, H=height, W=width, chunk=cfg.grad_chunk, ws_c=weights["ws_c"],
        ws_h=weights["ws_h"], ws_w=weights["ws_w"], **strides, **taps, **blocks, num_warps=STREAM_WARPS,
    )  # fmt: skip
    coef = torch.empty(2, batch, channels, **f32)
    dlogit = torch.empty(batch, channels, **f32)
    hid = torch.empty(3, batch, hidden, **f32)
    dws_b = torch.empty(batch, 2 * k * k, **f32)
    taps2 = {"K": k, "TAPS2": triton.next_power_of_2(2 * k * k)}
    mlp = _mlp_blocks(channels, hidden)
    wrap_triton(mlp_backward_kernel)[(batch,)](
        part_ptr=part, chan_ptr=chan, w1_ptr=w_fc1, w2_ptr=w_fc2, dws_part_ptr=dws_part, coef_ptr=coef,
        dlogit_ptr=dlogit, hid_ptr=hid, dws_b_ptr=dws_b, B=batch, C=channels, HIDDEN=hidden, HW=hw, P=programs,
        w1_s0=weights["w1_s0"], w1_s1=weights["w1_s1"], w2_s0=weights["w2_s0"], w2_s1=weights["w2_s1"],
        BLOCK_P=max(1, min(triton.next_power_of_2(programs), MAX_TILE // max(mlp["BLOCK_C"], taps2["TAPS2"]))),
        **taps2, **mlp,
    )  # fmt: skip
    wrap_triton(input_grad_kernel)[grids.chunks](
        g_ptr=grad, x_ptr=x, chan_ptr=chan, chan_idx_ptr=chan_idx, plane_ptr=plane, plane_idx_ptr=plane_idx,
        route_ptr=route, coef_ptr=coef, dlogit_ptr=dlogit,
        hid_ptr=hid, dws_b_ptr=dws_b, dx_ptr=dx, dw1_ptr=dws[0], dw2_ptr=dws[1], dws_ptr=dws[2], B=batch,
        C=channels, HIDDEN=hidden, HW=hw, c_chunk=cfg.c_chunk, **strides, **weights, **taps2, **blocks,
        **_weight_grad_blocks(channels, hidden),
    )  # fmt: skip
    return dx, *dws
