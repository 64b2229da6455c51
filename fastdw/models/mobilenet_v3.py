"""MobileNetV3 Large and Small (Howard et al., 2019), the module tree and ``state_dict`` of torchvision's.

Hardswish / ReLU activations, 3x3 and 5x5 depthwise convs fused with their BatchNorm and activation,
Squeeze-and-Excitation with a hardsigmoid gate as one fused op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastdw.models import _layers
from fastdw.models._layers import Weights, conv_bn_act, dw_bn_act, init_weights, load_weights, make_divisible
from fastdw.nn import SqueezeExcite

BN = {"eps": 0.001, "momentum": 0.01}


class BlockConfig(NamedTuple):
    """One row of Tables 1 and 2 of the paper (channels before width scaling)."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str  # "relu" or "hardswish"
    stride: int
    dilation: int = 1

    def scaled(self, width_mult: float) -> BlockConfig:
        def ch(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        return self._replace(input_channels=ch(self.input_channels),
                             expanded_channels=ch(self.expanded_channels), out_channels=ch(self.out_channels))


class InvertedResidual(nn.Module):
    """Expansion 1x1 -> depthwise (k x k) -> SE -> projection 1x1, plus the input when shapes allow."""

    def __init__(self, cnf: BlockConfig) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        inp, mid, act = cnf.input_channels, cnf.expanded_channels, cnf.activation
        if mid != inp:
            layers.append(conv_bn_act(inp, mid, 1, activation=act, **BN))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(dw_bn_act(cnf.expanded_channels, cnf.kernel, stride, dilation=cnf.dilation,
                                activation=cnf.activation, **BN))
        if cnf.use_se:
            squeeze = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcite(mid, squeeze, activation="relu", gate="hardsigmoid"))
        layers.append(conv_bn_act(cnf.expanded_channels, cnf.out_channels, 1, activation="none", **BN))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out += x
        return out


class MobileNetV3(nn.Module):
    """MobileNetV3: ``features`` (stem, blocks, 1x1 conv), ``avgpool`` and ``classifier``, as in
    torchvision."""

    def __init__(self, setting: list[BlockConfig], last_channel: int, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if not setting:
            raise ValueError("The inverted residual setting should not be empty")
        stem = conv_bn_act(3, setting[0].input_channels, 3, 2, activation="hardswish", **BN)
        layers: list[nn.Module] = [stem]
        layers += [InvertedResidual(cnf) for cnf in setting]
        last_in = setting[-1].out_channels
        layers.append(conv_bn_act(last_in, 6 * last_in, 1, activation="hardswish", **BN))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(_layers.working_layout(self, x))
        x = self.avgpool(x).flatten(1)
        return self.classifier(x)


def _config(arch: str, width_mult: float, reduced_tail: bool, dilated: bool) -> tuple[list[BlockConfig], int]:
    r = 2 if reduced_tail else 1
    d = 2 if dilated else 1
    re, hs = "relu", "hardswish"
    if arch == "large":
        rows = [
            BlockConfig(16, 3, 16, 16, False, re, 1),
            BlockConfig(16, 3, 64, 24, False, re, 2),
            BlockConfig(24, 3, 72, 24, False, re, 1),
            BlockConfig(24, 5, 72, 40, True, re, 2),
            BlockConfig(40, 5, 120, 40, True, re, 1),
            BlockConfig(40, 5, 120, 40, True, re, 1),
            BlockConfig(40, 3, 240, 80, False, hs, 2),
            BlockConfig(80, 3, 200, 80, False, hs, 1),
            BlockConfig(80, 3, 184, 80, False, hs, 1),
            BlockConfig(80, 3, 184, 80, False, hs, 1),
            BlockConfig(80, 3, 480, 112, True, hs, 1),
            BlockConfig(112, 3, 672, 112, True, hs, 1),
            BlockConfig(112, 5, 672, 160 // r, True, hs, 2, d),
            BlockConfig(160 // r, 5, 960 // r, 160 // r, True, hs, 1, d),
            BlockConfig(160 // r, 5, 960 // r, 160 // r, True, hs, 1, d),
        ]
        last = 1280 // r
    else:
        rows = [
            BlockConfig(16, 3, 16, 16, True, re, 2),
            BlockConfig(16, 3, 72, 24, False, re, 2),
            BlockConfig(24, 3, 88, 24, False, re, 1),
            BlockConfig(24, 5, 96, 40, True, hs, 2),
            BlockConfig(40, 5, 240, 40, True, hs, 1),
            BlockConfig(40, 5, 240, 40, True, hs, 1),
            BlockConfig(40, 5, 120, 48, True, hs, 1),
            BlockConfig(48, 5, 144, 48, True, hs, 1),
            BlockConfig(48, 5, 288, 96 // r, True, hs, 2, d),
            BlockConfig(96 // r, 5, 576 // r, 96 // r, True, hs, 1, d),
            BlockConfig(96 // r, 5, 576 // r, 96 // r, True, hs, 1, d),
        ]
        last = 1024 // r
    return [row.scaled(width_mult) for row in rows], make_divisible(last * width_mult, 8)


def mobilenet_v3_large(width_mult: float = 1.0, *, num_classes: int = 1000, reduced_tail: bool = False,
                       dilated: bool = False, dropout: float = 0.2, weights: Weights = None) -> MobileNetV3:
    """MobileNetV3-Large; with the defaults its ``state_dict`` is torchvision's ``mobilenet_v3_large()``'s.

    ``reduced_tail`` halves the channels of the last blocks and ``dilated`` dilates them (for
    detection/segmentation backbones), as in torchvision. ``weights``: a local checkpoint to load.
    """
    setting, last = _config("large", width_mult, reduced_tail, dilated)
    return load_weights(MobileNetV3(setting, last, num_classes, dropout), weights)


def mobilenet_v3_small(width_mult: float = 1.0, *, num_classes: int = 1000, reduced_tail: bool = False,
                       dilated: bool = False, dropout: float = 0.2, weights: Weights = None) -> MobileNetV3:
    """MobileNetV3-Small; with the defaults its ``state_dict`` is torchvision's ``mobilenet_v3_small()``'s."""
    setting, last = _config("small", width_mult, reduced_tail, dilated)
    return load_weights(MobileNetV3(setting, last, num_classes, dropout), weights)
