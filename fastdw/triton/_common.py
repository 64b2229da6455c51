"""Shared pieces of the Triton kernels: launch parameters, accumulator dtypes, activations, the
[N, C, *] -> 4-D view used by every kernel, a column-sum kernel, and op registration.

Every kernel addresses its tensors through explicit strides, so one kernel serves NCHW and NHWC
(and strided views); the layout only changes the tile shape (``tile``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["act_bwd", "act_fwd", "acc_dtype", "as_4d", "column_sums", "define_op", "interpreting", "launch",
           "next_pow2", "program_tile", "tile", "tile_ptrs"]

ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "hardswish": 3, "silu": 4}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 (fp16 / bf16 / fp32 inputs) or fp64 (fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def tile(channels_last: bool, channels: int, positions: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a program's [positions x channels] tile, ~2048 elements at most.

    Channels-last: the channel axis is contiguous, so a program vectorises over up to 64 channels
    (coalesced 128-256 B rows) and takes enough positions to fill the tile. Contiguous NCHW:
    positions are contiguous, so a program vectorises over up to 512 positions of at least 4
    channels, more channels when planes are small (late-stage 7x7 maps, 1x1 SE-sized tensors), so
    a program still has work.
    """
    if channels_last:
        bc = min(next_pow2(channels), 64)
        bp = min(next_pow2(positions), max(1, 2048 // bc))
    else:
        bp = min(next_pow2(positions), 512)
        bc = min(next_pow2(channels), max(4, min(64, 2048 // bp)))
    return bp, bc


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *] as [N, C, H, W] sharing memory where possible: 3-D gets H = 1; 5-D and more
    fold the leading spatial dims (a view for contiguous and channels_last_3d data)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(2)
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through wrap_triton so torch.compile sees the kernel (a no-op wrapper when
    TRITON_INTERPRET=1); empty grids are skipped (Triton rejects them)."""
    if min(grid) == 0:
        return
    wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


def define_op(name: str):
    """``torch.library.triton_op("fastdw::<name>")``.

    Under TRITON_INTERPRET=1 the op is kept opaque in functional tracing (AOTDispatcher): the
    interpreter runs kernels eagerly on real CPU tensors and cannot run on the fake tensors that
    decomposing into the kernels would give it. On a GPU the op decomposes, so Inductor sees the
    kernels. Fake kernels and autograd are registered in fastdw.ops.
    """

    def wrap(fn):
        op = triton_op(f"fastdw::{name}", mutates_args=())(fn)
        if interpreting():
            from torch._subclasses.functional_tensor import FunctionalTensorMode

            op.register_torch_dispatch(FunctionalTensorMode,
                                       lambda mode, op_, types, args, kwargs: mode.__torch_dispatch__(
                                           op_, types, args, kwargs))
        return op

    return wrap


# ---- tiles -------------------------------------------------------------------------------------------


@triton.jit
def program_tile(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile in a (position tiles, channel blocks, N) grid: n (int64), the flattened
    positions and channels it owns, and their masks."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(2).to(tl.int64), offs_p, offs_c, offs_p < P, offs_c < C


@triton.jit
def tile_ptrs(ptr, n, chans, offs_p, W, sn, sc, sh, sw):
    """[positions, channels] pointers into image n of an [N, C, H, W] tensor addressed by its
    strides; position p is (p // W, p % W), channel indices are any [BLOCK_C] vector."""
    hw = (offs_p // W).to(tl.int64) * sh + (offs_p % W) * sw
    return ptr + n * sn + chans.to(tl.int64)[None, :] * sc + hw[:, None]


# ---- activations (PyTorch's conventions at the kinks) ---------------------------------------------


@triton.jit
def act_fwd(y, ACT: tl.constexpr):
    """0 none, 1 relu, 2 relu6, 3 hardswish, 4 silu."""
    if ACT == 1:
        y = tl.where(y > 0, y, 0.0)
    elif ACT == 2:
        y = tl.where(y > 0, tl.where(y < 6, y, 6.0), 0.0)
    elif ACT == 3:
        y = y * tl.where(y > -3, tl.where(y < 3, y + 3.0, 6.0), 0.0) / 6.0
    elif ACT == 4:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def act_bwd(go, y, ACT: tl.constexpr):
    """go * act'(y): relu y > 0; relu6 0 < y < 6; hardswish 0 below -3, y/3 + 1/2 up to 3, 1 above."""
    if ACT == 1:
        go = tl.where(y > 0, go, 0.0)
    elif ACT == 2:
        go = tl.where((y > 0) & (y < 6), go, 0.0)
    elif ACT == 3:
        go = tl.where(y < -3, 0.0, tl.where(y > 3, go, go * (y / 3.0 + 0.5)))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-y))
        go = go * s * (1.0 + y * (1.0 - s))
    return go


# ---- column sums of per-program partials ------------------------------------------------------------


@triton.jit
def _column_sums_kernel(p_ptr, out_ptr, T, W, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[w] = sum_t p[t, w]. A program owns BLOCK_W columns and walks all T rows in BLOCK_T
    chunks: the partials are tiny (rows = programs of the producing kernel), so one pass suffices and
    the order of summation is fixed (deterministic, unlike atomics)."""
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_W], dtype=p_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        m = (rows < T)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(p_ptr + rows[:, None].to(tl.int64) * W + cols[None, :], mask=m, other=0.0), 0)
    tl.store(out_ptr + cols, acc, mask=cmask)


def column_sums(partials: torch.Tensor) -> torch.Tensor:
    """Sum of a [T, W] (contiguous) partials tensor over its rows -> [W], same dtype."""
    t, w = partials.shape
    out = partials.new_zeros((w,))
    bw = min(next_pow2(w), 128)
    launch(_column_sums_kernel, (triton.cdiv(w, bw),) if t else (0,), partials, out, t, w,
           BLOCK_T=min(next_pow2(t), 32), BLOCK_W=bw)
    return out
