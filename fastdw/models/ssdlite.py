"""SSDLite with a MobileNetV2 backbone (Sandler et al., 2018, section 6.2), as in pytorch-ssd.

Six feature maps (at a 300x300 input: 19x19 from the expansion of backbone block 14, 10x10 from
the backbone output, then four extra inverted residual blocks down to 1x1) each get a class head
and a box head. SSDLite's heads are depthwise separable: depthwise 3x3 + BN + ReLU6 (one fused op)
then a 1x1 conv; the last map's heads are plain 1x1 convs. ``forward`` returns the class scores
``[N, anchors, num_classes]`` and the box regressions ``[N, anchors, 4]`` (offsets to the priors
of ``priors()``; decoding and non-maximum suppression are left to the caller).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from fastdw.models._layers import Weights, load_weights, working_layout
from fastdw.models.mobilenet_v2 import InvertedResidual, MobileNetV2
from fastdw.nn import FusedSequential

ANCHORS_PER_LOCATION = 6  # aspect ratios 1, 1 (larger), 2, 1/2, 3, 1/3
SOURCE_BLOCK = 14  # backbone block whose expansion output is the first feature map


def separable_head(in_channels: int, out_channels: int, activation: type[nn.Module]) -> FusedSequential:
    """Depthwise 3x3 (with bias) + BN + activation, then a 1x1 conv: pytorch-ssd's ``SeperableConv2d``
    children and keys, the first three run as one fused op."""
    return FusedSequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
        nn.BatchNorm2d(in_channels),
        activation(),
        nn.Conv2d(in_channels, out_channels, 1),
    )


class SSDLite(nn.Module):
    """SSDLite: ``base_net`` (MobileNetV2 features), ``extras`` and the ``classification_headers``
    and ``regression_headers`` of the six feature maps."""

    def __init__(self, num_classes: int = 21, width_mult: float = 1.0, onnx_compatible: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        act = nn.ReLU if onnx_compatible else nn.ReLU6
        self.base_net = MobileNetV2(width_mult=width_mult, onnx_compatible=onnx_compatible).features
        activation = "relu" if onnx_compatible else "relu6"
        self.extras = nn.ModuleList([
            InvertedResidual(1280, 512, 2, 0.2, activation=activation),
            InvertedResidual(512, 256, 2, 0.25, activation=activation),
            InvertedResidual(256, 256, 2, 0.5, activation=activation),
            InvertedResidual(256, 64, 2, 0.25, activation=activation),
        ])
        source = self.base_net[SOURCE_BLOCK]
        sources = [source.conv[0][0].out_channels, self.base_net[-1][0].out_channels, 512, 256, 256]
        a = ANCHORS_PER_LOCATION
        self.classification_headers = nn.ModuleList(
            [separable_head(c, a * num_classes, act) for c in sources] + [nn.Conv2d(64, a * num_classes, 1)])
        self.regression_headers = nn.ModuleList(
            [separable_head(c, a * 4, act) for c in sources] + [nn.Conv2d(64, a * 4, 1)])
        for m in [*self.extras.modules(), *self.classification_headers.modules(),
                  *self.regression_headers.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _predict(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        scores = self.classification_headers[i](x).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes)
        boxes = self.regression_headers[i](x).permute(0, 2, 3, 1).reshape(n, -1, 4)
        return scores, boxes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [N, anchors, num_classes], box regressions [N, anchors, 4])``."""
        maps: list[torch.Tensor] = []
        x = working_layout(self, x)
        for i, block in enumerate(self.base_net):
            if i == SOURCE_BLOCK:
                x, expanded = block.forward_with_expansion(x)
                maps.append(expanded)
            else:
                x = block(x)
        maps.append(x)
        for block in self.extras:
            x = block(x)
            maps.append(x)
        predictions = [self._predict(i, m) for i, m in enumerate(maps)]
        return torch.cat([p[0] for p in predictions], 1), torch.cat([p[1] for p in predictions], 1)


def priors(image_size: int = 300) -> torch.Tensor:
    """SSD prior boxes ``[anchors, 4]`` as (cx, cy, w, h) relative to the image, in the order of
    ``SSDLite.forward``'s outputs, after pytorch-ssd's MobileNet configuration (box sizes 60 to 330
    pixels at 300x300, aspect ratios 2 and 3), centred on the cells of each feature map (19, 10, 5,
    3, 2, 1 at 300x300; other sizes give the maps the network produces)."""
    maps = []
    for stride in (16, 32, 64, 128, 256, 512):
        size = image_size
        for _ in range(int(math.log2(stride))):
            size = (size + 1) // 2  # a 3x3/2 conv with padding 1
        maps.append(size)
    box_sizes = [60, 105, 150, 195, 240, 285, 330]
    boxes = []
    for k, fm in enumerate(maps):
        small, big = box_sizes[k] / 300, box_sizes[k + 1] / 300
        for j, i in itertools.product(range(fm), repeat=2):
            cx, cy = (i + 0.5) / fm, (j + 0.5) / fm
            boxes.append([cx, cy, small, small])
            boxes.append([cx, cy, math.sqrt(small * big), math.sqrt(small * big)])
            for ratio in (2.0, 3.0):
                r = math.sqrt(ratio)
                boxes += [[cx, cy, small * r, small / r], [cx, cy, small / r, small * r]]
    return torch.tensor(boxes).clamp_(0.0, 1.0)


def ssdlite_mobilenet_v2(num_classes: int = 21, *, width_mult: float = 1.0, onnx_compatible: bool = False,
                         weights: Weights = None) -> SSDLite:
    """SSDLite-MobileNetV2 for ``num_classes`` classes (21: Pascal VOC with background).

    ``weights``: a local checkpoint (path or state_dict) to load; nothing is downloaded.
    """
    return load_weights(SSDLite(num_classes, width_mult, onnx_compatible), weights)
