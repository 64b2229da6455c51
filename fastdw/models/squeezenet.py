"""SqueezeNet 1.0 and 1.1 (Iandola et al., 2016), the module tree and ``state_dict`` of torchvision's.

A Fire module concatenates its two expand convs. PyTorch has no convolution that writes into a
slice of a larger tensor, so the convs still produce their own outputs; without autograd the ReLU
of each is written straight into its half of one preallocated output (``clamp_min(out=)``), so the
concatenation costs no separate pass: one read and one write per expand output instead of the
in-place ReLU pass plus the ``cat`` copy. With autograd it is ``cat`` of the two ReLUs.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdw.models._layers import Weights, load_weights, working_layout


class Fire(nn.Module):
    """squeeze 1x1 + ReLU, then expand 1x1 + ReLU and expand 3x3 + ReLU, concatenated."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int,
                 expand3x3_planes: int) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        e1, e3 = self.expand1x1(x), self.expand3x3(x)
        relus = type(self.expand1x1_activation) is nn.ReLU and type(self.expand3x3_activation) is nn.ReLU
        if (torch.is_grad_enabled() and (e1.requires_grad or e3.requires_grad)) or not relus:
            return torch.cat([self.expand1x1_activation(e1), self.expand3x3_activation(e3)], 1)
        c1 = e1.shape[1]
        channels_last = e1.dim() == 4 and e1.is_contiguous(memory_format=torch.channels_last) \
            and not e1.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((e1.shape[0], c1 + e3.shape[1], *e1.shape[2:]), dtype=e1.dtype, device=e1.device,
                          memory_format=fmt)
        torch.clamp_min(e1, 0, out=out[:, :c1])
        torch.clamp_min(e3, 0, out=out[:, c1:])
        return out


class SqueezeNet(nn.Module):
    """SqueezeNet: ``features`` (stem conv, max-pools, Fire modules) and ``classifier`` (dropout,
    1x1 conv to the classes, ReLU, global average pool)."""

    def __init__(self, version: str = "1_0", num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        if version == "1_0":
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), pool(),
                Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), pool(),
                Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
                Fire(384, 64, 256, 256), pool(),
                Fire(512, 64, 256, 256),
            )
        elif version == "1_1":
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
                Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
                Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
                Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
                Fire(512, 64, 256, 256),
            )
        else:
            raise ValueError(f"Unsupported SqueezeNet version {version}: 1_0 or 1_1 expected")
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = x
        x = self.features(working_layout(self, x))
        if self.training and given.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and given.is_contiguous():
            # The classifier's dropout acts on the 4-D map and draws its mask in memory order: draw it
            # in the caller's layout, so a seeded step equals torchvision's mask for mask.
            x = x.contiguous()
        return torch.flatten(self.classifier(x), 1)


def squeezenet1_0(*, num_classes: int = 1000, dropout: float = 0.5, weights: Weights = None) -> SqueezeNet:
    """SqueezeNet 1.0; its ``state_dict`` is torchvision's ``squeezenet1_0()``'s."""
    return load_weights(SqueezeNet("1_0", num_classes, dropout), weights)


def squeezenet1_1(*, num_classes: int = 1000, dropout: float = 0.5, weights: Weights = None) -> SqueezeNet:
    """SqueezeNet 1.1 (2.4x less computation than 1.0); its ``state_dict`` is torchvision's
    ``squeezenet1_1()``'s."""
    return load_weights(SqueezeNet("1_1", num_classes, dropout), weights)
