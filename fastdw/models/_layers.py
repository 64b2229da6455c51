"""Building blocks shared by the bundled models: channel rounding, conv + BN + act, local weights."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from fastdw.nn import DWConvBNAct, FusedSequential

ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}

Weights = str | os.PathLike | Mapping[str, torch.Tensor] | None


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value``
    (the rounding of the TensorFlow MobileNet code, as torchvision's ``_make_divisible``)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def working_layout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layout a bundled model computes in. A float32 4-D CPU input is made channels_last once,
    at the stem: fastdw's depthwise kernels and oneDNN's dense convs are both faster in it (the
    whole network, batch 1 and 8: ``python -m fastdw.bench``, columns fastdw NCHW / CL), and the
    copy of a 3-channel image is ~1% of a forward. Outputs are the same values either way (float32
    rounding). ``model.cpu_channels_last = False`` turns it off; other inputs pass unchanged."""
    if (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and getattr(model, "cpu_channels_last", True)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, *,
                groups: int = 1, dilation: int = 1, activation: str = "relu", bn: bool = True,
                eps: float = 1e-5, momentum: float = 0.1) -> FusedSequential:
    """``Conv2d -> BatchNorm2d -> activation`` with the children (0, 1, 2) and ``state_dict`` keys
    of torchvision's ``Conv2dNormActivation``; in eval mode the BatchNorm is folded into the conv.

    Without ``bn`` the conv has a bias (children: conv, activation). ``activation="none"`` leaves
    it out. Depthwise convs should use ``DWConvBNAct`` instead.
    """
    padding = (kernel_size - 1) // 2 * dilation
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                         groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum))
    if activation != "none":
        layers.append(ACT_MODULES[activation](inplace=True))
    return FusedSequential(*layers)


def dw_bn_act(channels: int, kernel_size: int = 3, stride: int = 1, *, dilation: int = 1,
              activation: str = "relu", bn: bool = True, eps: float = 1e-5,
              momentum: float = 0.1) -> DWConvBNAct:
    """Depthwise ``Conv2d -> BatchNorm2d -> activation`` as one fused module (bias only without BN)."""
    return DWConvBNAct(channels, kernel_size, stride, dilation=dilation, activation=activation, bn=bn,
                       bias=not bn, eps=eps, momentum=momentum)


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """torchvision's initialisation of the MobileNets: Kaiming (fan-out) convs, unit BatchNorm,
    N(0, ``linear_std``) Linear layers (left at PyTorch's default when ``linear_std`` is None)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def load_weights(model: nn.Module, weights: Weights) -> nn.Module:
    """Load a local checkpoint into ``model`` (strict) and return it; nothing is downloaded.

    ``weights``: a path to a file saved with ``torch.save`` holding a ``state_dict`` (or a dict
    with it under ``"state_dict"``, ``"model"`` or ``"model_state_dict"``), or such a mapping.
    """
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(os.fspath(weights), map_location="cpu", weights_only=True)
    elif isinstance(weights, Mapping):
        state = weights
    else:
        raise TypeError(f"weights must be a path to a local checkpoint or a state_dict, got "
                        f"{type(weights).__name__} (fastdw never downloads weights)")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    model.load_state_dict(state)
    return model
