"""ShuffleNetV2 (Ma et al., 2018), the module tree and ``state_dict`` of torchvision's.

Each unit's ``cat([a, b], 1)`` followed by the 2-group channel shuffle is one
``fastdw.ops.concat_shuffle``: both halves are written straight into their interleaved slots.
The branches are flat ``FusedSequential``s (torchvision's keys), whose depthwise conv + BN runs
fused and whose 1x1 conv + BN (+ ReLU) runs with the BN folded in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdw import ops
from fastdw.models._layers import Weights, load_weights, working_layout
from fastdw.nn import FusedSequential


def shuffle_unit_forward(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ShuffleNetV2 unit: split (stride 1) or duplicate (stride 2) the input, run the branches,
    then concatenate and shuffle in one pass."""
    if unit.stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        return ops.concat_shuffle(x1, unit.branch2(x2))
    return ops.concat_shuffle(unit.branch1(x), unit.branch2(x))


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: ``branch1`` (stride 2 only: depthwise 3x3 + BN, 1x1 + BN + ReLU) and
    ``branch2`` (1x1 + BN + ReLU, depthwise 3x3 + BN, 1x1 + BN + ReLU)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not 1 <= stride <= 3:
            raise ValueError("illegal stride value")
        self.stride = stride
        branch = oup // 2
        if stride == 1 and inp != branch << 1:
            raise ValueError(f"Invalid combination of stride {stride}, inp {inp} and oup {oup} values. If "
                             f"stride == 1 then inp should be equal to oup // 2 << 1.")
        if stride > 1:
            self.branch1 = FusedSequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = FusedSequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle_unit_forward(self, x)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2: ``conv1``, ``maxpool``, ``stage2``-``stage4``, ``conv5``, global pool, ``fc``."""

    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels
        c = stages_out_channels[0]
        self.conv1 = FusedSequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                     nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        for i, (repeats, out) in enumerate(zip(stages_repeats, stages_out_channels[1:4], strict=True)):
            units = [InvertedResidual(c, out, 2)]
            units += [InvertedResidual(out, out, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            c = out
        last = stages_out_channels[-1]
        self.conv5 = FusedSequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last),
                                     nn.ReLU(inplace=True))
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(working_layout(self, x)))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


_CHANNELS = {
    "x0_5": [24, 48, 96, 192, 1024],
    "x1_0": [24, 116, 232, 464, 1024],
    "x1_5": [24, 176, 352, 704, 1024],
    "x2_0": [24, 244, 488, 976, 2048],
}


def _shufflenet_v2(size: str, num_classes: int, weights: Weights) -> ShuffleNetV2:
    return load_weights(ShuffleNetV2([4, 8, 4], _CHANNELS[size], num_classes), weights)


def shufflenet_v2_x0_5(*, num_classes: int = 1000, weights: Weights = None) -> ShuffleNetV2:
    """ShuffleNetV2 0.5x; its ``state_dict`` is torchvision's ``shufflenet_v2_x0_5()``'s."""
    return _shufflenet_v2("x0_5", num_classes, weights)


def shufflenet_v2_x1_0(*, num_classes: int = 1000, weights: Weights = None) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x; its ``state_dict`` is torchvision's ``shufflenet_v2_x1_0()``'s."""
    return _shufflenet_v2("x1_0", num_classes, weights)


def shufflenet_v2_x1_5(*, num_classes: int = 1000, weights: Weights = None) -> ShuffleNetV2:
    """ShuffleNetV2 1.5x; its ``state_dict`` is torchvision's ``shufflenet_v2_x1_5()``'s."""
    return _shufflenet_v2("x1_5", num_classes, weights)


def shufflenet_v2_x2_0(*, num_classes: int = 1000, weights: Weights = None) -> ShuffleNetV2:
    """ShuffleNetV2 2.0x; its ``state_dict`` is torchvision's ``shufflenet_v2_x2_0()``'s."""
    return _shufflenet_v2("x2_0", num_classes, weights)
