"""Reference: mean over positions -> 1x1 conv -> act -> 1x1 conv -> gate -> scale, unfused PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def se_activation_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown SE activation {name!r}")


def se_gate_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "hardsigmoid":
        # Same forward as F.hardsigmoid, but an exact backward: F.hardsigmoid's derivative is the
        # float32 constant 1/6 even in float64, which would make this oracle off by 3e-8 there.
        return F.relu6(x + 3.0) / 6.0
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown SE gate {name!r}")


def se_scale(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str,
    gate: str,
) -> torch.Tensor:
    """``x * gate(fc2(act(fc1(mean(x)))))`` with the FCs as matrix products on [N, C] vectors."""
    n, c = x.shape[0], x.shape[1]
    s = fc1_weight.shape[0]
    pooled = x.mean(dim=tuple(range(2, x.dim())))
    h = F.linear(pooled, fc1_weight.reshape(s, c), fc1_bias)
    z = F.linear(se_activation_fn(h, activation), fc2_weight.reshape(c, s), fc2_bias)
    g = se_gate_fn(z, gate)
    return x * g.reshape(n, c, *([1] * (x.dim() - 2)))
