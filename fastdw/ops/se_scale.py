"""``fastdw.ops.se_scale``: Squeeze-and-Excitation (pool, both 1x1 FCs, gate, scale) as one op.

The schema lives in C++ (csrc/registration.cpp, ``TORCH_LIBRARY(fastdw)``):

    fastdw::se_scale(x, fc1_weight, fc1_bias?, fc2_weight, fc2_bias?, activation, gate)
        -> (out, pooled)

Forward, with p = mean of x over all positions ([N, C]):

    h = W1 p + b1            (fc1, [N, S])
    z = W2 act(h) + b2       (fc2, [N, C])
    out = x * gate(z)        (broadcast over positions)

That is two passes over x (one to pool, one to scale), the minimum. ``pooled`` is returned only
to be saved for backward: autograd keeps x and that [N, C] vector, never the output, and
recomputes h, z and gate(z) from it. Backward is ``fastdw::se_scale_backward``, a C++ op (the
Triton twins ``fastdw::triton_se_scale[_backward]`` get the same fake kernels and autograd here):

    dg[n, c] = sum over positions of dout * x                 (one pass reading dout and x)
    dz = dg * gate'(z);  dW2 = dz^T act(h);  db2 = sum_n dz
    dh = (dz W2) * act'(h);  dW1 = dh^T p;  db1 = sum_n dh;  dp = dh W1
    dx = dout * gate(z) + dp / (positions)                    (one pass writing dx)

with PyTorch's derivative conventions: relu'(0) = 0, hardsigmoid' = 1/6 strictly inside (-3, 3).
"""

from __future__ import annotations

import torch

from fastdw import _backend, _validate
from fastdw import reference as _ref
from fastdw.ops import _layout


def se_scale(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    activation: str = "relu",
    gate: str = "hardsigmoid",
) -> torch.Tensor:
    """``x * gate(fc2(act(fc1(mean(x)))))`` in one op.

    ``x`` is [N, C, *] (normally [N, C, H, W]); the mean is over all positions. ``fc1_weight`` is
    [S, C, 1, 1] and ``fc2_weight`` [C, S, 1, 1] (1x1 conv weights, as torchvision's
    ``SqueezeExcitation`` and timm's ``SqueezeExcite`` hold them; [S, C] and [C, S] Linear weights
    are accepted too), biases [S] and [C] or None. ``activation``: relu or silu; ``gate``:
    hardsigmoid (``relu6(z + 3) / 6``) or sigmoid. The output keeps the input's memory format.
    Differentiable in x and all four FC tensors.
    """
    c = _validate.batched_channels(x, "input")
    s = _validate.fc_weight(x, fc1_weight, "fc1_weight", None, c)
    _validate.fc_weight(x, fc2_weight, "fc2_weight", c, s)
    _validate.vector(x, fc1_bias, "fc1_bias", s)
    _validate.vector(x, fc2_bias, "fc2_bias", c)
    activation = _validate.se_activation(activation)
    gate = _validate.se_gate(gate)

    backend = _backend.resolve(x.device, x.dtype)
    if backend == "reference":
        return _ref.se_scale(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    if backend == "triton":
        out, _ = torch.ops.fastdw.triton_se_scale.default(*args)
    else:
        out, _ = torch.ops.fastdw.se_scale.default(*args)
    return out


# --- registration with the dispatcher: fake kernels (torch.compile) and autograd -----------------


def _fake_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate):
    return _layout.empty(x, x.shape, _layout.is_channels_last(x)), x.new_empty((x.shape[0], x.shape[1]))


def _fake_backward(grad_out, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate,
                   output_mask):
    def maybe(flag, t):
        return x.new_empty(t.shape) if (flag and t is not None) else x.new_empty((0,))

    gx = _layout.empty(x, x.shape, _layout.is_channels_last(x)) if output_mask[0] else x.new_empty((0,))
    return (gx, maybe(output_mask[1], fc1_weight), maybe(output_mask[2], fc1_bias),
            maybe(output_mask[3], fc2_weight), maybe(output_mask[4], fc2_bias))


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate = inputs
    _, pooled = output
    ctx.mark_non_differentiable(pooled)
    ctx.save_for_backward(x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.args = (activation, gate)


def _make_backward(backward_op: str):
    """The autograd backward of an op whose own backward is ``torch.ops.fastdw.<backward_op>``."""

    def _backward(ctx, grad_out, _grad_pooled):
        x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias = ctx.saved_tensors
        activation, gate = ctx.args
        need = ctx.needs_input_grad
        mask = [need[0], need[1], fc1_bias is not None and need[2], need[3], fc2_bias is not None and need[4]]
        grads = getattr(torch.ops.fastdw, backward_op).default(
            grad_out, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, mask
        )
        grads = [g if m else None for g, m in zip(grads, mask, strict=True)]
        return (*grads, None, None)

    return _backward


def _register(prefix: str = "") -> None:
    torch.library.register_fake(f"fastdw::{prefix}se_scale")(_fake_forward)
    torch.library.register_fake(f"fastdw::{prefix}se_scale_backward")(_fake_backward)
    if not prefix:  # the C++ op's autograd is in C++ (csrc/autograd.cpp)
        return
    torch.library.register_autograd(f"fastdw::{prefix}se_scale", _make_backward(f"{prefix}se_scale_backward"),
                                    setup_context=_setup_context)


if _backend.extension_loaded():
    _register()
_backend.on_triton_load(lambda: _register("triton_"))
