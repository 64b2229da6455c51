"""``ChannelShuffle``: ``nn.ChannelShuffle`` computed by fastdw's one-pass shuffle op."""

from __future__ import annotations

import torch
from torch import nn

from fastdw import ops


class ChannelShuffle(nn.Module):
    """``torch.nn.ChannelShuffle(groups)``: ``out[:, k * groups + i] = x[:, i * (C // groups) + k]``.

    No parameters. Autograd applies the inverse permutation.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int):
            raise TypeError(f"groups must be an int, got {type(groups).__name__}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups

    @classmethod
    def from_module(cls, module: nn.ChannelShuffle) -> ChannelShuffle:
        """The fused equivalent of a ``torch.nn.ChannelShuffle``."""
        if not isinstance(module, nn.ChannelShuffle):
            raise TypeError(f"module must be an nn.ChannelShuffle, got {type(module).__name__}")
        return cls(int(module.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
