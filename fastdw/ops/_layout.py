"""Output memory-format rules of the se_scale and shuffle ops, for their fake kernels.

They must agree with csrc/cpu/layout.h: opcheck compares the fake kernels' strides with the real
ones, and torch.compile plans buffers from them.
"""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """Dense channels-last data: 4-D channels_last or 5-D channels_last_3d, not also contiguous.

    For 4-D tensors this is dwconv_bn_act's rule. C++: ``channels_last_layout()``.
    """
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def strides_like_channels_last(x: torch.Tensor) -> bool:
    """4-D strides ordered C, W, H, N from fastest to slowest, gaps allowed (c10's rule), so a
    channel slice of a channels_last tensor counts. C++: ``strides_like_channels_last()``."""
    if x.dim() != 4 or x.stride(1) == 0:
        return False
    m = 0
    for d in (1, 3, 2, 0):
        if x.shape[d] == 0 or x.stride(d) < m:
            return False
        if d == 0 and m == x.stride(1):
            return False
        m = x.stride(d) * (x.shape[d] if x.shape[d] > 1 else 1)
    return True


def empty(x: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    """An uninitialised tensor like x of ``shape``, channels-last (by x's rank) or contiguous."""
    out = x.new_empty(shape)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return out
