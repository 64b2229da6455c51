"""Reference channel shuffles: view, transpose, reshape, as torch.nn.functional.channel_shuffle."""

from __future__ import annotations

import torch


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``out[:, k * g + i] = x[:, i * (C / g) + k]``; keeps channels_last like F.channel_shuffle."""
    n, c = x.shape[0], x.shape[1]
    out = x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def concat_shuffle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``channel_shuffle(cat([a, b], 1), 2)``: out[:, 2k] = a[:, k], out[:, 2k + 1] = b[:, k]."""
    return torch.stack([a, b], dim=2).flatten(1, 2)
