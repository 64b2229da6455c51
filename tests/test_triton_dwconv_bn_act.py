"""fastdw.ops.dwconv_bn_act on the `triton` backend, against `reference` and nn.Sequential.

Without a GPU this runs the Triton kernels through the interpreter (TRITON_INTERPRET=1, set in
conftest), which is slow: the shapes are small, but every axis of test_dwconv_bn_act.py is covered
(train/eval, BN modes, activations, kernel 3/5/rectangular, stride 1/2, dilation, padding, bias,
both memory formats, batch 0), plus shuffled input, gradient subsets and low precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_memory_format, make_inputs, requires_triton
from test_dwconv_bn_act import (
    ACTIVATIONS,
    BN_MODES,
    SUBSETS,
    Case,
    check_case,
    check_compile_fullgraph,
    check_gradient_subset,
    check_opcheck_backward,
    check_opcheck_forward,
)

import fastdw
from fastdw.ops import dwconv_bn_act

pytestmark = requires_triton

CASES_F64 = [
    Case((2, 3, 7, 7), 3, training=True, bias=True, activation="relu6"),
    Case((2, 3, 7, 7), 3, training=False, bias=True, activation="relu6", channels_last=True),
    Case((1, 5, 9, 6), 5, stride=2, training=True, activation="silu"),
    Case((1, 5, 9, 6), 5, stride=2, training=False, activation="silu", channels_last=True, bn="noaffine"),
    Case((2, 8, 5, 9), 3, dilation=2, training=True, activation="hardswish", channels_last=True),
    Case((2, 8, 5, 9), 3, dilation=2, training=False, activation="hardswish", bn="nostats", bias=True),
    Case((2, 6, 8, 8), 3, stride=2, training=True, activation="relu", bn="noaffine", channels_last=True),
    Case((2, 6, 8, 8), 3, stride=2, training=False, activation="relu", bn="none", bias=True),
    Case((2, 4, 7, 6), (3, 5), padding=(2, 1), training=True, activation="none", bias=True),
    Case((2, 4, 7, 6), (5, 3), stride=(2, 1), dilation=(1, 2), padding=(2, 0), training=False,
         channels_last=True, activation="none"),
    Case((2, 17, 6, 6), 3, training=True, activation="silu", channels_last=True, bias=True, momentum=None),
    Case((1, 24, 3, 3), 3, training=False, activation="relu6", channels_last=True, bias=True),
    Case((2, 1, 6, 5), 3, training=True, activation="hardswish", bias=True),
    Case((2, 4, 6, 6), 3, padding=4, stride=2, training=True, activation="hardswish"),  # padding > kernel
    Case((3, 5, 1, 1), 3, training=True, activation="silu", channels_last=True),  # 1x1 spatial
    Case((2, 4, 1, 1), 3, padding=2, training=False, activation="relu"),  # 1x1 in, 3x3 out
    Case((2, 3, 9, 9), 5, dilation=2, padding=0, stride=2, training=True, bias=True),  # one output row
    Case((2, 9, 5, 4), 1, padding=0, training=True, bias=True, activation="relu", bn="nostats"),  # 1x1 kernel
    Case((0, 6, 5, 5), 3, training=False, activation="relu"),  # batch 0
    Case((0, 6, 5, 5), 3, training=True, bias=True, activation="silu", channels_last=True),
    Case((2, 4, 5, 5), 3, training=False, bn="nostats", activation="relu6", momentum=0.7),
]

CASES_F32 = [
    Case((2, 6, 7, 7), 3, training=True, bias=True, activation="hardswish"),
    Case((2, 6, 7, 7), 5, stride=2, training=False, channels_last=True, activation="silu"),
    Case((2, 16, 6, 6), 3, training=True, channels_last=True, activation="relu6", bn="noaffine"),
]


def test_cases_cover_every_axis():
    seen = {attr: {getattr(c, attr) for c in CASES_F64} for attr in ("bn", "activation", "kernel", "stride")}
    assert set(BN_MODES) <= seen["bn"] and set(ACTIVATIONS) <= seen["activation"]
    assert {3, 5, (3, 5)} <= seen["kernel"] and {1, 2} <= seen["stride"]


@pytest.mark.parametrize("case", CASES_F64, ids=str)
def test_float64(case):
    check_case(case, torch.float64, backend="triton")


@pytest.mark.parametrize("case", CASES_F32, ids=str)
def test_float32(case):
    check_case(case, torch.float32, backend="triton")


@pytest.mark.parametrize("case,which", SUBSETS[::2], ids=str)
def test_gradient_subsets(case, which):
    check_gradient_subset(case, which, "triton")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training,groups,stride", [(True, 3, 1), (False, 2, 2), (True, 4, 2)])
def test_shuffled_input(channels_last, training, groups, stride):
    """input_shuffle_groups=g: the kernels read channel c from its shuffled source (either format)."""
    inp = make_inputs(2, 12, 7, 6, dtype=torch.float64, channels_last=channels_last, bias=True)
    kw = dict(training=training, stride=stride, activation="hardswish")
    fused, ref = inp.clone(), inp.clone()
    with fastdw.use_backend("triton"):
        out = dwconv_bn_act(fused.x, fused.weight, fused.bias, fused.bn_weight, fused.bn_bias,
                            fused.running_mean, fused.running_var, input_shuffle_groups=groups, **kw)
    with fastdw.use_backend("reference"):
        want = dwconv_bn_act(F.channel_shuffle(ref.x, groups), ref.weight, ref.bias, ref.bn_weight,
                             ref.bn_bias, ref.running_mean, ref.running_var, **kw)
    assert_close(out, want, what="output")
    assert_same_memory_format(out, inp.x)
    go = torch.randn_like(want)
    got = torch.autograd.grad(out, list(fused.params().values()), go)
    expected = torch.autograd.grad(want, list(ref.params().values()), go)
    for name, g, e in zip(fused.params(), got, expected, strict=True):
        assert_close(g, e, what=f"grad {name}")
    assert_close(fused.running_var, ref.running_var, what="running_var")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_low_precision_smoke(dtype, training):
    """float16 / bfloat16 in, fp32 accumulation: close to the float64 reference at their precision."""
    inp = make_inputs(2, 8, 7, 7, dtype=torch.float64, channels_last=True, bias=True)
    low, ref = inp.clone(dtype), inp.clone()
    kw = dict(training=training, activation="silu")
    with fastdw.use_backend("triton"):
        out = dwconv_bn_act(low.x, low.weight, low.bias, low.bn_weight, low.bn_bias, low.running_mean,
                            low.running_var, **kw)
    with fastdw.use_backend("reference"):
        want = dwconv_bn_act(ref.x, ref.weight, ref.bias, ref.bn_weight, ref.bn_bias, ref.running_mean,
                             ref.running_var, **kw)
    assert out.dtype == dtype
    assert_same_memory_format(out, inp.x)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert_close(out.double(), want, tol=tol, what="output")
    go = torch.randn_like(want)
    got = torch.autograd.grad(out, list(low.params().values()), go.to(dtype))
    expected = torch.autograd.grad(want, list(ref.params().values()), go)
    for name, g, e in zip(low.params(), got, expected, strict=True):
        assert g.dtype == dtype
        assert_close(g.double(), e, tol=5 * tol, what=f"grad {name}")
    if training:
        assert_close(low.running_mean.double(), ref.running_mean, tol=tol, what="running_mean")
        assert_close(low.running_var.double(), ref.running_var, tol=tol, what="running_var")


@pytest.mark.parametrize("sample", ["eval-nchw-all", "train-cl-noaffine-nobias", "eval-rect-s2-d2",
                                    "train-float32"])
def test_opcheck(sample):
    """Schema, fake kernel (strides included), autograd registration of the Triton ops."""
    check_opcheck_forward(sample, "triton_")
    check_opcheck_backward(sample, "triton_")


@pytest.mark.parametrize("mode,channels_last,momentum", [("eval", True, 0.1), ("train", False, None)])
def test_compile_fullgraph(mode, channels_last, momentum):
    """Traced through the fake kernels; under the interpreter the op stays opaque in the graph."""
    check_compile_fullgraph(mode, channels_last, momentum, backend="triton")
