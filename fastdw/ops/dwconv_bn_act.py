"""``fastdw.ops.dwconv_bn_act``: depthwise conv + (bias) + BatchNorm + activation as one op.

The schema lives in C++ (csrc/registration.cpp, ``TORCH_LIBRARY(fastdw)``):

    fastdw::dwconv_bn_act(x, weight, bias?, bn_weight?, bn_bias?, mean?, var?, training, eps,
                          stride, padding, dilation, activation) -> (out, save_mean, save_var)

It is functional: in training it returns the batch mean and biased variance and this wrapper
updates the running statistics, so that autograd (which needs functional ops) and
torch.compile both see a pure op. Backward is ``fastdw::dwconv_bn_act_backward``, itself a C++
op. The Triton backend has twins with the same schema, ``fastdw::triton_dwconv_bn_act`` and
``fastdw::triton_dwconv_bn_act_backward`` (fastdw/triton/dwconv_bn_act.py), given the same fake
kernels and autograd here. Only the input, the (tiny) parameters and per-channel statistics are
saved for backward: the pre-BN conv output is recomputed there, because a depthwise conv costs
less than storing it. In CPU training with relu / relu6 the C++ op also keeps its own output (the
tensor it returns, no extra memory: eager's ``ReLU6(inplace=True)`` keeps the same one), from
which the backward takes its BatchNorm sums without a conv (csrc/autograd.cpp, saves_output).
"""

from __future__ import annotations

import torch

from fastdw import _backend, _validate
from fastdw import reference as _ref
from fastdw.ops import _layout


def dwconv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=None,
    dilation=1,
    activation: str = "relu6",
    num_batches_tracked: torch.Tensor | None = None,
    input_shuffle_groups: int | None = None,
) -> torch.Tensor:
    """``act(batch_norm(conv2d(x, weight, bias, groups=C)))`` in one op.

    BatchNorm follows ``F.batch_norm``: with ``training=True`` batch statistics are used and
    ``running_mean``/``running_var`` (if given) are updated in place with ``momentum``
    (``None``: cumulative average, using ``num_batches_tracked``, which is incremented); with
    ``training=False`` the running statistics are used. With ``training=False`` and no running
    statistics there is no BatchNorm at all (conv + activation). ``padding=None`` means
    ``(k // 2) * dilation`` ("same" for odd k at stride 1). The output keeps the input's memory
    format. Activations: relu, relu6, hardswish, silu, none.

    ``input_shuffle_groups=g`` makes the op read its input through
    ``channel_shuffle(x, g)`` (ShuffleNetV1: shuffle then depthwise conv) without materialising
    the shuffled tensor (NCHW: each channel's plane is read from its source; channels_last
    inputs are shuffled once internally).
    """
    stride, padding, dilation, (ho, wo) = _validate.conv_geometry(x, weight, stride, padding, dilation)
    activation = _validate.activation(activation)
    c = x.shape[1]
    if bias is not None:
        _validate.same_device_dtype(x, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != c:
            raise ValueError(f"bias must have shape [{c}], got {list(bias.shape)}")
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _validate.per_channel(x, t, name, c)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    normalises = training or running_mean is not None
    if not normalises and (bn_weight is not None or bn_bias is not None):
        raise ValueError("bn_weight/bn_bias given without BatchNorm statistics: pass running_mean/"
                         "running_var (eval) or training=True")
    groups = 1 if input_shuffle_groups is None else input_shuffle_groups
    if type(groups) is not int or groups < 1 or c % groups:
        raise ValueError(f"input_shuffle_groups must be a positive int dividing the {c} channels, "
                         f"got {input_shuffle_groups!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if training and x.shape[0] * ho * wo == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{[x.shape[0], c, ho, wo]}"
        )

    backend = _backend.resolve(x.device, x.dtype)  # raises before anything is modified

    update = training and running_mean is not None
    if update and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    factor = running_factor(momentum, num_batches_tracked) if update else 0.0

    if backend == "reference":
        if groups > 1:
            x = torch.nn.functional.channel_shuffle(x, groups)
        out = _ref.dwconv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                 training, factor, eps, stride, padding, dilation, activation)
        if update and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        return out

    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, float(eps),
            list(stride), list(padding), list(dilation), activation, groups)
    if backend == "triton":
        out, mean, var = torch.ops.fastdw.triton_dwconv_bn_act.default(*args)
    else:
        out, mean, var = torch.ops.fastdw.dwconv_bn_act.default(*args)
    if update:
        update_running_stats(running_mean, running_var, num_batches_tracked, factor, mean, var,
                             x.shape[0] * ho * wo)
    return out


def running_factor(momentum: float | None, num_batches_tracked: torch.Tensor | None) -> float:
    """The weight of this batch in BatchNorm2d's running statistics: ``momentum``, or with
    ``momentum=None`` the cumulative average ``1 / (batches so far + 1)`` (read before the increment)."""
    if momentum is None:
        return 1.0 / (float(num_batches_tracked) + 1.0)
    return float(momentum)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         num_batches_tracked: torch.Tensor | None, factor: float, mean: torch.Tensor,
                         var: torch.Tensor, count: int) -> None:
    """BatchNorm2d's update, in place: ``num_batches_tracked += 1``, and the running statistics move
    by ``factor`` towards the batch mean and the unbiased batch variance (``var`` is the biased
    variance of ``count`` values per channel). The two statistics are updated by one foreach op per
    step: 4 small ops instead of 8 (~10 us less per layer at batch 1). With the extension loaded,
    plain tensors outside torch.compile take ``fastdw::bn_running_update`` instead: one call."""
    if _backend.extension_loaded() and type(running_mean) is torch.Tensor and type(mean) is torch.Tensor \
            and not torch.compiler.is_compiling():
        # One C++ op (csrc/bn_running_update.cpp): the four ATen calls below cost ~16 us a layer.
        torch.ops.fastdw.bn_running_update.default(running_mean, running_var, num_batches_tracked, mean, var,
                                                   factor, count)
        return
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if count > 1:
            unbiased = var * (count / (count - 1))
            if mean.dtype != running_mean.dtype:
                mean, unbiased = mean.to(running_mean.dtype), unbiased.to(running_var.dtype)
            stats = (running_mean, running_var)
            torch._foreach_mul_(stats, 1.0 - factor)
            torch._foreach_add_(stats, (mean, unbiased), alpha=factor)


# --- registration with the dispatcher: fake kernels (torch.compile) and autograd -----------------


def _out_shape(x, weight, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (x.shape[0], x.shape[1], ho, wo)


def _same_device(*tensors) -> None:
    # The fake kernel also runs when one argument is on the meta device and the others are real
    # (the dispatcher picks it for the whole call): refuse mixed devices there too.
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise RuntimeError(f"fastdw::dwconv_bn_act: tensors on different devices: {names}")


def _fake_forward(x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride, padding,
                  dilation, activation, shuffle_groups=1):
    _same_device(x, weight, bias, bn_weight, bn_bias, mean, var)
    fmt = torch.channels_last if _layout.is_channels_last(x) else torch.contiguous_format
    out = x.new_empty(_out_shape(x, weight, stride, padding, dilation)).contiguous(memory_format=fmt)
    stat_dtype = x.dtype
    n = x.shape[1] if training else 0
    return out, x.new_empty((n,), dtype=stat_dtype), x.new_empty((n,), dtype=stat_dtype)


def _fake_backward(grad_out, x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride,
                   padding, dilation, activation, output_mask, shuffle_groups=1, out=None):
    # out: the forward's output, which the C++ op takes optionally (csrc/registration.cpp)
    _same_device(grad_out, x, weight, bias, bn_weight, bn_bias, mean, var, out)
    fmt = torch.channels_last if _layout.is_channels_last(x) else torch.contiguous_format

    def maybe(flag, t, shape):
        return t.new_empty(shape) if (flag and t is not None) else x.new_empty((0,))

    gx = x.new_empty(x.shape).contiguous(memory_format=fmt) if output_mask[0] else x.new_empty((0,))
    return (gx, maybe(output_mask[1], weight, weight.shape),
            maybe(output_mask[2], bias, (x.shape[1],)),
            maybe(output_mask[3], bn_weight, (x.shape[1],)),
            maybe(output_mask[4], bn_bias, (x.shape[1],)))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride, padding, dilation,
     activation, *rest) = inputs
    _, save_mean, save_var = output
    if training:
        mean, var = save_mean, save_var
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, mean, var)
    ctx.args = (training, eps, stride, padding, dilation, activation, rest[0] if rest else 1)


def _make_backward(backward_op: str):
    """The autograd backward of an op whose own backward is ``torch.ops.fastdw.<backward_op>``."""

    def _backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        training, eps, stride, padding, dilation, activation, shuffle_groups = ctx.args
        need = ctx.needs_input_grad
        mask = [need[0], need[1], bias is not None and need[2], bn_weight is not None and need[3],
                bn_bias is not None and need[4]]
        grads = getattr(torch.ops.fastdw, backward_op)(
            grad_out, x, weight, bias, bn_weight, bn_bias, mean, var, training, eps, stride, padding,
            dilation, activation, mask, shuffle_groups,
        )
        grads = [g if m else None for g, m in zip(grads, mask, strict=True)]
        return (*grads, None, None, None, None, None, None, None, None, None)

    return _backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastdw.ops.dwconv_bn_act does not support double backward (gradients of gradients); "
        "use fastdw.use_backend('reference') for that"
    )


def _register(prefix: str = "") -> None:
    """Fake kernels for the op and its backward; for the Triton twins (prefix "triton_") also the
    autograd. The C++ ops carry their autograd in C++ (csrc/autograd.cpp: the Python layer cost
    ~45 us per call), with the same saved tensors, gradients and double-backward error as here."""
    forward, backward = f"fastdw::{prefix}dwconv_bn_act", f"fastdw::{prefix}dwconv_bn_act_backward"
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    if not prefix:
        return
    torch.library.register_autograd(forward, _make_backward(f"{prefix}dwconv_bn_act_backward"),
                                    setup_context=_setup_context)
    # Without this, a gradient of the gradient would silently be zero.
    torch.library.register_autograd(backward, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


if _backend.extension_loaded():
    _register()
    # The running-statistics update mutates its first three arguments and returns nothing.
    torch.library.register_fake("fastdw::bn_running_update")(lambda *args: None)
_backend.on_triton_load(lambda: _register("triton_"))
