"""MobileNetV1 (Howard et al., 2017): a stack of depthwise separable convolutions.

The width multiplier alpha is ``width_mult``; the resolution multiplier beta is simply the input
size (the network is fully convolutional up to the global pool). At alpha = 1 with 1000 classes
it has 4.23 M parameters, as in Table 4 of the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdw.models import _layers
from fastdw.models._layers import Weights, conv_bn_act, dw_bn_act, init_weights, load_weights, make_divisible

# (output channels, stride) of the 13 depthwise separable layers (Table 1 of the paper)
LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 + BN + ReLU (fused, child ``0``), then pointwise 1x1 + BN + ReLU (child ``1``)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__(dw_bn_act(inp, 3, stride, activation="relu"),
                         conv_bn_act(inp, oup, 1, activation="relu"))


class MobileNetV1(nn.Module):
    """MobileNetV1: ``features`` (stem 3x3/2 conv, 13 depthwise separable layers), global average
    pool, ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")

        def ch(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        c = ch(32)
        layers: list[nn.Module] = [conv_bn_act(3, c, 3, 2, activation="relu")]
        for out, stride in LAYERS:
            layers.append(DepthwiseSeparable(c, ch(out), stride))
            c = ch(out)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(c, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(_layers.working_layout(self, x)).mean((2, 3))
        return self.classifier(x)


def mobilenet_v1(width_mult: float = 1.0, *, num_classes: int = 1000, dropout: float = 0.0,
                 weights: Weights = None) -> MobileNetV1:
    """MobileNetV1 with width multiplier ``width_mult`` (alpha: 1.0, 0.75, 0.5, 0.25 in the paper).

    ``weights``: a local checkpoint (path or state_dict) to load; nothing is downloaded.
    """
    return load_weights(MobileNetV1(num_classes, width_mult, dropout), weights)
