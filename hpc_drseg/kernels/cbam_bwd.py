"""Backward Triton kernels of the fused CBAM (Woo et al., ECCV 2018): B1 the spatial-gate gradient, B2 the
channel-gate gradient through the [mean, max] map, B3 the channel MLP's backward per image, B4 dx and the weight
gradients. Launch sizes and buffers live in cbam_launch.py; the design is described in cbam_triton.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def spatial_grad_kernel(
    g_ptr,
    x_ptr,
    chan_ptr,
    plane_ptr,
    dz_ptr,
    part_ptr,
    B,
    C,
    HW,
    chunk,
    stride_b,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """B1, grid (P, B), each program a chunk of pixels: dz = Σ_C(g·x1)·sg·(1 − sg) (the gradient of the conv
    output), and part[b, program, c] = Σ_pixels g·sg·x, the first term of dL/dgate (B2 adds the others)."""
    b = tl.program_id(1)
    prog = tl.program_id(0)
    row = part_ptr + (b * tl.num_programs(0) + prog) * C
    gate_ptr = chan_ptr + 3 * B * C + b * C
    for start in range(0, chunk, BLOCK_HW):
        hw = prog * chunk + start + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        sg = tl.load(plane_ptr + b * 4 * HW + 3 * HW + hw, mask=hw_ok, other=0.0)
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            ok = c_ok[:, None] & hw_ok[None, :]
            offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
            v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * v
            acc += gv * tl.load(gate_ptr + c, mask=c_ok, other=0.0)[:, None]
            # the partial row is read back by other threads of this program: wait for their stores
            tl.debug_barrier()
            prev = tl.where(start > 0, tl.load(row + c, mask=c_ok, other=0.0), 0.0)
            tl.store(row + c, prev + tl.sum(gv * sg[None, :], axis=1), mask=c_ok)
        tl.store(dz_ptr + b * HW + hw, tl.sum(acc, axis=0) * sg * (1.0 - sg), mask=hw_ok)


@triton.jit
def channel_grad_kernel(
    x_ptr,
    chan_ptr,
    plane_ptr,
    dz_ptr,
    w_ptr,
    route_ptr,
    part_ptr,
    dws_part_ptr,
    B,
    C,
    H,
    W,
    chunk,
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
    """B2, grid (P, B) as B1: ds = conv_transpose(dz) per pixel, routed to x1 as route[b, 0] = ds_mean / C and
    route[b, 1] = ds_max / tie count; part[b, program, c] += Σ_pixels x·(route0 + route1·[x1 = max_C x1]); the
    program's share of dW_spatial into dws_part (B, P, 2, K·K). Reads x only (B1 took care of the g term)."""
    b = tl.program_id(1)
    prog = tl.program_id(0)
    HW = H * W
    row = part_ptr + (b * tl.num_programs(0) + prog) * C
    plane = plane_ptr + b * 4 * HW
    gate_ptr = chan_ptr + 3 * B * C + b * C
    tap = tl.arange(0, TAPS)
    tap_ok = tap < K * K
    di, dj = (tap // K - K // 2)[:, None], (tap % K - K // 2)[:, None]
    w_taps = w_ptr + (tap // K) * ws_h + (tap % K) * ws_w
    w_mean = tl.load(w_taps, mask=tap_ok, other=0.0).to(tl.float32)[:, None]
    w_max = tl.load(w_taps + ws_c, mask=tap_ok, other=0.0).to(tl.float32)[:, None]
    dws_mean = tl.zeros([TAPS], dtype=tl.float32)
    dws_max = tl.zeros([TAPS], dtype=tl.float32)
    for start in range(0, chunk, BLOCK_HW):
        hw = prog * chunk + start + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        h, w = hw // W, hw % W
        # transposed conv: output pixel q read input q + (di, dj) with tap t, so input p gets dz[p − (di, dj)]·w[t]
        src_h, src_w = h[None, :] - di, w[None, :] - dj
        inside = tap_ok[:, None] & hw_ok[None, :] & (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W)
        dz_taps = tl.load(dz_ptr + b * HW + src_h * W + src_w, mask=inside, other=0.0)
        ds_mean = tl.sum(w_mean * dz_taps, axis=0)
        ds_max = tl.sum(w_max * dz_taps, axis=0)
        # weight gradient: dW[k, t] = Σ_q dz[q] · s_k[q + (di, dj)], this program's pixels only
        dst_h, dst_w = h[None, :] + di, w[None, :] + dj
        inside = tap_ok[:, None] & hw_ok[None, :] & (dst_h >= 0) & (dst_h < H) & (dst_w >= 0) & (dst_w < W)
        dz_here = tl.load(dz_ptr + b * HW + hw, mask=hw_ok, other=0.0)[None, :]
        dws_mean += tl.sum(dz_here * tl.load(plane + dst_h * W + dst_w, mask=inside, other=0.0), axis=1)
        dws_max += tl.sum(dz_here * tl.load(plane + HW + dst_h * W + dst_w, mask=inside, other=0.0), axis=1)
        col_max = tl.load(plane + HW + hw, mask=hw_ok, other=0.0)
        mean_part = ds_mean / C
        max_part = ds_max / tl.load(plane + 2 * HW + hw, mask=hw_ok, other=1.0)
        tl.store(route_ptr + b * 2 * HW + hw, mean_part, mask=hw_ok)
        tl.store(route_ptr + b * 2 * HW + HW + hw, max_part, mask=hw_ok)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            ok = c_ok[:, None] & hw_ok[None, :]
            v = tl.load(x_ptr + b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw, mask=ok, other=0.0)
            v = v.to(tl.float32)
            x1 = v * tl.load(gate_ptr + c, mask=c_ok, other=0.0)[:, None]
            routed = mean_part[None, :] + tl.where(x1 == col_max[None, :], max_part[None, :], 0.0)
            tl.debug_barrier()  # as in B1: the row was stored by other threads of this program
            prev = tl.load(row + c, mask=c_ok, other=0.0)
            tl.store(row + c, prev + tl.sum(tl.where(ok, routed * v, 0.0), axis=1), mask=c_ok)
    dws = dws_part_ptr + (b * tl.num_programs(0) + prog) * 2 * K * K + tap
    tl.store(dws, dws_mean, mask=tap_ok)
    tl.store(dws + K * K, dws_max, mask=tap_ok)


@triton.jit
def mlp_backward_kernel(
    part_ptr,
    chan_ptr,
    w1_ptr,
    w2_ptr,
    dws_part_ptr,
    coef_ptr,
    dlogit_ptr,
    hid_ptr,
    dws_b_ptr,
    B,
    C,
    HIDDEN,
    HW,
    P,
    w1_s0,
    w1_s1,
    w2_s0,
    w2_s1,
    K: tl.constexpr,
    TAPS2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """B3, grid (B,): dL/dgate = Σ of the P partials; the MLP's backward for this image: coef (2, B, C) =
    [dL/davg / H·W, dL/dmax / tie count] (what each pixel of x gets back through the pools), and the factors of
    the weight gradients, dlogit (B, C) and hid (3, B, HIDDEN) = [relu(W1·avg) + relu(W1·max), dL/d(W1·avg),
    dL/d(W1·max)]; dws_b (B, 2·K·K) = this image's share of dW_spatial. B4 sums the shares over the batch."""
    b = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < HIDDEN
    chan = chan_ptr + b * C
    pre_avg = tl.zeros([BLOCK_H], dtype=tl.float32)
    pre_max = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1 = tl.load(w1_ptr + h[:, None] * w1_s0 + c[None, :] * w1_s1, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        w1 = w1.to(tl.float32)
        pre_avg += tl.sum(w1 * tl.load(chan + c, mask=c_ok, other=0.0)[None, :], axis=1)
        pre_max += tl.sum(w1 * tl.load(chan + B * C + c, mask=c_ok, other=0.0)[None, :], axis=1)
    d_hidden = tl.zeros([BLOCK_H], dtype=tl.float32)
    p = tl.arange(0, BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        d_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            rows = b * P + p0 + p
            ok = ((p0 + p) < P)[:, None] & c_ok[None, :]
            d_gate += tl.sum(tl.load(part_ptr + rows[:, None] * C + c[None, :], mask=ok, other=0.0), axis=0)
        gate = tl.load(chan + 3 * B * C + c, mask=c_ok, other=0.0)
        d_logit = d_gate * gate * (1.0 - gate)
        tl.store(dlogit_ptr + b * C + c, d_logit, mask=c_ok)
        w2 = tl.load(w2_ptr + c[None, :] * w2_s0 + h[:, None] * w2_s1, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        d_hidden += tl.sum(w2.to(tl.float32) * d_logit[None, :], axis=1)
    d_pre_avg = tl.where(pre_avg > 0, d_hidden, 0.0)  # ReLU'(0) = 0, as torch
    d_pre_max = tl.where(pre_max > 0, d_hidden, 0.0)
    hid = hid_ptr + b * HIDDEN + h
    tl.store(hid, tl.maximum(pre_avg, 0.0) + tl.maximum(pre_max, 0.0), mask=h_ok)
    tl.store(hid + B * HIDDEN, d_pre_avg, mask=h_ok)
    tl.store(hid + 2 * B * HIDDEN, d_pre_max, mask=h_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1 = tl.load(w1_ptr + h[:, None] * w1_s0 + c[None, :] * w1_s1, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        w1 = w1.to(tl.float32)
        count = tl.load(chan + 2 * B * C + c, mask=c_ok, other=1.0)
        tl.store(coef_ptr + b * C + c, tl.sum(w1 * d_pre_avg[:, None], axis=0) / HW, mask=c_ok)
        tl.store(coef_ptr + B * C + b * C + c, tl.sum(w1 * d_pre_max[:, None], axis=0) / count, mask=c_ok)
    tap = tl.arange(0, TAPS2)
    tap_ok = tap < 2 * K * K
    dws = tl.zeros([TAPS2], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = b * P + p0 + p
        ok = ((p0 + p) < P)[:, None] & tap_ok[None, :]
        dws += tl.sum(tl.load(dws_part_ptr + rows[:, None] * 2 * K * K + tap[None, :], mask=ok, other=0.0), axis=0)
    tl.store(dws_b_ptr + b * 2 * K * K + tap, dws, mask=tap_ok)


@triton.jit
def input_grad_kernel(
    g_ptr,
    x_ptr,
    chan_ptr,
    chan_idx_ptr,
    plane_ptr,
    plane_idx_ptr,
    route_ptr,
    coef_ptr,
    dlogit_ptr,
    hid_ptr,
    dws_b_ptr,
    dx_ptr,
    dw1_ptr,
    dw2_ptr,
    dws_ptr,
    B,
    C,
    HIDDEN,
    HW,
    c_chunk,
    stride_b,
    stride_c,
    stride_hw,
    w1_s0,
    w1_s1,
    w2_s0,
    w2_s1,
    ws_c,
    ws_h,
    ws_w,
    K: tl.constexpr,
    TAPS2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_WC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """B4 main part, grid (H·W blocks, B, C chunks): dx = dx1·gate + coef_avg + coef_max·[x = max_HW x] with
    dx1 = g·sg + route0 + route1·[x1 = max_C x1]. Where a max is unique the indicator is its stored position (F2's
    chan_idx, F3's plane_idx), so x is read only in rows or columns whose max ties. Then the weight gradients."""
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    plane = plane_ptr + b * 4 * HW + hw
    col_max = tl.load(plane + HW, mask=hw_ok, other=0.0)[None, :]
    col_tied = (tl.load(plane + 2 * HW, mask=hw_ok, other=1.0) > 1.0)[None, :]
    col_argmax = tl.load(plane_idx_ptr + b * HW + hw, mask=hw_ok, other=-1)[None, :]
    sg = tl.load(plane + 3 * HW, mask=hw_ok, other=0.0)[None, :]
    mean_part = tl.load(route_ptr + b * 2 * HW + hw, mask=hw_ok, other=0.0)[None, :]
    max_part = tl.load(route_ptr + b * 2 * HW + HW + hw, mask=hw_ok, other=0.0)[None, :]
    for c0 in range(0, c_chunk, BLOCK_C):
        c = pid_c * c_chunk + c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = c_ok[:, None] & hw_ok[None, :]
        offs = b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw
        bc = b * C + c
        gate = tl.load(chan_ptr + 3 * B * C + bc, mask=c_ok, other=0.0)[:, None]
        hw_max = tl.load(chan_ptr + B * C + bc, mask=c_ok, other=0.0)[:, None]
        row_tied = (tl.load(chan_ptr + 2 * B * C + bc, mask=c_ok, other=1.0) > 1.0)[:, None]
        row_argmax = tl.load(chan_idx_ptr + bc, mask=c_ok, other=-1)[:, None]
        # masked-off lanes move no memory: x comes in only where a tie must be resolved by value
        v = tl.load(x_ptr + offs, mask=ok & (row_tied | col_tied), other=0.0).to(tl.float32)
        is_col_max = tl.where(col_tied, v * gate == col_max, c[:, None] == col_argmax)
        is_row_max = tl.where(row_tied, v == hw_max, hw[None, :] == row_argmax)
        dx1 = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * sg + mean_part
        dx1 += tl.where(is_col_max, max_part, 0.0)
        dx = dx1 * gate + tl.load(coef_ptr + bc, mask=c_ok, other=0.0)[:, None]
        dx += tl.where(is_row_max, tl.load(coef_ptr + B * C + bc, mask=c_ok, other=0.0)[:, None], 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    # the first pixel block of image 0 of each channel chunk also writes the weight gradients of its channels:
    # sums over the batch of B3's factors, in a fixed order (no atomics: the same bits every run)
    if tl.program_id(0) == 0:
        if b == 0:
            _weight_grads(
                chan_ptr, dlogit_ptr, hid_ptr, dws_b_ptr, dw1_ptr, dw2_ptr, dws_ptr, B, C, HIDDEN, pid_c * c_chunk,
                c_chunk, w1_s0, w1_s1, w2_s0, w2_s1, ws_c, ws_h, ws_w, K, TAPS2, BLOCK_WC, BLOCK_H, BLOCK_B,
            )  # fmt: skip


@triton.jit
def _weight_grads(
    chan_ptr,
    dlogit_ptr,
    hid_ptr,
    dws_b_ptr,
    dw1_ptr,
    dw2_ptr,
    dws_ptr,
    B,
    C,
    HIDDEN,
    c_first,
    c_chunk,
    w1_s0,
    w1_s1,
    w2_s0,
    w2_s1,
    ws_c,
    ws_h,
    ws_w,
    K: tl.constexpr,
    TAPS2: tl.constexpr,
    BLOCK_WC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """dW1[h, c] = Σ_b dpre_avg[b, h]·avg[b, c] + dpre_max[b, h]·max[b, c] and dW2[c, h] = Σ_b dlogit[b, c]·
    hidden[b, h] for channels [c_first, c_first + c_chunk); the chunk starting at 0 also sums dW_spatial.
    BLOCK_H, BLOCK_B and BLOCK_WC are at least 16, tl.dot's smallest tile."""
    h = tl.arange(0, BLOCK_H)
    h_ok = h < HIDDEN
    rows = tl.arange(0, BLOCK_B)
    for c0 in range(0, c_chunk, BLOCK_WC):
        c = c_first + c0 + tl.arange(0, BLOCK_WC)
        c_ok = (c < C) & (c < c_first + c_chunk)
        acc1 = tl.zeros([BLOCK_H, BLOCK_WC], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_H, BLOCK_WC], dtype=tl.float32)
        # a block of images at once as fp32 matrix products (one round trip to memory, not one per image);
        # "ieee": no TF32 rounding, the sums are as exact as the reference's
        for b0 in range(0, B, BLOCK_B):
            b_ok = (b0 + rows) < B
            per_hidden = hid_ptr + (b0 + rows)[None, :] * HIDDEN + h[:, None]  # [BLOCK_H, BLOCK_B]: transposed
            hb_ok = h_ok[:, None] & b_ok[None, :]
            per_chan = (b0 + rows)[:, None] * C + c[None, :]  # [BLOCK_B, BLOCK_WC]
            bc_ok = b_ok[:, None] & c_ok[None, :]
            d_pre_avg = tl.load(per_hidden + B * HIDDEN, mask=hb_ok, other=0.0)
            d_pre_max = tl.load(per_hidden + 2 * B * HIDDEN, mask=hb_ok, other=0.0)
            avg = tl.load(chan_ptr + per_chan, mask=bc_ok, other=0.0)
            hw_max = tl.load(chan_ptr + B * C + per_chan, mask=bc_ok, other=0.0)
            acc1 = tl.dot(d_pre_avg, avg, acc1, input_precision="ieee")
            acc1 = tl.dot(d_pre_max, hw_max, acc1, input_precision="ieee")
            hidden = tl.load(per_hidden, mask=hb_ok, other=0.0)
            d_logit = tl.load(dlogit_ptr + per_chan, mask=bc_ok, other=0.0)
            acc2 = tl.dot(hidden, d_logit, acc2, input_precision="ieee")
        ok = h_ok[:, None] & c_ok[None, :]
        tl.store(dw1_ptr + h[:, None] * w1_s0 + c[None, :] * w1_s1, acc1.to(dw1_ptr.dtype.element_ty), mask=ok)
        tl.store(dw2_ptr + c[None, :] * w2_s0 + h[:, None] * w2_s1, acc2.to(dw2_ptr.dtype.element_ty), mask=ok)
    if c_first == 0:
        tap = tl.arange(0, TAPS2)
        tap_ok = tap < 2 * K * K
        acc = tl.zeros([TAPS2], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            ok = ((b0 + rows) < B)[:, None] & tap_ok[None, :]
            shares = tl.load(dws_b_ptr + (b0 + rows)[:, None] * 2 * K * K + tap[None, :], mask=ok, other=0.0)
            acc += tl.sum(shares, axis=0)
        k_in, t = tap // (K * K), tap % (K * K)
        dst = dws_ptr + k_in * ws_c + (t // K) * ws_h + (t % K) * ws_w
        tl.store(dst, acc.to(dws_ptr.dtype.element_ty), mask=tap_ok)
