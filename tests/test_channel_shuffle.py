"""fastdw.ops.channel_shuffle / concat_shuffle and helpers against torch.nn.functional.channel_shuffle."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_ext
from torch import nn

import fastdw

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def _divisors(c: int) -> list[int]:
    return [g for g in range(1, c + 1) if c % g == 0]


def _random_shapes(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """4-D (N, C, H, W) shapes with C up to 1024, including 1x1 spatial."""
    rng = random.Random(seed)
    shapes = [(1, 1024, 1, 1), (2, 116, 28, 28), (3, 24, 1, 1), (1, 6, 5, 7)]
    for _ in range(count):
        c = rng.choice([4, 12, 30, 58, 120, 240, 464, 1024])
        h, w = rng.choice([(1, 1), (3, 2), (7, 7), (14, 9)])
        shapes.append((rng.randint(1, 3), c, h, w))
    return shapes


SHAPES = _random_shapes(4)


def _x(shape, fmt="nchw", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    return x.contiguous(memory_format=FORMATS[fmt]) if x.dim() == 4 else x


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# --- channel_shuffle -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_functional_for_every_groups(backend, shape, fmt, dtype):
    x = _x(shape, fmt, DTYPES[dtype])
    for g in _divisors(shape[1]):
        y = fastdw.ops.channel_shuffle(x, g)
        assert torch.equal(y, F.channel_shuffle(x, g)), g
        assert _is_cl(y) == _is_cl(x)


@pytest.mark.parametrize("shape", [(2, 12, 5), (2, 12, 3, 2, 4), (1, 8, 1), (3, 6, 2, 2, 2, 2)])
def test_other_ranks(backend, shape):
    x = _x(shape, dtype=torch.float64)
    for g in _divisors(shape[1]):
        assert torch.equal(fastdw.ops.channel_shuffle(x, g), F.channel_shuffle(x, g))
    x5 = torch.randn(2, 12, 3, 2, 4).contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(fastdw.ops.channel_shuffle(x5, 3), F.channel_shuffle(x5, 3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_dense_input(backend, fmt):
    x = _x((2, 24, 9, 8), fmt)[:, :, 1:7, ::2]
    for g in (2, 3, 8):
        assert torch.equal(fastdw.ops.channel_shuffle(x, g), F.channel_shuffle(x, g))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("groups", [2, 4, 29, 58])
def test_gradient_is_inverse_permutation(backend, fmt, groups):
    x = _x((2, 116, 5, 3), fmt).requires_grad_()
    gy = _x((2, 116, 5, 3), fmt, seed=1)
    (gx,) = torch.autograd.grad(fastdw.ops.channel_shuffle(x, groups), x, gy)
    (expect,) = torch.autograd.grad(F.channel_shuffle(x, groups), x, gy)
    assert torch.equal(gx, expect)
    assert torch.equal(fastdw.ops.channel_shuffle(gy, 116 // groups), expect)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_module(backend, mode, fmt):
    for g in (2, 3, 6):
        ours = fastdw.nn.ChannelShuffle.from_module(nn.ChannelShuffle(g))
        theirs = nn.ChannelShuffle(g)
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x = _x((2, 24, 4, 4), fmt).requires_grad_()
        y0, y1 = theirs(x), ours(x)
        assert torch.equal(y0, y1)
        gy = torch.randn_like(y0)
        assert torch.equal(*(torch.autograd.grad(y, x, gy)[0] for y in (y0, y1)))
        assert ours.groups == g and "groups=" in repr(ours) and ours.state_dict() == {}


# --- concat_shuffle ------------------------------------------------------------------------------


def _concat_shuffle_ref(a, b):
    return F.channel_shuffle(torch.cat([a, b], 1), 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_shuffle(backend, shape, fmt, dtype):
    a, b = (_x(shape, fmt, DTYPES[dtype], seed=s).requires_grad_() for s in (0, 1))
    y = fastdw.ops.concat_shuffle(a, b)
    expect = _concat_shuffle_ref(a, b)
    assert torch.equal(y, expect)
    gy = torch.randn_like(expect)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(torch.autograd.grad(y, (a, b), gy),
                                                       torch.autograd.grad(expect, (a, b), gy), strict=True))
    if backend == "cpu":
        assert _is_cl(y) == _is_cl(a)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 4])
def test_concat_shuffle_of_channel_slices(backend, fmt, n):
    """ShuffleNetV2: the pass-through half is a channel slice of the block input, read in place."""
    x = _x((n, 116, 7, 5), fmt)
    x1, x2 = x.chunk(2, dim=1)
    b = (x2 * 2).contiguous(memory_format=FORMATS[fmt])
    y = fastdw.ops.concat_shuffle(x1, b)
    assert torch.equal(y, _concat_shuffle_ref(x1, b))
    if backend == "cpu":
        assert _is_cl(y) == (fmt == "nhwc")
    # other strided views, mixed layouts
    pairs = [(x2, x1), (x1, x2[:, :, :, :]), (x[:, ::2], x[:, 1::2]), (x1.transpose(2, 3), b.transpose(2, 3)),
             (x1.contiguous(), b.contiguous(memory_format=torch.channels_last))]
    for a2, b2 in pairs:
        assert torch.equal(fastdw.ops.concat_shuffle(a2, b2), _concat_shuffle_ref(a2, b2))


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 4, 3, 2, 2), (1, 3, 1)])
def test_concat_shuffle_other_ranks(backend, shape):
    a, b = (_x(shape, seed=s).requires_grad_() for s in (0, 1))
    y = fastdw.ops.concat_shuffle(a, b)
    assert torch.equal(y, _concat_shuffle_ref(a, b))
    channel_index = torch.arange(y.shape[1], dtype=y.dtype).view(1, -1, *[1] * (a.dim() - 2))
    ga, gb = torch.autograd.grad(y, (a, b), torch.ones_like(y) * channel_index)
    assert torch.equal(ga[0, :, ...].flatten(1)[:, 0], torch.arange(0, y.shape[1], 2, dtype=ga.dtype))
    assert torch.equal(gb[0, :, ...].flatten(1)[:, 0], torch.arange(1, y.shape[1], 2, dtype=gb.dtype))


# --- permutation helpers (ShuffleNetV1) ----------------------------------------------------------


@pytest.mark.parametrize("c", [6, 24, 240])
def test_shuffle_permutation(c):
    x = torch.randn(2, c, 3, 3)
    for g in _divisors(c):
        perm = fastdw.ops.shuffle_permutation(c, g)
        assert perm.dtype == torch.int64
        assert torch.equal(x[:, perm], F.channel_shuffle(x, g))
        inverse = fastdw.ops.shuffle_permutation(c, c // g)
        assert torch.equal(perm[inverse], torch.arange(c))


@pytest.mark.parametrize("k", [1, 3])
def test_shuffle_conv_weight(k):
    torch.manual_seed(0)
    x = torch.randn(2, 24, 6, 6, dtype=torch.float64)
    w = torch.randn(16, 24, k, k, dtype=torch.float64)
    for g in (2, 3, 4, 8):
        w2 = fastdw.ops.shuffle_conv_weight(w, g)
        y0 = F.conv2d(F.channel_shuffle(x, g), w, padding=k // 2)
        y1 = F.conv2d(x, w2, padding=k // 2)
        torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    # the same trick with the weights of a dense Linear over channels
    lin = torch.randn(5, 24, dtype=torch.float64)
    xs = torch.randn(7, 24, 1, dtype=torch.float64)
    torch.testing.assert_close(F.channel_shuffle(xs, 3)[..., 0] @ lin.t(),
                               xs[..., 0] @ fastdw.ops.shuffle_conv_weight(lin, 3).t())


# --- opcheck, gradcheck, compile, instruction sets, edge sizes ------------------------------------


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    check_opcheck(fmt)


def check_opcheck(fmt: str, prefix: str = "") -> None:
    """opcheck of the C++ ops (prefix '') or their Triton twins (prefix 'triton_')."""
    names = ("channel_shuffle", "concat_shuffle", "concat_shuffle_backward")
    shuffle, concat, concat_backward = (getattr(torch.ops.fastdw, prefix + name).default for name in names)
    x = _x((2, 12, 3, 5), fmt).requires_grad_()
    for g in (1, 2, 3, 12):
        torch.library.opcheck(shuffle, (x, g))
    torch.library.opcheck(shuffle, (_x((2, 12, 5)).requires_grad_(), 4))
    b = _x((2, 12, 3, 5), "nchw", seed=1).requires_grad_()
    torch.library.opcheck(concat, (x, b))
    x1 = _x((2, 24, 3, 5), fmt)[:, :12].requires_grad_()
    torch.library.opcheck(concat, (x1, b))
    torch.library.opcheck(concat_backward, (_x((2, 24, 3, 5), fmt),))


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck(fmt):
    x = _x((2, 12, 3, 2), fmt, torch.float64).requires_grad_()
    b = _x((2, 12, 3, 2), fmt, torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastdw.ops.channel_shuffle(t, 3), (x,))
    assert torch.autograd.gradcheck(fastdw.ops.concat_shuffle, (x, b))


@requires_ext
def test_compile_fullgraph():
    class Unit(nn.Module):  # a ShuffleNet-like body: shuffle, halves, concat + shuffle
        def __init__(self):
            super().__init__()
            self.shuffle = fastdw.nn.ChannelShuffle(4)
            self.conv = nn.Conv2d(12, 12, 1)

        def forward(self, x):
            x = self.shuffle(x)
            x1, x2 = x.chunk(2, dim=1)
            return fastdw.ops.concat_shuffle(x1, torch.relu(self.conv(x2)))

    torch.manual_seed(0)
    m = Unit()
    x = _x((2, 24, 5, 5), "nhwc").requires_grad_()
    compiled = torch.compile(m, fullgraph=True)
    y1 = compiled(x)
    (gx1,) = torch.autograd.grad(y1.sum(), x)
    with fastdw.use_backend("reference"):
        y0 = m(x)
    (gx0,) = torch.autograd.grad(y0.sum(), x)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)


def test_every_instruction_set(cpu_capability):
    for dtype in DTYPES.values():
        for fmt in FORMATS:
            for c in (2, 30, 64, 70):  # scalar tails and whole vectors
                x = _x((2, c, 3, 3), fmt, dtype)
                for g in _divisors(c):
                    assert torch.equal(fastdw.ops.channel_shuffle(x, g), F.channel_shuffle(x, g))
                b = _x((2, c, 3, 3), fmt, dtype, seed=1)
                y = fastdw.ops.concat_shuffle(x, b)
                assert torch.equal(y, _concat_shuffle_ref(x, b))
                ga, gb = torch.ops.fastdw.concat_shuffle_backward(y)
                assert torch.equal(ga, x) and torch.equal(gb, b)


@requires_ext
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (1, 2, 1, 1)])
def test_edge_sizes(shape):
    for fmt in FORMATS:
        x = _x(shape, fmt).requires_grad_()
        y = fastdw.ops.channel_shuffle(x, 2)
        assert torch.equal(y, F.channel_shuffle(x, 2))
        y.sum().backward()
        z = fastdw.ops.concat_shuffle(x, x)
        assert torch.equal(z, _concat_shuffle_ref(x, x))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, exc, match", [
    (5, ValueError, "groups"), (0, ValueError, "groups"), (-2, ValueError, "groups"),
    (2.0, TypeError, "groups"), (True, TypeError, "groups"), (None, TypeError, "groups"),
])
def test_bad_groups(backend, groups, exc, match):
    x = torch.randn(2, 12, 3, 3)
    with pytest.raises(exc, match=match):
        fastdw.ops.channel_shuffle(x, groups)
    with pytest.raises((ValueError, TypeError), match=match):
        fastdw.nn.ChannelShuffle(groups)(x)
    with pytest.raises((ValueError, TypeError), match=match):
        fastdw.ops.shuffle_permutation(12, groups)


def test_bad_tensors(backend):
    with pytest.raises(ValueError, match="input must have at least 3 dimensions"):
        fastdw.ops.channel_shuffle(torch.randn(4, 8), 2)
    with pytest.raises(TypeError, match="input"):
        fastdw.ops.channel_shuffle(torch.ones(2, 4, 3, 3, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="input"):
        fastdw.ops.channel_shuffle([[1.0]], 2)
    a = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        fastdw.ops.concat_shuffle(a, torch.randn(2, 6, 3, 3))
    with pytest.raises(TypeError, match="b has dtype"):
        fastdw.ops.concat_shuffle(a, a.double())
    with pytest.raises(RuntimeError, match="b is on meta"):
        fastdw.ops.concat_shuffle(a, torch.randn(2, 4, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="a must have a floating-point dtype"):
        fastdw.ops.concat_shuffle(a.long(), a.long())
    with pytest.raises(ValueError, match="b must have at least 3 dimensions"):
        fastdw.ops.concat_shuffle(a, torch.randn(2, 4))
    with pytest.raises(TypeError, match="weight"):
        fastdw.ops.shuffle_conv_weight(torch.ones(4, 6, 1, 1, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="groups"):
        fastdw.ops.shuffle_conv_weight(torch.ones(4, 6, 1, 1), 4)
    with pytest.raises(ValueError, match="channels"):
        fastdw.ops.shuffle_permutation(0, 1)


@requires_ext
def test_bad_input_reaching_the_cpp_ops_raises_python_errors():
    with pytest.raises(ValueError, match="groups"):
        torch.ops.fastdw.channel_shuffle(torch.randn(2, 6, 3, 3), 4)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.fastdw.channel_shuffle(torch.randn(2, 6, 3, 3), 0)
    with pytest.raises(ValueError, match="3 dimensions"):
        torch.ops.fastdw.channel_shuffle(torch.randn(2, 6), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.fastdw.channel_shuffle(torch.ones(2, 6, 3, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.fastdw.concat_shuffle(torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 2))
    with pytest.raises(ValueError, match="even"):
        torch.ops.fastdw.concat_shuffle_backward(torch.randn(2, 5, 3, 3))


# --- the direct entry point (fastdw._C.channel_shuffle, csrc/python_entry.cpp) -------------------


class _Sub(torch.Tensor):
    pass


class _Seen(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@requires_ext
def test_direct_entry_runs_the_op_for_the_plain_case_only():
    direct = fastdw._C.channel_shuffle
    for fmt in FORMATS:
        x = _x((2, 12, 3, 3), fmt)
        assert torch.equal(direct(x, 3), F.channel_shuffle(x, 3))
        p = nn.Parameter(x.clone())  # Parameter is a plain tensor to C++: direct, with autograd
        y = direct(p, 4)
        assert y is not None and y.grad_fn is not None
        (g,) = torch.autograd.grad(y, p, y)
        assert torch.equal(g, x)
    x = _x((2, 12, 3, 3))
    # Not the plain case, or rejected by the op: None, and the caller's checked path runs.
    for args in [(x, True), (x, 3.0), (x, 2 ** 70), (x, 5), (x, 0), (x.long(), 3), (x.half(), 3),
                 (x[0, 0], 1), (x.as_subclass(_Sub), 3), ([[1.0]], 1), (x,), (x, 3, 1)]:
        assert direct(*args) is None, args
    with _Seen():
        assert direct(x, 3) is None


@requires_ext
def test_ops_channel_shuffle_honours_torch_function_modes_and_fake_tensors():
    x = _x((2, 12, 3, 3))
    with _Seen() as mode:
        y = fastdw.ops.channel_shuffle(x, 3)
    assert torch.equal(y, F.channel_shuffle(x, 3))
    assert torch.ops.fastdw.channel_shuffle.default in mode.funcs
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake_mode = FakeTensorMode()
    fx = fake_mode.from_tensor(x.contiguous(memory_format=torch.channels_last))
    with fake_mode:
        fy = fastdw.ops.channel_shuffle(fx, 3)
    assert fy.shape == x.shape and fy.is_contiguous(memory_format=torch.channels_last)
