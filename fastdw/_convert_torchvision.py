"""Fused twins of torchvision blocks for ``fastdw.convert`` (imported only when torchvision is)."""

from __future__ import annotations

import torch
from torchvision.models.shufflenetv2 import InvertedResidual

from fastdw.models.shufflenet_v2 import shuffle_unit_forward


class ShuffleInvertedResidual(InvertedResidual):
    """torchvision's ShuffleNetV2 unit with ``cat`` + ``channel_shuffle`` as one
    ``fastdw.ops.concat_shuffle``; same children and attributes (made by ``fastdw.convert``)."""

    fastdw_base = InvertedResidual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle_unit_forward(self, x)
