"""Channel shuffle that moves no data of its own.

``channel_shuffle(x, g)`` is ``torch.nn.functional.channel_shuffle``:

    out[:, k * g + i] = x[:, i * (C / g) + k]        (i < g, k < C / g)

one read and one write (``fastdw::channel_shuffle``); its backward is the inverse permutation,
which is the shuffle with C / g groups, so the backward is the same C++ op.

Inside networks the shuffle is absorbed instead of run:

* ShuffleNetV2 (``cat([a, b], 1)`` then shuffle with 2 groups): ``concat_shuffle(a, b)`` writes
  a and b straight into the even and odd channels of the output, ``out[:, 2k] = a[:, k]``,
  ``out[:, 2k + 1] = b[:, k]``, reading a and b through their strides (so the pass-through half,
  a channel slice of the block input, is copied once, into its slots). Backward
  (``fastdw::concat_shuffle_backward``) splits the gradient's even and odd channels.
* ShuffleNetV1 (grouped 1x1 conv, shuffle, depthwise conv): the depthwise op reads its input
  through the shuffle (``dwconv_bn_act(..., input_shuffle_groups=g)``); ``shuffle_permutation``
  gives that channel order (``channel_shuffle(x, g) == x[:, perm]``), and ``shuffle_conv_weight``
  folds a shuffle into the next dense conv instead: ``conv(shuffle(x), W) == conv(x, W')``.

The Triton backend's twins, ``fastdw::triton_channel_shuffle``, ``fastdw::triton_concat_shuffle``
and ``fastdw::triton_concat_shuffle_backward``, get the same fake kernels and autograd here.
"""

from __future__ import annotations

import torch

from fastdw import _backend, _validate
from fastdw import reference as _ref
from fastdw.ops import _layout

if _backend.extension_loaded():
    from fastdw._C import channel_shuffle as _direct_shuffle


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``torch.nn.functional.channel_shuffle(x, groups)`` for x of shape [N, C, *].

    ``groups`` must divide C. The output keeps the input's memory format; backward applies the
    inverse permutation (the shuffle with ``C // groups`` groups).
    """
    # The common case first (a shuffle is ~5-15 us, so the call's own cost shows): the compiled
    # op through its direct entry point (csrc/python_entry.cpp); a whole call at [1, 24, 4, 4]
    # takes 1.1 us this way, 1.9 us through torch.ops, 1.2 us for F.channel_shuffle. It returns
    # None for anything but a plain float CPU tensor and an int, and where the op rejects the
    # arguments; the checked path below then runs and raises the named error. Dynamo cannot
    # trace that entry, so compiled code calls the op through torch.ops.
    if _backend.cpu_kernels_chosen() and not torch.compiler.is_compiling():
        out = _direct_shuffle(x, groups)
        if out is not None:
            return out
    if not (type(x) is torch.Tensor and type(groups) is int and x.dim() >= 3 and x.dtype.is_floating_point
            and groups >= 1 and x.shape[1] % groups == 0):
        groups = _validate.groups_dividing(groups, _validate.batched_channels(x, "input"))
    backend = _backend.resolve(x.device, x.dtype)
    if backend == "reference":
        return _ref.channel_shuffle(x, groups)
    if backend == "triton":
        return torch.ops.fastdw.triton_channel_shuffle.default(x, groups)
    return torch.ops.fastdw.channel_shuffle.default(x, groups)


def concat_shuffle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``channel_shuffle(torch.cat([a, b], 1), 2)`` in one pass: one read of a and b, one write.

    ``out[:, 2k] = a[:, k]`` and ``out[:, 2k + 1] = b[:, k]``; a and b have the same shape
    [N, C, *] and may be strided views (e.g. ``x.chunk(2, 1)[0]``). The output is channels_last if
    either input has channels_last strides. Backward: ``grad_a = grad[:, 0::2]``,
    ``grad_b = grad[:, 1::2]``.
    """
    if not (type(a) is torch.Tensor and type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape
            and a.dim() >= 3 and a.dtype.is_floating_point and a.device == b.device):
        _check_pair(a, b)
    backend = _backend.resolve(a.device, a.dtype)
    if backend == "reference":
        return _ref.concat_shuffle(a, b)
    if backend == "triton":
        return torch.ops.fastdw.triton_concat_shuffle.default(a, b)
    return torch.ops.fastdw.concat_shuffle.default(a, b)


def _check_pair(a, b) -> None:
    _validate.batched_channels(a, "a")
    _validate.batched_channels(b, "b")
    if b.device != a.device:
        raise RuntimeError(f"b is on {b.device} but a is on {a.device}")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype} but a has dtype {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {list(a.shape)} and {list(b.shape)}")


def shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """The channel order of a shuffle: ``channel_shuffle(x, groups) == x[:, perm]``.

    ``perm[k * groups + i] = i * (channels // groups) + k``. Its inverse is
    ``shuffle_permutation(channels, channels // groups)``.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    groups = _validate.groups_dividing(groups, channels)
    return torch.arange(channels).reshape(groups, channels // groups).t().reshape(-1)


def shuffle_conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Fold a preceding channel shuffle into a dense conv's weight.

    For ``weight`` [O, C, kh, kw] of a conv with ``groups=1`` (any kernel size, e.g. 1x1):
    ``F.conv2d(channel_shuffle(x, groups), weight) == F.conv2d(x, shuffle_conv_weight(weight, groups))``
    exactly, since ``W'[:, perm[j]] = W[:, j]``, i.e. ``W' = W[:, inverse(perm)]``. Returns a new
    tensor (``torch.no_grad()`` it into a parameter to convert a trained model).
    """
    _validate.floating_tensor(weight, "weight")
    if weight.dim() < 2:
        raise ValueError(f"weight must be a conv weight [O, C, *], got shape {list(weight.shape)}")
    c = weight.shape[1]
    groups = _validate.groups_dividing(groups, c)
    inverse = shuffle_permutation(c, c // groups).to(weight.device)
    return weight.index_select(1, inverse)


# --- registration with the dispatcher: fake kernels (torch.compile) and autograd -----------------


def _fake_shuffle(x, groups):
    return _layout.empty(x, x.shape, _layout.is_channels_last(x))


def _shuffle_setup_context(ctx, inputs, output):
    x, groups = inputs
    ctx.inverse_groups = x.shape[1] // groups


def _fake_concat(a, b):
    shape = (a.shape[0], 2 * a.shape[1], *a.shape[2:])
    cl = _layout.strides_like_channels_last(a) or _layout.strides_like_channels_last(b)
    return _layout.empty(a, shape, cl)


def _fake_concat_backward(grad):
    shape = (grad.shape[0], grad.shape[1] // 2, *grad.shape[2:])
    cl = grad.dim() == 4 and _layout.is_channels_last(grad)
    return _layout.empty(grad, shape, cl), _layout.empty(grad, shape, cl)


def _concat_setup_context(ctx, inputs, output):
    pass


def _register(prefix: str = "") -> None:
    shuffle = getattr(torch.ops.fastdw, f"{prefix}channel_shuffle").default
    concat_backward = getattr(torch.ops.fastdw, f"{prefix}concat_shuffle_backward").default

    def shuffle_backward(ctx, grad):  # the inverse permutation is the shuffle with C / groups groups
        return shuffle(grad, ctx.inverse_groups), None

    def concat_shuffle_backward(ctx, grad):
        ga, gb = concat_backward(grad)
        return ga, gb

    torch.library.register_fake(f"fastdw::{prefix}channel_shuffle")(_fake_shuffle)
    torch.library.register_fake(f"fastdw::{prefix}concat_shuffle")(_fake_concat)
    torch.library.register_fake(f"fastdw::{prefix}concat_shuffle_backward")(_fake_concat_backward)
    if not prefix:  # the C++ ops' autograd is in C++ (csrc/autograd.cpp)
        return
    torch.library.register_autograd(f"fastdw::{prefix}channel_shuffle", shuffle_backward,
                                    setup_context=_shuffle_setup_context)
    torch.library.register_autograd(f"fastdw::{prefix}concat_shuffle", concat_shuffle_backward,
                                    setup_context=_concat_setup_context)


if _backend.extension_loaded():
    _register()
_backend.on_triton_load(lambda: _register("triton_"))
