"""ShuffleNet (V1, Zhang et al., 2017): grouped 1x1 convs, channel shuffle, depthwise 3x3.

Unit (Fig. 2 of the paper): grouped 1x1 + BN + ReLU -> shuffle -> depthwise 3x3 + BN -> grouped
1x1 + BN; stride 1 adds the input then ReLU, stride 2 concatenates a 3x3 average pool of the input
(then ReLU). The first grouped conv of the network (24 input channels) is not grouped, as in the
paper. ``width_mult`` is the paper's scale factor s ("ShuffleNet s x").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdw.models import _layers
from fastdw.models._layers import Weights, conv_bn_act, dw_bn_act, init_weights, load_weights, make_divisible
from fastdw.nn import ChannelShuffle

# output channels of stages 2-4 at s = 1, by groups (Table 1 of the paper)
STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088),
                  8: (384, 768, 1536)}
STAGE_REPEATS = (4, 8, 4)


class ShuffleUnit(nn.Module):
    """One ShuffleNet unit; ``first_groups`` is the grouping of its first 1x1 conv (1 for the very
    first unit of the network)."""

    def __init__(self, inp: int, oup: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if stride == 1 and inp != oup:
            raise ValueError(f"a stride-1 unit must keep the channels, got {inp} -> {oup}")
        self.stride = stride
        mid = oup // 4
        branch_out = oup - inp if stride == 2 else oup
        self.gconv1 = conv_bn_act(inp, mid, 1, groups=first_groups, activation="relu")
        # TODO(input_shuffle_groups): once DWConvBNAct takes input_shuffle_groups, drop this module and
        # build dwconv with input_shuffle_groups=first_groups, so the depthwise conv reads its input
        # through the permutation and the shuffle moves no data of its own.
        self.shuffle = ChannelShuffle(first_groups) if first_groups > 1 else nn.Identity()
        self.dwconv = dw_bn_act(mid, 3, stride, activation="none")
        self.gconv2 = conv_bn_act(mid, branch_out, 1, groups=groups, activation="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gconv2(self.dwconv(self.shuffle(self.gconv1(x))))
        if self.stride == 1:
            out += x
            return torch.relu_(out) if not (torch.is_grad_enabled() and out.requires_grad) else F.relu(out)
        # x is a ReLU (or max-pool of a ReLU) output, so relu(avg_pool(x)) == avg_pool(x): only the
        # branch needs its ReLU before the concatenation.
        return torch.cat([F.avg_pool2d(x, 3, 2, 1), F.relu(out)], 1)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1: ``conv1`` (3x3/2, 24 channels at s = 1), ``maxpool``, ``stage2``-``stage4``,
    global average pool, ``fc``."""

    def __init__(self, groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}, got {groups}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.groups = groups
        # Every unit's channel counts must split into the groups: the stem into `groups`, a stage
        # (and its bottleneck of a quarter of it) into 4 * groups.
        c = make_divisible(24 * width_mult, groups) if width_mult != 1.0 else 24
        self.conv1 = conv_bn_act(3, c, 3, 2, activation="relu")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        for i, (repeats, out) in enumerate(zip(STAGE_REPEATS, STAGE_CHANNELS[groups], strict=True)):
            out = make_divisible(out * width_mult, 4 * groups)
            units = [ShuffleUnit(c, out, 2, groups, 1 if i == 0 else groups)]
            units += [ShuffleUnit(out, out, 1, groups, groups) for _ in range(repeats - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            c = out
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(_layers.working_layout(self, x)))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(x.mean((2, 3)))


def shufflenet_v1(groups: int = 3, width_mult: float = 1.0, *, num_classes: int = 1000,
                  weights: Weights = None) -> ShuffleNetV1:
    """ShuffleNet V1 with ``groups`` in {1, 2, 3, 4, 8} and scale factor ``width_mult`` (0.25-2).

    ``weights``: a local checkpoint (path or state_dict) to load; nothing is downloaded.
    """
    return load_weights(ShuffleNetV1(groups, width_mult, num_classes), weights)
