"""Triton kernels of ``fastdw::dwconv_bn_act`` and its backward (ops ``fastdw::triton_dwconv_bn_act``
and ``fastdw::triton_dwconv_bn_act_backward``, same arguments and results as the C++ ops).

Tiling (all kernels): a program owns one image n, a block of BLOCK_C channels and BLOCK_P
consecutive (flattened) output pixels -- grid (pixel tiles, channel blocks, N). NHWC vectorises over
channels, NCHW over pixels (``_common.tile``); tensors are addressed by strides, so one kernel
serves both formats and the output keeps the input's. Every tap is an unrolled masked load of the
[BLOCK_P, BLOCK_C] input window (the halo is shared between taps through L1/L2, Triton has no
explicit shared memory), multiplied by the tap's per-channel weight vector and accumulated in fp32
(fp64 for fp64 inputs). ``shuffle_groups`` = g reads channel c from its shuffled source
``(c % g) * (C / g) + c / g``, so the shuffled input is never materialised, in either format.

Forward, eval: BN is folded on the host into per-channel scale/shift ([C] vectors) and the kernel
applies scale, shift and the activation before its single store.
Forward, training: pass 1 (same kernel, STATS) reduces each program's tile to a per-channel sum and
centred sum of squares (tile-local mean: no catastrophic cancellation in fp32), written to
[N * tiles, C] partials; ``_bn_finalize_kernel`` merges them (Chan's parallel formula) into the
batch mean / biased variance, folded on the host into scale/shift; pass 2 normalises and activates. Pass 2
recomputes the conv when the output has at least half the input's pixels (stride 1: recomputing
costs one more read of x; storing z would cost a write and a read of an x-sized tensor), and
otherwise (stride 2) stores z = conv + bias in pass 1 and rescales it in place with the light
``_scale_shift_act_kernel``.
Backward: ``_dw_backward_kernel`` recomputes z from x (nothing but x and [C] vectors is saved),
applies the BN and activation derivatives, reduces the BN-parameter sums (sum gy, sum gy*xhat) as
per-program partials, writes gz (gradient at the conv output) and, in the same pass, the
weight / bias gradient partials (each tap's input window is re-read from cache, gz is computed
once), so x and grad_out are read once from memory. Training BN needs the sums before gz, so there
the kernel runs twice (sums, then gz). ``_dw_input_grad_kernel`` is the transposed depthwise conv
of gz with the same tiling over input pixels (it gathers the taps that hit each input pixel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdw.ops import _layout
from fastdw.triton._common import (
    ACT_CODES,
    acc_dtype,
    act_bwd,
    act_fwd,
    column_sums,
    define_op,
    launch,
    program_tile,
    strides,
    tile,
    tile_ptrs,
    tl_acc,
)


@triton.jit
def _shuffle_source(offs_c, C, GROUPS):
    """Channel c of channel_shuffle(x, GROUPS) is channel (c % GROUPS) * (C / GROUPS) + c / GROUPS of x."""
    return (offs_c % GROUPS) * (C // GROUPS) + offs_c // GROUPS


@triton.jit
def _tap(x_base, oh, ow, kh, kw, mask_p, mask_c, H, W, sxh, sxw, SH, SW, PH, PW, DH, DW):
    """The [BLOCK_P, BLOCK_C] input window of tap (kh, kw) for output pixels (oh, ow); zero padding."""
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_base[None, :] + (ih.to(tl.int64) * sxh + iw * sxw)[:, None],
                   mask=ok[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, offs_p, offs_c, mask_p, mask_c, C, H, W, Wo, sxn, sxc, sxh, sxw,
               SH, SW, PH, PW, DH, DW, GROUPS, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """conv(x, w) (no bias) on a [BLOCK_P, BLOCK_C] tile of output pixels x channels, in ACC."""
    oh = offs_p // Wo
    ow = offs_p % Wo
    x_base = x_ptr + n * sxn + _shuffle_source(offs_c, C, GROUPS).to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            wv = tl.load(w_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(ACC)
            xv = _tap(x_base, oh, ow, kh, kw, mask_p, mask_c, H, W, sxh, sxw, SH, SW, PH, PW, DH, DW)
            acc += xv.to(ACC) * wv[None, :]
    return acc


@triton.jit
def _dw_forward_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr, psum_ptr, pm2_ptr,
                       C, H, W, Wo, P, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                       SH, SW, PH, PW, DH, DW, GROUPS,
                       KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                       STORE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(conv(x) * scale[c] + shift[c]); STATS: per-program sum and centred sum of squares of
    y (scale = 1, shift = conv bias, act none); STORE: write y."""
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    z = _conv_tile(x_ptr, w_ptr, n, offs_p, offs_c, mask_p, mask_c, C, H, W, Wo, sxn, sxc, sxh, sxw,
                   SH, SW, PH, PW, DH, DW, GROUPS, KH, KW, ACC, BLOCK_P, BLOCK_C)
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    y = z * sc[None, :] + sh[None, :]
    m2d = mask_p[:, None] & mask_c[None, :]
    if STATS:
        cnt = tl.sum(mask_p.to(ACC), 0)
        s = tl.sum(tl.where(m2d, y, 0.0), 0)
        d = tl.where(m2d, y - (s / cnt)[None, :], 0.0)
        row = (n * tl.num_programs(0) + tl.program_id(0)) * C
        tl.store(psum_ptr + row + offs_c, s, mask=mask_c)
        tl.store(pm2_ptr + row + offs_c, tl.sum(d * d, 0), mask=mask_c)
    if STORE:
        o = tile_ptrs(out_ptr, n, offs_c, offs_p, Wo, son, soc, soh, sow)
        tl.store(o, act_fwd(y, ACT).to(out_ptr.dtype.element_ty), mask=m2d)


@triton.jit
def _bn_finalize_kernel(psum_ptr, pm2_ptr, mean_ptr, var_ptr, C, T, TILES, P, ACC: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the T = N * TILES tile partials into the batch mean and biased variance (Chan et al.:
    M2 = sum_t M2_t + n_t (mean_t - mean)^2, two passes over the tiny partials). A program per
    BLOCK_C channels; tile t holds min(BLOCK_P, P - (t % TILES) * BLOCK_P) pixels."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        m = (rows < T)[:, None] & mask_c[None, :]
        idx = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        total += tl.sum(tl.load(psum_ptr + idx, mask=m, other=0.0), 0)
    count = (T // TILES) * P
    mean = total / count
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        m = (rows < T)[:, None] & mask_c[None, :]
        idx = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        cnt = tl.minimum(P - (rows % TILES) * BLOCK_P, BLOCK_P).to(ACC)[:, None]
        d = tl.load(psum_ptr + idx, mask=m, other=0.0) / cnt - mean[None, :]
        m2 += tl.sum(tl.where(m, tl.load(pm2_ptr + idx, mask=m, other=0.0) + cnt * d * d, 0.0), 0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, m2 / count, mask=mask_c)


@triton.jit
def _scale_shift_act_kernel(y_ptr, scale_ptr, shift_ptr, C, Wo, P, sn, sc, sh, sw, ACT: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place: y = act(y * scale[c] + shift[c]) -- training pass 2 over a stored conv output."""
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    m = mask_p[:, None] & mask_c[None, :]
    ptr = tile_ptrs(y_ptr, n, offs_c, offs_p, Wo, sn, sc, sh, sw)
    a = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    b = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    y = act_fwd(tl.load(ptr, mask=m, other=0.0).to(ACC) * a[None, :] + b[None, :], ACT)
    tl.store(ptr, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dw_backward_kernel(x_ptr, w_ptr, go_ptr, gz_ptr, pstat_ptr, pw_ptr, a1_ptr, a0_ptr, g_ptr, beta_ptr,
                        k1_ptr, k2_ptr, k3_ptr, C, H, W, Wo, P, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                        szn, szc, szh, szw, SH, SW, PH, PW, DH, DW, GROUPS,
                        KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                        GZ: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Recompute z = conv(x); xhat = z * a1 + a0; gy = grad_out * act'(xhat * g + beta).
    STATS: partial sums of gy and gy * xhat -> pstat[row, 0:C], [C:2C].
    GZ: gz = k1 * gy + k2 * xhat + k3 -> gz, and partials of the conv weight gradient
    (sum over the tile of x_tap * gz, per tap) and bias gradient (sum gz) -> pw[row, c*KH*KW + tap],
    pw[row, C*KH*KW + c]."""
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    m2d = mask_p[:, None] & mask_c[None, :]
    z = _conv_tile(x_ptr, w_ptr, n, offs_p, offs_c, mask_p, mask_c, C, H, W, Wo, sxn, sxc, sxh, sxw,
                   SH, SW, PH, PW, DH, DW, GROUPS, KH, KW, ACC, BLOCK_P, BLOCK_C)
    a1 = tl.load(a1_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    a0 = tl.load(a0_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    xhat = z * a1[None, :] + a0[None, :]
    go = tl.load(tile_ptrs(go_ptr, n, offs_c, offs_p, Wo, sgn, sgc, sgh, sgw), mask=m2d, other=0.0).to(ACC)
    gy = tl.where(m2d, act_bwd(go, xhat * g[None, :] + beta[None, :], ACT), 0.0)
    row = n * tl.num_programs(0) + tl.program_id(0)
    if STATS:
        tl.store(pstat_ptr + row * 2 * C + offs_c, tl.sum(gy, 0), mask=mask_c)
        tl.store(pstat_ptr + row * 2 * C + C + offs_c, tl.sum(gy * xhat, 0), mask=mask_c)
    if GZ:
        k1 = tl.load(k1_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        k2 = tl.load(k2_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        k3 = tl.load(k3_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        gz = tl.where(m2d, k1[None, :] * gy + k2[None, :] * xhat + k3[None, :], 0.0)
        tl.store(tile_ptrs(gz_ptr, n, offs_c, offs_p, Wo, szn, szc, szh, szw), gz.to(gz_ptr.dtype.element_ty),
                 mask=m2d)
        oh = offs_p // Wo
        ow = offs_p % Wo
        x_base = x_ptr + n * sxn + _shuffle_source(offs_c, C, GROUPS).to(tl.int64) * sxc
        wrow = pw_ptr + row * (C * (KH * KW + 1))
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                xv = _tap(x_base, oh, ow, kh, kw, mask_p, mask_c, H, W, sxh, sxw, SH, SW, PH, PW, DH, DW)
                tl.store(wrow + offs_c * (KH * KW) + (kh * KW + kw), tl.sum(xv.to(ACC) * gz, 0), mask=mask_c)
        tl.store(wrow + C * (KH * KW) + offs_c, tl.sum(gz, 0), mask=mask_c)


@triton.jit
def _dw_input_grad_kernel(gz_ptr, w_ptr, gx_ptr, C, W, Ho, Wo, P, szn, szc, szh, szw, sxn, sxc, sxh, sxw,
                          SH, SW, PH, PW, DH, DW, GROUPS, KH: tl.constexpr, KW: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx = transposed depthwise conv of gz over a [BLOCK_P input pixels, BLOCK_C] tile: input pixel
    (ih, iw) gathers tap (kh, kw) from output (oh, ow) = ((ih + PH - kh DH) / SH, ...) where that
    division is exact and in range. Written to the shuffle source channel (a permutation: no
    conflicts)."""
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    ih = offs_p // W
    iw = offs_p % W
    gz_base = gz_ptr + n * szn + offs_c.to(tl.int64) * szc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for kh in tl.static_range(KH):
        th = ih + PH - kh * DH
        oh = th // SH
        row_ok = mask_p & (th >= 0) & (th % SH == 0) & (oh < Ho)
        for kw in tl.static_range(KW):
            tw = iw + PW - kw * DW
            ow = tw // SW
            ok = row_ok & (tw >= 0) & (tw % SW == 0) & (ow < Wo)
            wv = tl.load(w_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(ACC)
            gv = tl.load(gz_base[None, :] + (oh.to(tl.int64) * szh + ow * szw)[:, None],
                         mask=ok[:, None] & mask_c[None, :], other=0.0).to(ACC)
            acc += gv * wv[None, :]
    o = tile_ptrs(gx_ptr, n, _shuffle_source(offs_c, C, GROUPS), offs_p, W, sxn, sxc, sxh, sxw)
    tl.store(o, acc.to(gx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# ---- host side ----------------------------------------------------------------------------------------


def _geometry(x, weight, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _conv_args(stride, padding, dilation, groups):
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
                GROUPS=groups)


def _vec(t, c, fill, dtype, device):
    return t.to(dtype) if t is not None else torch.full((c,), fill, dtype=dtype, device=device)


def _fold(mean, var, bias, bn_weight, bn_bias, eps, c, acc, device):
    """BN folded into the conv's epilogue, [C] vectors in the accumulator dtype:
    y = z * scale + shift, scale = g / sqrt(var + eps), shift = (bias - mean) * scale + beta (no
    BN: scale 1, shift bias). Host-side tensor ops on [C] vectors, so eps keeps its fp64 value."""
    shift = _vec(bias, c, 0.0, acc, device)
    if mean is None:
        return torch.ones((c,), dtype=acc, device=device), shift
    scale = torch.rsqrt(var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = (shift - mean.to(acc)) * scale
    return scale, shift + bn_bias.to(acc) if bn_bias is not None else shift


@define_op("triton_dwconv_bn_act")
def triton_dwconv_bn_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None, training: bool,
    eps: float, stride: list[int], padding: list[int], dilation: list[int], activation: str,
    shuffle_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho, wo = _geometry(x, weight, stride, padding, dilation)
    cl = _layout.is_channels_last(x)
    out = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    save_mean = x.new_zeros((c if training else 0,))  # training, N = 0: zeros (the wrapper skips them)
    save_var = x.new_zeros((c if training else 0,))
    acc = acc_dtype(x.dtype)
    wc = weight.reshape(c, kh * kw).contiguous()
    bp, bc = tile(cl, c, ho * wo)
    tiles = triton.cdiv(ho * wo, bp)
    grid = (tiles, triton.cdiv(c, bc), n)
    common = dict(KH=kh, KW=kw, ACC=tl_acc(x.dtype), BLOCK_P=bp, BLOCK_C=bc,
                  **_conv_args(stride, padding, dilation, shuffle_groups))
    geo = (c, h, w, wo, ho * wo, *strides(x), *strides(out))
    if not training:
        scale, shift = _fold(mean, var, bias, bn_weight, bn_bias, eps, c, acc, x.device)
        launch(_dw_forward_kernel, grid, x, wc, scale, shift, out, scale, scale, *geo,
               ACT=ACT_CODES[activation], STATS=False, STORE=True, **common)
        return out, save_mean, save_var
    if n * ho * wo == 0:
        return out, save_mean, save_var
    store_z = 2 * ho * wo < h * w  # see the module docstring
    psum = torch.empty((n * tiles, c), dtype=acc, device=x.device)
    pm2 = torch.empty_like(psum)
    ones = torch.ones((c,), dtype=acc, device=x.device)
    launch(_dw_forward_kernel, grid, x, wc, ones, _vec(bias, c, 0.0, acc, x.device), out, psum, pm2, *geo,
           ACT=0, STATS=True, STORE=store_z, **common)
    batch_mean, batch_var = torch.empty_like(ones), torch.empty_like(ones)
    fc = min(triton.next_power_of_2(c), 64)
    launch(_bn_finalize_kernel, (triton.cdiv(c, fc),), psum, pm2, batch_mean, batch_var, c, n * tiles, tiles,
           ho * wo, ACC=tl_acc(x.dtype), BLOCK_P=bp, BLOCK_T=min(triton.next_power_of_2(n * tiles), 32),
           BLOCK_C=fc)
    # The stored z already holds the conv bias; the recomputed conv does not.
    scale, shift = _fold(batch_mean, batch_var, None if store_z else bias, bn_weight, bn_bias, eps, c, acc,
                         x.device)
    if store_z:
        launch(_scale_shift_act_kernel, grid, out, scale, shift, c, wo, ho * wo, *strides(out),
               ACT=ACT_CODES[activation], ACC=tl_acc(x.dtype), BLOCK_P=bp, BLOCK_C=bc)
    else:
        launch(_dw_forward_kernel, grid, x, wc, scale, shift, out, scale, scale, *geo,
               ACT=ACT_CODES[activation], STATS=False, STORE=True, **common)
    return out, batch_mean.to(x.dtype), batch_var.to(x.dtype)


@define_op("triton_dwconv_bn_act_backward")
def triton_dwconv_bn_act_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None, mean: torch.Tensor | None,
    var: torch.Tensor | None, training: bool, eps: float, stride: list[int], padding: list[int],
    dilation: list[int], activation: str, output_mask: list[bool], shuffle_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho, wo = _geometry(x, weight, stride, padding, dilation)
    cl = _layout.is_channels_last(x)
    fmt = torch.channels_last if cl else torch.contiguous_format
    acc = acc_dtype(x.dtype)
    dev = x.device
    go = grad_out.to(x.dtype)
    normalises = training or (mean is not None and mean.numel() > 0)
    # xhat = z * a1 + a0 (z the bias-free conv output); gz = k1 * gy + k2 * xhat + k3.
    a1, a0 = _fold(mean if normalises else None, var, bias, None, None, eps, c, acc, dev)
    g = _vec(bn_weight, c, 1.0, acc, dev)
    beta = _vec(bn_bias, c, 0.0, acc, dev)
    k1 = g * a1
    zeros = torch.zeros((c,), dtype=acc, device=dev)
    need_gz = output_mask[0] or output_mask[1] or output_mask[2]
    bp, bc = tile(cl, c, ho * wo)
    tiles = triton.cdiv(ho * wo, bp)
    grid = (tiles, triton.cdiv(c, bc), n)
    wc = weight.reshape(c, kh * kw).contiguous()
    gz = torch.empty((n, c, ho, wo), dtype=x.dtype, device=dev, memory_format=fmt) if need_gz else go
    pstat = torch.zeros((n * tiles, 2 * c), dtype=acc, device=dev)
    pw = torch.zeros((n * tiles, c * (kh * kw + 1)), dtype=acc, device=dev)
    common = dict(KH=kh, KW=kw, ACT=ACT_CODES[activation], ACC=tl_acc(x.dtype), BLOCK_P=bp, BLOCK_C=bc,
                  **_conv_args(stride, padding, dilation, shuffle_groups))
    args = (c, h, w, wo, ho * wo, *strides(x), *strides(go), *strides(gz))
    if training:
        launch(_dw_backward_kernel, grid, x, wc, go, gz, pstat, pw, a1, a0, g, beta, k1, zeros, zeros, *args,
               STATS=True, GZ=False, **common)
        sums = column_sums(pstat)
        count = max(n * ho * wo, 1)
        k2, k3 = -k1 * sums[c:] / count, -k1 * sums[:c] / count
        if need_gz:
            launch(_dw_backward_kernel, grid, x, wc, go, gz, pstat, pw, a1, a0, g, beta, k1, k2, k3, *args,
                   STATS=False, GZ=True, **common)
    else:
        launch(_dw_backward_kernel, grid, x, wc, go, gz, pstat, pw, a1, a0, g, beta, k1, zeros, zeros, *args,
               STATS=True, GZ=need_gz, **common)
        sums = column_sums(pstat)
    gx = x.new_empty((0,))
    if output_mask[0]:
        gx = torch.empty((n, c, h, w), dtype=x.dtype, device=dev, memory_format=fmt)
        bpi, bci = tile(cl, c, h * w)
        launch(_dw_input_grad_kernel, (triton.cdiv(h * w, bpi), triton.cdiv(c, bci), n), gz, wc, gx, c, w, ho,
               wo, h * w, *strides(gz), *strides(gx), KH=kh, KW=kw, ACC=tl_acc(x.dtype), BLOCK_P=bpi,
               BLOCK_C=bci, **_conv_args(stride, padding, dilation, shuffle_groups))
    wsums = column_sums(pw) if (output_mask[1] or output_mask[2]) else None

    def result(flag, t, values, shape):  # a fresh tensor (outputs may not alias each other)
        return values.reshape(shape).to(t.dtype, copy=True) if (flag and t is not None) else x.new_empty((0,))

    taps = c * kh * kw
    return (gx, result(output_mask[1], weight, wsums[:taps] if wsums is not None else None, weight.shape),
            result(output_mask[2], bias, wsums[taps:] if wsums is not None else None, (c,)),
            result(output_mask[3], bn_weight, sums[c:], (c,)),
            result(output_mask[4], bn_bias, sums[:c], (c,)))
