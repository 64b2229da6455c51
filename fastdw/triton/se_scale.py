"""Triton kernels of ``fastdw::se_scale`` and its backward (ops ``fastdw::triton_se_scale`` and
``fastdw::triton_se_scale_backward``, same arguments and results as the C++ ops).

Forward, with p = mean of x over positions:  h = W1 p + b1,  z = W2 act(h) + b2,  out = x * gate(z).
Backward, given go:  dg = sum_pos go * x;  dz = dg gate'(z);  dW2 = dz^T act(h);  db2 = sum_n dz;
dh = (dz W2) act'(h);  dW1 = dh^T p;  db1 = sum_n dh;  dp = dh W1;  dx = go * gate(z) + dp / positions.

Kernels and their tiling (x is viewed as [N, C, H, W] through its strides, any rank >= 3, NCHW or
NHWC):
* ``_se_reduce_kernel``: a program per (BLOCK_C channels, n) walks all positions in
  [BLOCK_P, BLOCK_C] tiles and sums x (forward: the pooled mean) or go * x (backward: dg). One
  program owns whole channel sums, so there are no partials and no atomics; an SE input is a
  late-stage feature map (7x7 .. 56x56), so a program's loop is short.
* ``_se_gate_kernel``: a program per image n computes both FCs and the gate for all C channels
  (loops over C in BLOCK_C chunks with all S squeeze channels in one block) and writes gate(z) as a
  [N, C] fp32 vector. The FCs are *not* fused into the scale kernel: every scale program would
  recompute them, multiplying the W1/W2 reads by the number of spatial tiles, while the [N, C] gate
  costs nothing to write and read.
* ``_se_scale_kernel``: out = a * gate[n, c] (+ add[n, c] / positions): the forward scale (a = x)
  and the backward dx (a = go, add = dp), tiled like the depthwise kernels.
* ``_se_gate_backward_kernel``: a program per n recomputes h, z, gate from p and produces dz, dh,
  act(h), dp and gate (all [N, C] or [N, S] vectors).
* ``_outer_sum_kernel``: the FC weight gradients dW2 = dz^T act(h), dW1 = dh^T p as sums of outer
  products over the batch, a program per [BLOCK_I, BLOCK_J] block of the weight; bias gradients are
  column sums (``_common.column_sums``).
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
    as_4d,
    column_sums,
    define_op,
    launch,
    next_pow2,
    program_tile,
    strides,
    tile,
    tile_ptrs,
    tl_acc,
)

GATE_CODES = {"hardsigmoid": 0, "sigmoid": 1}


@triton.jit
def _gate_fwd(z, GATE: tl.constexpr):
    if GATE == 0:
        g = tl.where(z > -3, tl.where(z < 3, z + 3.0, 6.0), 0.0) / 6.0
    else:
        g = 1.0 / (1.0 + tl.exp(-z))
    return g


@triton.jit
def _gate_grad(z, g, GATE: tl.constexpr):
    """gate'(z) given g = gate(z): hardsigmoid 1/6 strictly inside (-3, 3), sigmoid g (1 - g)."""
    if GATE == 0:
        d = tl.where((z > -3) & (z < 3), 1.0, 0.0).to(z.dtype) / 6.0  # 1/6 in z's precision
    else:
        d = g * (1.0 - g)
    return d


@triton.jit
def _se_reduce_kernel(x_ptr, go_ptr, out_ptr, C, W, P, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                      PRODUCT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, c] = mean over positions of x, or (PRODUCT) sum over positions of go * x. (Scalars
    are divided by the int P in the accumulator's precision: a float argument would be fp32.)"""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1).to(tl.int64)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = (offs_p < P)[:, None] & mask_c[None, :]
        v = tl.load(tile_ptrs(x_ptr, n, offs_c, offs_p, W, sxn, sxc, sxh, sxw), mask=m, other=0.0).to(ACC)
        if PRODUCT:
            g = tl.load(tile_ptrs(go_ptr, n, offs_c, offs_p, W, sgn, sgc, sgh, sgw), mask=m, other=0.0)
            v *= g.to(ACC)
        acc += v
    total = tl.sum(acc, 0)
    if not PRODUCT:
        total = total / P
    tl.store(out_ptr + n * C + offs_c, total.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _fc1(p_ptr, w1_ptr, b1_ptr, n, C, S, HAS_B1: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
         BLOCK_C: tl.constexpr):
    """h = W1 p[n] + b1 ([BLOCK_S], zero beyond S), W1 a contiguous [S, C] matrix."""
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    h = tl.zeros([BLOCK_S], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        p = tl.load(p_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        w = tl.load(w1_ptr + offs_s[:, None] * C + offs_c[None, :], mask=mask_s[:, None] & mask_c[None, :],
                    other=0.0).to(ACC)
        h += tl.sum(w * p[None, :], 1)
    if HAS_B1:
        h += tl.load(b1_ptr + offs_s, mask=mask_s, other=0.0).to(ACC)
    return h


@triton.jit
def _fc2_chunk(a, w2_ptr, b2_ptr, offs_c, mask_c, S, HAS_B2: tl.constexpr, ACC: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """z[offs_c] = W2[offs_c, :] a + b2, and the [BLOCK_S, BLOCK_C] W2 tile (transposed) it used."""
    offs_s = tl.arange(0, BLOCK_S)
    w = tl.load(w2_ptr + offs_c[None, :] * S + offs_s[:, None], mask=(offs_s < S)[:, None] & mask_c[None, :],
                other=0.0).to(ACC)
    z = tl.sum(w * a[:, None], 0)
    if HAS_B2:
        z += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    return z, w


@triton.jit
def _se_gate_kernel(p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, C, S, HAS_B1: tl.constexpr,
                    HAS_B2: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """gate[n] = gate(W2 act(W1 p[n] + b1) + b2), a program per n."""
    n = tl.program_id(0).to(tl.int64)
    a = act_fwd(_fc1(p_ptr, w1_ptr, b1_ptr, n, C, S, HAS_B1, ACC, BLOCK_S, BLOCK_C), ACT)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z, _ = _fc2_chunk(a, w2_ptr, b2_ptr, offs_c, mask_c, S, HAS_B2, ACC, BLOCK_S)
        tl.store(gate_ptr + n * C + offs_c, _gate_fwd(z, GATE), mask=mask_c)


@triton.jit
def _se_gate_backward_kernel(p_ptr, dg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, dz_ptr, a_ptr, dh_ptr,
                             dp_ptr, C, S, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                             GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Per n: gate, dz = dg gate'(z), a = act(h), dh = (dz W2) act'(h), dp = dh W1."""
    n = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    h = _fc1(p_ptr, w1_ptr, b1_ptr, n, C, S, HAS_B1, ACC, BLOCK_S, BLOCK_C)
    a = act_fwd(h, ACT)
    da = tl.zeros([BLOCK_S], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z, w2t = _fc2_chunk(a, w2_ptr, b2_ptr, offs_c, mask_c, S, HAS_B2, ACC, BLOCK_S)
        g = _gate_fwd(z, GATE)
        dz = tl.load(dg_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC) * _gate_grad(z, g, GATE)
        dz = tl.where(mask_c, dz, 0.0)
        tl.store(gate_ptr + n * C + offs_c, g, mask=mask_c)
        tl.store(dz_ptr + n * C + offs_c, dz, mask=mask_c)
        da += tl.sum(w2t * dz[None, :], 1)
    dh = act_bwd(da, h, ACT)
    tl.store(a_ptr + n * S + offs_s, a, mask=mask_s)
    tl.store(dh_ptr + n * S + offs_s, dh, mask=mask_s)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w = tl.load(w1_ptr + offs_s[:, None] * C + offs_c[None, :], mask=mask_s[:, None] & mask_c[None, :],
                    other=0.0).to(ACC)
        tl.store(dp_ptr + n * C + offs_c, tl.sum(w * dh[:, None], 0), mask=mask_c)


@triton.jit
def _outer_sum_kernel(u_ptr, v_ptr, out_ptr, N, ROWS, COLS, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[i, j] = sum_n u[n, i] v[n, j] (u [N, ROWS], v [N, COLS] contiguous), in their dtype."""
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mi = offs_i < ROWS
    mj = offs_j < COLS
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=out_ptr.dtype.element_ty)
    for n in range(0, N):
        u = tl.load(u_ptr + n * ROWS + offs_i, mask=mi, other=0.0)
        v = tl.load(v_ptr + n * COLS + offs_j, mask=mj, other=0.0)
        acc += u[:, None] * v[None, :]
    tl.store(out_ptr + offs_i[:, None] * COLS + offs_j[None, :], acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _se_scale_kernel(a_ptr, gate_ptr, add_ptr, out_ptr, C, W, P, san, sac, sah, saw, son, soc, soh, sow,
                     ADD: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = a * gate[n, c] (+ add[n, c] / P): forward scale and backward dx."""
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    m = mask_p[:, None] & mask_c[None, :]
    v = tl.load(tile_ptrs(a_ptr, n, offs_c, offs_p, W, san, sac, sah, saw), mask=m, other=0.0).to(ACC)
    v = v * tl.load(gate_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    if ADD:
        v += (tl.load(add_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC) / P)[None, :]
    o = tile_ptrs(out_ptr, n, offs_c, offs_p, W, son, soc, soh, sow)
    tl.store(o, v.to(out_ptr.dtype.element_ty), mask=m)


# ---- host side ----------------------------------------------------------------------------------------


def _fc_blocks(s: int, c: int) -> dict:
    bs = next_pow2(s)
    return dict(BLOCK_S=bs, BLOCK_C=max(16, min(64, next_pow2(c), 4096 // bs)))


def _launch_scale(a, gate, out, add=None):
    a4, o4 = as_4d(a), as_4d(out)
    n, c, _, w = o4.shape
    p = o4.shape[2] * w
    bp, bc = tile(_layout.is_channels_last(out), c, p)
    launch(_se_scale_kernel, (triton.cdiv(p, bp), triton.cdiv(c, bc), n), a4, gate,
           gate if add is None else add, o4, c, w, p, *strides(a4), *strides(o4), ADD=add is not None,
           ACC=tl_acc(out.dtype), BLOCK_P=bp, BLOCK_C=bc)


def _reduce(x, go, out):
    x4 = as_4d(x)
    n, c, _, w = x4.shape
    p = x4.shape[2] * w
    bp, bc = tile(_layout.is_channels_last(x), c, p)
    g4 = as_4d(go) if go is not None else x4
    launch(_se_reduce_kernel, (triton.cdiv(c, bc), n), x4, g4, out, c, w, p, *strides(x4), *strides(g4),
           PRODUCT=go is not None, ACC=tl_acc(x.dtype), BLOCK_P=bp, BLOCK_C=bc)


@define_op("triton_se_scale")
def triton_se_scale(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None, activation: str, gate: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    s = fc1_weight.shape[0]
    out = _layout.empty(x, x.shape, _layout.is_channels_last(x))
    pooled = x.new_empty((n, c))
    _reduce(x, None, pooled)
    g = torch.empty((n, c), dtype=acc_dtype(x.dtype), device=x.device)
    w1, w2 = fc1_weight.reshape(s, c).contiguous(), fc2_weight.reshape(c, s).contiguous()
    launch(_se_gate_kernel, (n,), pooled, w1, fc1_bias if fc1_bias is not None else w1, w2,
           fc2_bias if fc2_bias is not None else w2, g, c, s, HAS_B1=fc1_bias is not None,
           HAS_B2=fc2_bias is not None, ACT=ACT_CODES[activation], GATE=GATE_CODES[gate], ACC=tl_acc(x.dtype),
           **_fc_blocks(s, c))
    _launch_scale(x, g, out)
    return out, pooled


@define_op("triton_se_scale_backward")
def triton_se_scale_backward(
    grad_out: torch.Tensor, x: torch.Tensor, pooled: torch.Tensor, fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, activation: str,
    gate: str, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    s = fc1_weight.shape[0]
    acc = acc_dtype(x.dtype)
    go = grad_out.to(x.dtype)
    dg = torch.empty((n, c), dtype=acc, device=x.device)
    _reduce(x, go, dg)
    g, dz, dp = torch.empty_like(dg), torch.empty_like(dg), torch.empty_like(dg)
    a, dh = torch.empty((n, s), dtype=acc, device=x.device), torch.empty((n, s), dtype=acc, device=x.device)
    w1, w2 = fc1_weight.reshape(s, c).contiguous(), fc2_weight.reshape(c, s).contiguous()
    launch(_se_gate_backward_kernel, (n,), pooled, dg, w1, fc1_bias if fc1_bias is not None else w1, w2,
           fc2_bias if fc2_bias is not None else w2, g, dz, a, dh, dp, c, s, HAS_B1=fc1_bias is not None,
           HAS_B2=fc2_bias is not None, ACT=ACT_CODES[activation], GATE=GATE_CODES[gate], ACC=tl_acc(x.dtype),
           **_fc_blocks(s, c))
    gx = x.new_empty((0,))
    if output_mask[0]:
        gx = _layout.empty(x, x.shape, _layout.is_channels_last(x))
        _launch_scale(go, g, gx, dp)

    def outer(u, v, like):  # sum_n u[n]^T v[n], shaped and typed like the weight
        out = torch.empty((u.shape[1], v.shape[1]), dtype=acc, device=x.device)
        bi, bj = min(next_pow2(u.shape[1]), 32), min(next_pow2(v.shape[1]), 64)
        launch(_outer_sum_kernel, (triton.cdiv(u.shape[1], bi), triton.cdiv(v.shape[1], bj)), u, v, out, n,
               u.shape[1], v.shape[1], BLOCK_I=bi, BLOCK_J=bj)
        return out.reshape(like.shape).to(like.dtype)

    def bias(flag, t, rows):
        return column_sums(rows).to(t.dtype) if (flag and t is not None) else x.new_empty((0,))

    return (gx, outer(dh, pooled.to(acc), fc1_weight) if output_mask[1] else x.new_empty((0,)),
            bias(output_mask[2], fc1_bias, dh),
            outer(dz, a, fc2_weight) if output_mask[3] else x.new_empty((0,)),
            bias(output_mask[4], fc2_bias, dz))
