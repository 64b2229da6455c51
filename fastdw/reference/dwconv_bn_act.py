"""Reference: F.conv2d(groups=C) -> F.batch_norm -> activation, exactly PyTorch's unfused sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "silu":
        return F.silu(x)
    if name == "none":
        return x
    raise ValueError(f"unknown activation {name!r}")


def dwconv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: str,
) -> torch.Tensor:
    """``momentum`` is the factor already resolved by the caller (as nn.BatchNorm2d resolves None)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
    if training or running_mean is not None:
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return activation_fn(y, activation)
