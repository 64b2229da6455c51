"""Triton kernels of ``fastdw::channel_shuffle``, ``fastdw::concat_shuffle`` and
``fastdw::concat_shuffle_backward`` (ops ``fastdw::triton_<name>``, same arguments and results).

Both are index-mapped copies, one read and one write per element, tiled like the depthwise kernels:
a program per (BLOCK_P positions, BLOCK_C channels, n) of an [N, C, H, W] view addressed by
strides (any rank >= 3 folds its positions into H, W; strided inputs such as channel slices are read
in place). In NCHW the vectors run along a channel's positions, so loads and stores are both
contiguous whatever the permutation; in NHWC they run along channels, where the permuted side is a
gather (shuffle) or an interleave with stride 2 (concat_shuffle).

* ``_shuffle_kernel``: out[:, c] = x[:, (c % g) * (C / g) + c / g] (torch's channel_shuffle). The
  backward of a shuffle with g groups is the shuffle with C / g groups: the same kernel.
* ``_interleave_kernel``: out[:, 2k] = a[:, k], out[:, 2k + 1] = b[:, k] (concat then shuffle by 2,
  without the concatenated tensor); with SPLIT the reverse, the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdw.ops import _layout
from fastdw.triton._common import as_4d, define_op, launch, program_tile, strides, tile, tile_ptrs


@triton.jit
def _shuffle_kernel(x_ptr, out_ptr, C, W, P, GROUPS, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, offs_p, offs_c, mask_p, mask_c = program_tile(P, C, BLOCK_P, BLOCK_C)
    m = mask_p[:, None] & mask_c[None, :]
    src = (offs_c % GROUPS) * (C // GROUPS) + offs_c // GROUPS
    v = tl.load(tile_ptrs(x_ptr, n, src, offs_p, W, sxn, sxc, sxh, sxw), mask=m)
    tl.store(tile_ptrs(out_ptr, n, offs_c, offs_p, W, son, soc, soh, sow), v, mask=m)


@triton.jit
def _interleave_kernel(a_ptr, b_ptr, j_ptr, C, W, P, san, sac, sah, saw, sbn, sbc, sbh, sbw,
                       sjn, sjc, sjh, sjw, SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Joined j (2C channels) <-> halves a, b (C channels each): j[2k] = a[k], j[2k + 1] = b[k]."""
    n, offs_p, k, mask_p, mask_k = program_tile(P, C, BLOCK_P, BLOCK_C)
    m = mask_p[:, None] & mask_k[None, :]
    pa = tile_ptrs(a_ptr, n, k, offs_p, W, san, sac, sah, saw)
    pb = tile_ptrs(b_ptr, n, k, offs_p, W, sbn, sbc, sbh, sbw)
    pj = tile_ptrs(j_ptr, n, 2 * k, offs_p, W, sjn, sjc, sjh, sjw)
    if SPLIT:
        tl.store(pa, tl.load(pj, mask=m), mask=m)
        tl.store(pb, tl.load(pj + sjc, mask=m), mask=m)
    else:
        tl.store(pj, tl.load(pa, mask=m), mask=m)
        tl.store(pj + sjc, tl.load(pb, mask=m), mask=m)


def _grid(t4: torch.Tensor, channels: int, channels_last: bool):
    n, _, h, w = t4.shape
    bp, bc = tile(channels_last, channels, h * w)
    return (triton.cdiv(h * w, bp), triton.cdiv(channels, bc), n), dict(BLOCK_P=bp, BLOCK_C=bc)


@define_op("triton_channel_shuffle")
def triton_channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    cl = _layout.is_channels_last(x)
    out = _layout.empty(x, x.shape, cl)
    x4, o4 = as_4d(x), as_4d(out)
    grid, blocks = _grid(o4, x.shape[1], cl)
    launch(_shuffle_kernel, grid, x4, o4, x.shape[1], o4.shape[3], o4.shape[2] * o4.shape[3], groups,
           *strides(x4), *strides(o4), **blocks)
    return out


@define_op("triton_concat_shuffle")
def triton_concat_shuffle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cl = _layout.strides_like_channels_last(a) or _layout.strides_like_channels_last(b)
    out = _layout.empty(a, (a.shape[0], 2 * a.shape[1], *a.shape[2:]), cl)
    a4, b4, o4 = as_4d(a), as_4d(b), as_4d(out)
    grid, blocks = _grid(a4, a.shape[1], cl)
    launch(_interleave_kernel, grid, a4, b4, o4, a.shape[1], a4.shape[3], a4.shape[2] * a4.shape[3],
           *strides(a4), *strides(b4), *strides(o4), SPLIT=False, **blocks)
    return out


@define_op("triton_concat_shuffle_backward")
def triton_concat_shuffle_backward(grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (grad_out.shape[0], grad_out.shape[1] // 2, *grad_out.shape[2:])
    cl = grad_out.dim() == 4 and _layout.is_channels_last(grad_out)
    ga, gb = _layout.empty(grad_out, shape, cl), _layout.empty(grad_out, shape, cl)
    g4, a4, b4 = as_4d(grad_out), as_4d(ga), as_4d(gb)
    grid, blocks = _grid(a4, shape[1], cl)
    launch(_interleave_kernel, grid, a4, b4, g4, shape[1], a4.shape[3], a4.shape[2] * a4.shape[3],
           *strides(a4), *strides(b4), *strides(g4), SPLIT=True, **blocks)
    return ga, gb
