"""Aligned Xception (Xception-65 of DeepLabv3+, Chen et al., 2018; after Chollet, 2017).

Entry flow (stem, three strided blocks), middle flow (16 blocks at 728 channels), exit flow (a
strided block to 1024 channels, then three separable convs to 2048). A separable conv is a
depthwise 3x3 with its BatchNorm (one fused ``DWConvBNAct``) and a 1x1 conv with its BatchNorm;
max-pooling is replaced by strided separable convs, as in DeepLab.

``output_stride`` 8 or 16 keeps the resolution with dilation, as DeepLab does: blocks that would
stride beyond it get stride 1 and every later block is dilated by the stride it gave up.
``features_only=True`` drops the classifier and returns ``(features, low_level_features)``: the
exit-flow output (2048 channels at ``output_stride``) and the ReLU of the first entry block's
output (128 channels at stride 4), the pair DeepLabv3+'s decoder takes from its backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdw.models import _layers
from fastdw.models._layers import Weights, conv_bn_act, dw_bn_act, init_weights, load_weights
from fastdw.nn import FusedSequential

BN = {"eps": 1e-3}

# (in channels, out channels of the three separable convs, stride) of every block
ENTRY = [(64, (128, 128, 128), 2), (128, (256, 256, 256), 2), (256, (728, 728, 728), 2)]
MIDDLE = [(728, (728, 728, 728), 1)] * 16
EXIT = [(728, (728, 1024, 1024), 2)]
FINAL = (1024, (1536, 1536, 2048), 1)


def separable(inp: int, oup: int, stride: int, dilation: int, activation: str) -> list[nn.Module]:
    """Depthwise 3x3 + BN (+ act) fused, then 1x1 conv and BN (+ act): flat children, so that a
    ``FusedSequential`` folds the pointwise BN in eval mode."""
    pointwise = list(conv_bn_act(inp, oup, 1, activation=activation, **BN).children())
    return [dw_bn_act(inp, 3, stride, dilation=dilation, activation=activation, **BN), *pointwise]


class XceptionBlock(nn.Module):
    """Three separable convs (the last one strided) plus a shortcut.

    ``start_with_relu``: each separable conv is preceded by a ReLU and has no activation inside
    (entry, middle and exit blocks); otherwise each has BN + ReLU after both of its convs (the
    final block, which has no shortcut). The shortcut is the input, or a strided 1x1 conv + BN when
    the shape changes.
    """

    def __init__(self, inp: int, outs: tuple[int, int, int], stride: int = 1, dilation: int = 1,
                 start_with_relu: bool = True, skip: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = inp
        for i, out in enumerate(outs):
            if start_with_relu:
                layers.append(nn.ReLU(inplace=i > 0))  # the first one keeps the input for the shortcut
            activation = "none" if start_with_relu else "relu"
            layers += separable(c, out, stride if i == 2 else 1, dilation, activation)
            c = out
        self.stack = FusedSequential(*layers)
        self.in_channels, self.out_channels = inp, c
        if skip and (c != inp or stride != 1):
            self.shortcut: nn.Module | None = conv_bn_act(inp, c, 1, stride, activation="none", **BN)
        else:
            self.shortcut = None
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stack(x)
        if not self.skip:
            return out
        out += x if self.shortcut is None else self.shortcut(x)
        return out


class Xception(nn.Module):
    """Aligned Xception-65: ``stem``, ``blocks`` (3 entry, 16 middle, 2 exit), then a global
    average pool and ``fc`` unless ``features_only``."""

    def __init__(self, num_classes: int = 1000, output_stride: int = 32, features_only: bool = False) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.features_only = features_only
        self.stem = nn.Sequential(conv_bn_act(3, 32, 3, 2, activation="relu", **BN),
                                  conv_bn_act(32, 64, 3, 1, activation="relu", **BN))
        blocks: list[nn.Module] = []
        stride, dilation = 2, 1
        for i, (inp, outs, s) in enumerate(ENTRY + MIDDLE + EXIT + [FINAL]):
            block_dilation = dilation
            if s > 1:
                if stride * s > output_stride:
                    dilation *= s  # later blocks make up for the stride this one gives up
                    s = 1
                else:
                    stride *= s
            last = i == len(ENTRY) + len(MIDDLE) + len(EXIT)
            blocks.append(XceptionBlock(inp, outs, s, block_dilation, start_with_relu=not last,
                                        skip=not last))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = FINAL[1][-1]
        if not features_only:
            self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, linear_std=None)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, low_level_features)``: the exit-flow output and relu(first block output)."""
        x = self.blocks[0](self.stem(x))
        low_level = torch.relu(x)
        for block in self.blocks[1:]:
            x = block(x)
        return x, low_level

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.features_only:
            return self.forward_features(x)
        x = _layers.working_layout(self, x)
        for block in (self.stem, self.blocks):
            x = block(x)
        return self.fc(x.mean((2, 3)))


def xception(output_stride: int | None = None, features_only: bool = False, *, num_classes: int = 1000,
             weights: Weights = None) -> Xception:
    """Aligned Xception-65. ``output_stride``: 32 (classification), 16 or 8 (dilated, for dense
    prediction); None means 32, or 16 with ``features_only`` (DeepLab's default).

    ``features_only=True`` returns ``(features, low_level_features)`` from ``forward``.
    ``weights``: a local checkpoint (path or state_dict) to load; nothing is downloaded.
    """
    if output_stride is None:
        output_stride = 16 if features_only else 32
    return load_weights(Xception(num_classes, output_stride, features_only), weights)
