"""MobileNetV2 (Sandler et al., 2018), the module tree and ``state_dict`` of torchvision's.

Options of the pytorch-ssd variant: ``use_batch_norm=False`` drops every BatchNorm (the convs then
carry a bias, so a BN-folded checkpoint fits), ``onnx_compatible=True`` uses ReLU instead of ReLU6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdw.models import _layers
from fastdw.models._layers import Weights, conv_bn_act, dw_bn_act, init_weights, load_weights, make_divisible
from fastdw.nn import FusedSequential

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class InvertedResidual(nn.Module):
    """1x1 expansion -> depthwise 3x3 (fused with BN and activation) -> linear 1x1 projection,
    plus the input when shapes allow. ``self.conv`` holds torchvision's children."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, *, use_batch_norm: bool = True,
                 activation: str = "relu6") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(inp, hidden, 1, activation=activation, bn=use_batch_norm))
        layers.append(dw_bn_act(hidden, 3, stride, activation=activation, bn=use_batch_norm))
        layers.append(nn.Conv2d(hidden, oup, 1, bias=not use_batch_norm))
        if use_batch_norm:
            layers.append(nn.BatchNorm2d(oup))
        self.conv = FusedSequential(*layers)  # folds the projection's BN in eval mode
        self.out_channels = oup
        self.expanded = expand_ratio != 1
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.use_res_connect:
            out += x  # the last op (BN, or the folded conv) does not keep its output for backward
        return out

    def forward_with_expansion(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, output of the 1x1 expansion)``; SSDLite predicts from the latter."""
        if not self.expanded:
            raise ValueError("this block has no expansion layer (expand_ratio == 1)")
        expanded = self.conv[0](x)
        out = self.conv.forward_from(expanded, 1)
        if self.use_res_connect:
            out += x
        return out, expanded


class MobileNetV2(nn.Module):
    """MobileNetV2: ``features`` (stem, inverted residuals, 1x1 to ``last_channel``) and
    ``classifier`` (dropout, linear), as torchvision's."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8, *,
                 use_batch_norm: bool = True, onnx_compatible: bool = False, dropout: float = 0.2,
                 inverted_residual_setting: list[list[float]] | None = None) -> None:
        super().__init__()
        setting = inverted_residual_setting
        if setting is None:
            setting = INVERTED_RESIDUAL_SETTING
        if not setting or any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting must be a list of [t, c, n, s], got {setting}")
        activation = "relu" if onnx_compatible else "relu6"
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        bn = use_batch_norm
        features: list[nn.Module] = [conv_bn_act(3, input_channel, 3, 2, activation=activation, bn=bn)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t,
                                                 use_batch_norm=use_batch_norm, activation=activation))
                input_channel = output_channel
        features.append(conv_bn_act(input_channel, self.last_channel, 1, activation=activation, bn=bn))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(_layers.working_layout(self, x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2(width_mult: float = 1.0, round_nearest: int = 8, *, num_classes: int = 1000,
                 use_batch_norm: bool = True, onnx_compatible: bool = False, dropout: float = 0.2,
                 weights: Weights = None) -> MobileNetV2:
    """MobileNetV2; with the defaults its ``state_dict`` is torchvision's ``mobilenet_v2()``'s.

    ``weights``: a local checkpoint (path or state_dict) to load; nothing is downloaded.
    """
    model = MobileNetV2(num_classes, width_mult, round_nearest, use_batch_norm=use_batch_norm,
                        onnx_compatible=onnx_compatible, dropout=dropout)
    return load_weights(model, weights)
