"""fastdw.ops.se_scale on the `triton` backend (the interpreter without a GPU), small shapes:
against torchvision's SqueezeExcitation and, tightly in float64, against `reference`."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, requires_triton
from test_se_scale import ACTS, FORMATS, GATES, _assert_same, _input, _torchvision_se, check_opcheck

import fastdw

pytestmark = requires_triton

SHAPES = [(2, 12, 3, 5, 4), (1, 40, 10, 1, 1), (2, 72, 24, 3, 3), (3, 5, 2, 2, 7)]


def _params(c, s, bias=True, linear=False, dtype=torch.float64, scale=1.0):
    shapes = [(s, c) if linear else (s, c, 1, 1), (s,), (c, s) if linear else (c, s, 1, 1), (c,)]
    ps = [torch.randn(sh, dtype=torch.float64) * scale for sh in shapes]
    if not bias:
        ps[1] = ps[3] = None
    return [p.to(dtype).requires_grad_() if p is not None else None for p in ps]


def _compare(x, params, act, gate, tol=1e-10, want=("x", "w1", "b1", "w2", "b2")):
    """Output and every requested gradient of triton vs reference (float64 reference on the same values)."""
    names = ("x", "w1", "b1", "w2", "b2")
    results = {}
    gy = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    for be in ("triton", "reference"):
        leaves = [t.detach().clone(memory_format=torch.preserve_format) if t is not None else None
                  for t in (x, *params)]
        if be == "reference":
            leaves = [t.double() if t is not None else None for t in leaves]
        for name, t in zip(names, leaves, strict=True):
            if t is not None:
                t.requires_grad_(name in want)
        with fastdw.use_backend(be):
            y = fastdw.ops.se_scale(*leaves, activation=act, gate=gate)
        inputs = [t for name, t in zip(names, leaves, strict=True) if t is not None and name in want]
        results[be] = (y, *torch.autograd.grad(y, inputs, gy.to(y.dtype)))
    got, expected = results["triton"], results["reference"]
    assert got[0].dtype == x.dtype
    cl = torch.channels_last
    assert got[0].is_contiguous(memory_format=cl) == x.is_contiguous(memory_format=cl)
    for a, b in zip(got, expected, strict=True):
        assert_close(a.double(), b, tol=tol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_torchvision(shape, fmt, dtype):
    n, c, s, h, w = shape
    with fastdw.use_backend("triton"):
        for act, gate in (("relu", "hardsigmoid"), ("silu", "sigmoid")):
            se = _torchvision_se(c, s, act, gate, dtype)
            _assert_same(fastdw.nn.SqueezeExcite.from_module(se), se, _input(n, c, h, w, fmt, dtype))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(act, gate, fmt, bias):
    x = _input(2, 20, 3, 4, fmt, torch.float64)
    _compare(x, _params(20, 6, bias=bias, scale=1.5), act, gate)


@pytest.mark.parametrize("want", [("x",), ("w1",), ("b1", "b2"), ("w2",), ("w1", "b1", "w2", "b2")], ids=str)
def test_gradient_subsets(want):
    x = _input(2, 12, 3, 3, "nhwc", torch.float64)
    _compare(x, _params(12, 4, linear=True), "silu", "sigmoid", want=want)


def test_derivative_conventions_at_kinks():
    # h = 0 exactly (relu'(0) = 0) and z = +-3 exactly (hardsigmoid' = 0 there), as PyTorch.
    x = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    w1, w2 = torch.zeros(2, 4, 1, 1, dtype=torch.float64), torch.zeros(4, 2, 1, 1, dtype=torch.float64)
    b1 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    b2 = torch.tensor([3.0, -3.0, 2.5, -2.5], dtype=torch.float64)
    _compare(x, [w1, b1, w2, b2], "relu", "hardsigmoid", tol=1e-15)


@pytest.mark.parametrize("shape, fmt", [((2, 12, 7), None), ((2, 12, 3, 2, 4), None),
                                        ((2, 12, 3, 2, 4), torch.channels_last_3d)])
def test_other_ranks(shape, fmt):
    x = torch.randn(shape, dtype=torch.float64)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    _compare(x, _params(12, 3), "silu", "hardsigmoid")
    if fmt is not None:
        with fastdw.use_backend("triton"):
            assert fastdw.ops.se_scale(x, *_params(12, 3)).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 1, 1), (1, 1, 1, 1)])
def test_edge_sizes(shape):
    _compare(torch.randn(shape, dtype=torch.float64), _params(shape[1], 2), "relu", "sigmoid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_smoke(dtype):
    x = _input(2, 16, 4, 4, "nhwc", torch.float64).detach().to(dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    _compare(x, _params(16, 4, dtype=dtype), "relu", "hardsigmoid", tol=tol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    check_opcheck(fmt, "triton_")
