"""Forward Triton kernels of the fused CBAM (Woo et al., ECCV 2018; the paper code's bias-free MLP and 7×7 conv):
F1 pools x over H·W, F2 merges the pools and runs the channel MLP, F3 pools x·gate over C, F4 applies both gates.
Launch sizes, buffers and the order of launches live in cbam_launch.py; the design is described in cbam_triton.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pool_hw_kernel(
    x_ptr,
    part_ptr,
    part_idx_ptr,
    C,
    HW,
    n_part,
    chunk,
    splits,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F1, grid (B, C blocks, H·W splits): sum, max and tie count of the max of x over one chunk of pixels, into
    part (3, B, C, splits) (n_part = B·C·splits elements per row), and a pixel holding that max into part_idx."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = c < C
    rows = x_ptr + b * stride_b + c[:, None] * stride_c
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    acc_cnt = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_idx = tl.full([BLOCK_C, BLOCK_HW], -1, tl.int32)
    for start in range(0, chunk, BLOCK_HW):
        hw = split * chunk + start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        v = tl.load(rows + hw[None, :] * stride_hw, mask=ok, other=0.0).to(tl.float32)
        acc_sum += v
        # per-lane running max, tie count and where the max was; merged across lanes once, after the loop
        v = tl.where(ok, v, float("-inf"))
        acc_cnt = tl.where(v > acc_max, 1.0, tl.where(ok & (v == acc_max), acc_cnt + 1.0, acc_cnt))
        acc_idx = tl.where(v > acc_max, hw[None, :], acc_idx)
        acc_max = tl.maximum(acc_max, v)
    row_max = tl.max(acc_max, axis=1)
    at_max = acc_max == row_max[:, None]
    out = (b * C + c) * splits + split
    tl.store(part_ptr + out, tl.sum(acc_sum, axis=1), mask=c_ok)
    tl.store(part_ptr + out + n_part, row_max, mask=c_ok)
    tl.store(part_ptr + out + 2 * n_part, tl.sum(tl.where(at_max, acc_cnt, 0.0), axis=1), mask=c_ok)
    tl.store(part_idx_ptr + out, tl.max(tl.where(at_max, acc_idx, -1), axis=1), mask=c_ok)


@triton.jit
def channel_mlp_kernel(
    part_ptr,
    part_idx_ptr,
    w1_ptr,
    w2_ptr,
    chan_ptr,
    chan_idx_ptr,
    B,
    C,
    HIDDEN,
    HW,
    splits,
    w1_s0,
    w1_s1,
    w2_s0,
    w2_s1,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """F2, grid (B,): merges F1's partials into chan (4, B, C) = [avg_HW, max_HW, tie count, channel gate] and
    chan_idx (B, C) = a pixel holding max_HW; the gate is sigmoid(W2·(relu(W1·avg) + relu(W1·max))): the second
    layer is linear, so MLP(a) + MLP(m) needs one W2 product."""
    b = tl.program_id(0)
    n_part = B * C * splits
    h = tl.arange(0, BLOCK_H)
    h_ok = h < HIDDEN
    pre_avg = tl.zeros([BLOCK_H], dtype=tl.float32)
    pre_max = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        hw_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        hw_idx = tl.full([BLOCK_C], -1, tl.int32)
        # BLOCK_S splits at a time as one [BLOCK_S, BLOCK_C] tile: one round trip to memory, not one per split
        for s0 in range(0, splits, BLOCK_S):
            split = s0 + tl.arange(0, BLOCK_S)
            ok = (split < splits)[:, None] & c_ok[None, :]
            offs = ((b * C + c) * splits)[None, :] + split[:, None]
            src = part_ptr + offs
            part_max = tl.load(src + n_part, mask=ok, other=float("-inf"))
            block_max = tl.max(part_max, axis=0)
            block_cnt = tl.sum(
                tl.where(part_max == block_max[None, :], tl.load(src + 2 * n_part, mask=ok, other=0.0), 0.0), axis=0
            )
            count = tl.where(block_max > hw_max, block_cnt, tl.where(block_max == hw_max, count + block_cnt, count))
            part_idx = tl.load(part_idx_ptr + offs, mask=ok, other=-1)
            block_idx = tl.max(tl.where(part_max == block_max[None, :], part_idx, -1), axis=0)
            hw_idx = tl.where(block_max > hw_max, block_idx, hw_idx)
            hw_max = tl.maximum(hw_max, block_max)
            total += tl.sum(tl.load(src, mask=ok, other=0.0), axis=0)
        avg = total / HW
        hw_max = tl.where(c_ok, hw_max, 0.0)  # masked lanes are -inf, and -inf · 0 would be NaN in the products
        dst = chan_ptr + b * C + c
        tl.store(dst, avg, mask=c_ok)
        tl.store(dst + B * C, hw_max, mask=c_ok)
        tl.store(dst + 2 * B * C, count, mask=c_ok)
        tl.store(chan_idx_ptr + b * C + c, hw_idx, mask=c_ok)
        tile_ok = h_ok[:, None] & c_ok[None, :]
        w1 = tl.load(w1_ptr + h[:, None] * w1_s0 + c[None, :] * w1_s1, mask=tile_ok, other=0.0).to(tl.float32)
        pre_avg += tl.sum(w1 * avg[None, :], axis=1)
        pre_max += tl.sum(w1 * hw_max[None, :], axis=1)
    hidden = tl.maximum(pre_avg, 0.0) + tl.maximum(pre_max, 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        tile_ok = h_ok[:, None] & c_ok[None, :]
        w2 = tl.load(w2_ptr + c[None, :] * w2_s0 + h[:, None] * w2_s1, mask=tile_ok, other=0.0).to(tl.float32)
        logit = tl.sum(w2 * hidden[:, None], axis=0)
        tl.store(chan_ptr + 3 * B * C + b * C + c, tl.sigmoid(logit), mask=c_ok)


@triton.jit
def channel_stats_kernel(
    x_ptr,
    chan_ptr,
    plane_ptr,
    plane_idx_ptr,
    B,
    C,
    HW,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F3, grid (H·W blocks, B): plane[b, 0:3, pixels] = mean_C, max_C and tie count of the max of x1 = x·gate;
    plane_idx[b, pixels] = a channel holding that max."""
    b = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    gate_ptr = chan_ptr + 3 * B * C + b * C
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    acc_cnt = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_idx = tl.full([BLOCK_C, BLOCK_HW], -1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        v = tl.load(x_ptr + b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw, mask=ok, other=0.0)
        x1 = v.to(tl.float32) * tl.load(gate_ptr + c, mask=c_ok, other=0.0)[:, None]
        acc_sum += x1
        x1 = tl.where(ok, x1, float("-inf"))
        acc_cnt = tl.where(x1 > acc_max, 1.0, tl.where(ok & (x1 == acc_max), acc_cnt + 1.0, acc_cnt))
        acc_idx = tl.where(x1 > acc_max, c[:, None], acc_idx)
        acc_max = tl.maximum(acc_max, x1)
    col_max = tl.max(acc_max, axis=0)
    at_max = acc_max == col_max[None, :]
    plane = plane_ptr + b * 4 * HW + hw
    tl.store(plane, tl.sum(acc_sum, axis=0) / C, mask=hw_ok)
    tl.store(plane + HW, col_max, mask=hw_ok)
    tl.store(plane + 2 * HW, tl.sum(tl.where(at_max, acc_cnt, 0.0), axis=0), mask=hw_ok)
    tl.store(plane_idx_ptr + b * HW + hw, tl.max(tl.where(at_max, acc_idx, -1), axis=0), mask=hw_ok)


@triton.jit
def spatial_gate_kernel(
    x_ptr,
    chan_ptr,
    plane_ptr,
    w_ptr,
    out_ptr,
    B,
    C,
    H,
    W,
    c_chunk,
    stride_b,
    stride_c,
    stride_hw,
    ws_c,
    ws_h,
    ws_w,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """F4, grid (H·W blocks, B, C chunks): sg = sigmoid(conv_K×K(plane[0:2])) -> plane[3]; out = x·gate·sg."""
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    HW = H * W
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    h, w = hw // W, hw % W
    # the K×K taps as one gather: rows = taps (padded to a power of two), columns = pixels; zero padding K // 2
    tap = tl.arange(0, TAPS)
    tap_ok = tap < K * K
    hh = h[None, :] + (tap // K - K // 2)[:, None]
    ww = w[None, :] + (tap % K - K // 2)[:, None]
    inside = tap_ok[:, None] & hw_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    plane = plane_ptr + b * 4 * HW
    w_taps = w_ptr + (tap // K) * ws_h + (tap % K) * ws_w
    w_mean = tl.load(w_taps, mask=tap_ok, other=0.0).to(tl.float32)
    w_max = tl.load(w_taps + ws_c, mask=tap_ok, other=0.0).to(tl.float32)
    z = tl.sum(w_mean[:, None] * tl.load(plane + hh * W + ww, mask=inside, other=0.0), axis=0)
    z += tl.sum(w_max[:, None] * tl.load(plane + HW + hh * W + ww, mask=inside, other=0.0), axis=0)
    sg = tl.sigmoid(z)
    # one program per pixel block stores the gate; a scalar branch, not a block mask `hw_ok & (pid_c == 0)`: the
    # Triton 3.9 interpreter rejects a mask that mixes a block with a scalar ("mask has unsupported dtype")
    if pid_c == 0:
        tl.store(plane + 3 * HW + hw, sg, mask=hw_ok)
    gate_ptr = chan_ptr + 3 * B * C + b * C
    for c0 in range(0, c_chunk, BLOCK_C):
        c = pid_c * c_chunk + c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        x1 = (
            tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            * tl.load(gate_ptr + c, mask=c_ok, other=0.0)[:, None]
        )
        tl.store(out_ptr + offs, (x1 * sg[None, :]).to(out_ptr.dtype.element_ty), mask=ok)
