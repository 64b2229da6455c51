"""Bad input: a clear Python exception naming the problem, never a crash, and no side effects.

Every failing call must leave parameters and running statistics exactly as they were (the op
checks everything before it touches a buffer).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, requires_ext
from torch import nn

import fastdw
from fastdw.nn import DWConvBNAct
from fastdw.ops import dwconv_bn_act

C = 4


def good_args(**overrides):
    """Arguments of a valid training-mode call that updates running stats (momentum=None: the
    counter is used, so any early increment of num_batches_tracked would show)."""
    inp = make_inputs(2, C, 6, 6, bias=True)
    args = dict(
        x=inp.x,
        weight=inp.weight,
        bias=inp.bias,
        bn_weight=inp.bn_weight,
        bn_bias=inp.bn_bias,
        running_mean=inp.running_mean,
        running_var=inp.running_var,
        training=True,
        momentum=None,
        eps=1e-5,
        stride=1,
        padding=None,
        dilation=1,
        activation="relu6",
        num_batches_tracked=inp.num_batches_tracked,
    )
    args.update(overrides)
    return args


def call(args):
    a = dict(args)
    x, weight = a.pop("x"), a.pop("weight")
    positional = [a.pop(k) for k in ("bias", "bn_weight", "bn_bias", "running_mean", "running_var")]
    return dwconv_bn_act(x, weight, *positional, **a)


def snapshot(args):
    return {
        k: v.detach().clone()
        for k, v in args.items()
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }


def assert_unchanged(args, before):
    for k, v in before.items():
        now = args[k]
        assert torch.equal(now.detach(), v), f"{k} was modified by a failing call"
        if isinstance(now, torch.Tensor) and now.requires_grad and now.is_leaf:  # (a view has no .grad)
            assert now.grad is None, f"{k} got a gradient from a failing call"


def _int(t):
    return t.detach().round().to(torch.int64)


def _meta(t):
    return t.detach().to("meta")


# (id, overrides made from the good arguments, expected exception, message regex)
BAD = [
    ("input-3d", lambda a: dict(x=a["x"][0]), ValueError, r"input must be 4-D"),
    ("input-5d", lambda a: dict(x=a["x"][None]), ValueError, r"input must be 4-D"),
    ("input-2d", lambda a: dict(x=a["x"][0, 0]), ValueError, r"input must be 4-D"),
    (
        "channels-mismatch",
        lambda a: dict(x=torch.randn(2, C + 1, 6, 6, dtype=torch.float64)),
        ValueError,
        r"weight must have shape \[C, 1, kh, kw\] with C = 5",
    ),
    (
        "weight-not-depthwise",
        lambda a: dict(weight=torch.randn(C, 2, 3, 3, dtype=torch.float64)),
        ValueError,
        r"weight must have shape \[C, 1, kh, kw\]",
    ),
    (
        "weight-3d",
        lambda a: dict(weight=torch.randn(C, 3, 3, dtype=torch.float64)),
        ValueError,
        r"weight must have shape \[C, 1, kh, kw\]",
    ),
    (
        "weight-full-conv",
        lambda a: dict(weight=torch.randn(C, C, 3, 3, dtype=torch.float64)),
        ValueError,
        r"weight must have shape",
    ),
    (
        "weight-empty-kernel",
        lambda a: dict(weight=torch.randn(C, 1, 0, 3, dtype=torch.float64)),
        ValueError,
        r"kernel size",
    ),
    (
        "input-int",
        lambda a: dict(x=_int(a["x"])),
        TypeError,
        r"input must have a floating-point dtype.*int64",
    ),
    (
        "input-uint8",
        lambda a: dict(x=_int(a["x"]).abs().to(torch.uint8)),
        TypeError,
        r"input must have a floating-point dtype",
    ),
    (
        "weight-int",
        lambda a: dict(weight=_int(a["weight"]).to(torch.int32)),
        TypeError,
        r"weight must have a floating-point dtype",
    ),
    ("bias-int", lambda a: dict(bias=_int(a["bias"])), TypeError, r"bias must have a floating-point dtype"),
    (
        "running-mean-int",
        lambda a: dict(running_mean=_int(a["running_mean"])),
        TypeError,
        r"running_mean must have a floating-point dtype",
    ),
    (
        "dtype-mismatch-weight",
        lambda a: dict(weight=a["weight"].detach().float()),
        TypeError,
        r"weight has dtype torch.float32 but the input has dtype torch.float64",
    ),
    (
        "dtype-mismatch-input",
        lambda a: dict(x=a["x"].detach().float()),
        TypeError,
        r"weight has dtype torch.float64 but the input has dtype torch.float32",
    ),
    ("dtype-mismatch-bias", lambda a: dict(bias=a["bias"].detach().float()), TypeError, r"bias has dtype"),
    (
        "device-weight",
        lambda a: dict(weight=_meta(a["weight"])),
        RuntimeError,
        r"weight is on meta but the input is on cpu",
    ),
    (
        "device-input",
        lambda a: dict(x=_meta(a["x"])),
        RuntimeError,
        r"weight is on cpu but the input is on meta",
    ),
    ("device-bias", lambda a: dict(bias=_meta(a["bias"])), RuntimeError, r"bias is on meta"),
    (
        "device-bn-weight",
        lambda a: dict(bn_weight=_meta(a["bn_weight"])),
        RuntimeError,
        r"bn_weight is on meta",
    ),
    (
        "device-running-var",
        lambda a: dict(running_var=_meta(a["running_var"])),
        RuntimeError,
        r"running_var is on meta",
    ),
    ("stride-0", lambda a: dict(stride=0), ValueError, r"stride must be >= 1"),
    ("stride-negative", lambda a: dict(stride=(1, -2)), ValueError, r"stride must be >= 1"),
    ("stride-float", lambda a: dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints"),
    ("stride-triple", lambda a: dict(stride=(1, 1, 1)), TypeError, r"stride must be an int or a pair"),
    ("dilation-0", lambda a: dict(dilation=0), ValueError, r"dilation must be >= 1"),
    ("dilation-negative", lambda a: dict(dilation=(-1, 1)), ValueError, r"dilation must be >= 1"),
    ("padding-negative", lambda a: dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("padding-negative-pair", lambda a: dict(padding=(0, -3)), ValueError, r"padding must be >= 0"),
    ("input-too-small", lambda a: dict(x=a["x"][:, :, :2, :2], padding=0), ValueError, r"too small"),
    (
        "one-value-per-channel",
        lambda a: dict(x=a["x"][:1, :, :1, :1]),
        ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    (
        "one-value-per-channel-strided",
        lambda a: dict(x=a["x"][:1, :, :3, :3], stride=3, padding=0),
        ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    (
        "unknown-activation",
        lambda a: dict(activation="gelu"),
        ValueError,
        r"activation must be one of.*'gelu'",
    ),
    ("activation-not-str", lambda a: dict(activation=None), ValueError, r"activation must be one of"),
    ("activation-case", lambda a: dict(activation="ReLU"), ValueError, r"activation must be one of"),
    (
        "bias-shape",
        lambda a: dict(bias=torch.randn(C + 1, dtype=torch.float64)),
        ValueError,
        r"bias must have shape \[4\]",
    ),
    (
        "bn-weight-shape",
        lambda a: dict(bn_weight=torch.randn(1, C, dtype=torch.float64)),
        ValueError,
        r"bn_weight must have shape \[4\]",
    ),
    (
        "running-mean-shape",
        lambda a: dict(running_mean=torch.randn(C - 1, dtype=torch.float64)),
        ValueError,
        r"running_mean must have shape \[4\]",
    ),
    ("mean-without-var", lambda a: dict(running_var=None), ValueError, r"running_mean and running_var"),
    ("eps-zero", lambda a: dict(eps=0.0), ValueError, r"eps must be a positive number"),
    ("eps-negative", lambda a: dict(eps=-1e-5), ValueError, r"eps must be a positive number"),
    (
        "momentum-none-without-counter",
        lambda a: dict(num_batches_tracked=None),
        ValueError,
        r"num_batches_tracked",
    ),
    ("input-not-tensor", lambda a: dict(x=a["x"].tolist()), TypeError, r"input must be a torch.Tensor"),
    (
        "bn-params-without-stats-in-eval",
        lambda a: dict(training=False, running_mean=None, running_var=None),
        ValueError,
        r"bn_weight/bn_bias given without BatchNorm statistics",
    ),
]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "triton"])
@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(backend, make, exc, match):
    if backend in ("cpu", "triton") and not fastdw.backends()[backend]:
        pytest.skip(f"{backend} backend not usable here")
    args = good_args()
    args.update(make(args))
    before = snapshot(args)
    with fastdw.use_backend(backend), pytest.raises(exc, match=match):
        call(args)
    assert_unchanged(args, before)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "triton"])
def test_good_args_are_good(backend):
    """The base of every bad case works, so each failure above is caused by the one change."""
    if backend in ("cpu", "triton") and not fastdw.backends()[backend]:
        pytest.skip(f"{backend} backend not usable here")
    args = good_args()
    with fastdw.use_backend(backend):
        call(args)
    assert int(args["num_batches_tracked"]) == 1


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forced_cpu_backend_unsupported_dtype_has_no_side_effects(dtype):
    """The cpu backend supports float32/float64 only: a clear TypeError, and the running statistics
    (num_batches_tracked included) are untouched."""
    args = good_args()
    args = {
        k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
        for k, v in args.items()
    }
    before = snapshot(args)
    with (
        fastdw.use_backend("cpu"),
        pytest.raises(TypeError, match=r"backend 'cpu' supports float32 and float64"),
    ):
        call(args)
    assert_unchanged(args, before)


@requires_ext
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_unavailable_backend_has_no_side_effects(backend):
    if fastdw.backends()[backend]:
        pytest.skip(f"{backend} is available here")
    args = good_args()
    before = snapshot(args)
    with fastdw.use_backend(backend), pytest.raises(RuntimeError, match=backend):
        call(args)
    assert_unchanged(args, before)


def test_unknown_backend_name():
    before = fastdw.get_backend()
    for name in ("gpu", "CPU", "", None, 1):
        with pytest.raises(ValueError, match=r"unknown backend"):
            fastdw.set_backend(name)
        assert fastdw.get_backend() == before
        with pytest.raises(ValueError, match=r"unknown backend"):
            with fastdw.use_backend(name):
                pass
        assert fastdw.get_backend() == before


# ---- through the module ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randn(4, 7, 7, dtype=torch.float64), ValueError, r"input must be 4-D"),
        (torch.randn(2, 5, 7, 7, dtype=torch.float64), ValueError, r"weight must have shape"),
        (torch.randn(2, 4, 7, 7, dtype=torch.float32), TypeError, r"dtype"),
        (torch.randint(0, 5, (2, 4, 7, 7)), TypeError, r"floating-point"),
        (torch.randn(1, 4, 1, 1, dtype=torch.float64), ValueError, r"more than 1 value per channel"),
        (torch.randn(2, 4, 7, 7, dtype=torch.float64, device="meta"), RuntimeError, r"meta"),
    ],
    ids=["3d", "channels", "dtype", "int", "one-value", "device"],
)
def test_module_bad_input(x, exc, match):
    m = DWConvBNAct(4, momentum=None).double()
    with torch.no_grad():
        m[1].running_mean.normal_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=match):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failing call"


# ---- the C++ op called directly -------------------------------------------------------------------


def _direct_args(training=True, **overrides):
    inp = make_inputs(2, C, 6, 6, bias=True, requires_grad=False)
    args = dict(
        x=inp.x,
        weight=inp.weight,
        bias=inp.bias,
        bn_weight=inp.bn_weight,
        bn_bias=inp.bn_bias,
        mean=inp.running_mean,
        var=inp.running_var,
        training=training,
        eps=1e-5,
        stride=[1, 1],
        padding=[1, 1],
        dilation=[1, 1],
        activation="relu6",
    )
    args.update(overrides)
    return args


def _direct(args):
    return torch.ops.fastdw.dwconv_bn_act(*args.values())


DIRECT_BAD = [
    ("input-3d", lambda a: dict(x=a["x"][0]), r"4-D"),
    ("input-int", lambda a: dict(x=a["x"].round().long()), r"float32 or float64"),
    ("input-half", lambda a: dict(x=a["x"].half(), weight=a["weight"].half()), r"float32 or float64"),
    ("weight-dtype", lambda a: dict(weight=a["weight"].float()), r"weight dtype"),
    (
        "weight-shape",
        lambda a: dict(weight=torch.randn(C, 2, 3, 3, dtype=torch.float64)),
        r"weight must have shape",
    ),
    (
        "channels",
        lambda a: dict(x=torch.randn(2, C + 2, 6, 6, dtype=torch.float64)),
        r"weight must have shape",
    ),
    (
        "kernel-0",
        lambda a: dict(weight=torch.randn(C, 1, 3, 0, dtype=torch.float64)),
        r"weight must have shape",
    ),
    ("stride-0", lambda a: dict(stride=[0, 1]), r"stride"),
    ("dilation-0", lambda a: dict(dilation=[1, 0]), r"dilation"),
    ("padding-negative", lambda a: dict(padding=[-1, 0]), r"padding"),
    ("stride-len-3", lambda a: dict(stride=[1, 1, 1]), r"stride|2"),
    ("too-small", lambda a: dict(x=a["x"][:, :, :2, :2], padding=[0, 0]), r"too small"),
    ("activation", lambda a: dict(activation="gelu"), r"unknown activation 'gelu'"),
    ("bias-shape", lambda a: dict(bias=torch.randn(C + 1, dtype=torch.float64)), r"bias must have shape"),
    ("bias-int", lambda a: dict(bias=torch.ones(C, dtype=torch.int64)), r"bias must be floating point"),
    ("mean-shape", lambda a: dict(mean=torch.randn(2, C, dtype=torch.float64)), r"mean must have shape"),
    ("mean-without-var", lambda a: dict(var=None), r"together"),
    ("one-value", lambda a: dict(x=a["x"][:1, :, :1, :1]), r"more than 1 value per channel"),
    ("device-weight", lambda a: dict(weight=a["weight"].to("meta")), r"meta"),
    ("device-mean", lambda a: dict(mean=a["mean"].to("meta"), training=False), r"meta"),
]


@requires_ext
@pytest.mark.parametrize("make,match", [b[1:] for b in DIRECT_BAD], ids=[b[0] for b in DIRECT_BAD])
def test_direct_op_bad_input(make, match):
    args = _direct_args()
    args.update(make(args))
    before = snapshot(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _direct(args)
    assert_unchanged(args, before)


def _backward_args(**overrides):
    fwd = _direct_args()
    out, mean, var = _direct(fwd)
    args = dict(
        grad_out=torch.randn_like(out),
        x=fwd["x"],
        weight=fwd["weight"],
        bias=fwd["bias"],
        bn_weight=fwd["bn_weight"],
        bn_bias=fwd["bn_bias"],
        mean=mean,
        var=var,
        training=True,
        eps=1e-5,
        stride=[1, 1],
        padding=[1, 1],
        dilation=[1, 1],
        activation="relu6",
        output_mask=[True, True, True, True, True],
    )
    args.update(overrides)
    return args


DIRECT_BACKWARD_BAD = [
    ("grad-out-shape", lambda a: dict(grad_out=a["grad_out"][:, :, :-1]), r"grad_out has shape"),
    ("grad-out-3d", lambda a: dict(grad_out=a["grad_out"][0]), r"grad_out has shape"),
    (
        "training-without-stats",
        lambda a: dict(mean=None, var=None),
        r"training needs the saved batch mean/var",
    ),
    ("training-empty-stats", lambda a: dict(mean=a["mean"][:0], var=a["var"][:0]), r"mean|batch"),
    ("input-3d", lambda a: dict(x=a["x"][0]), r"4-D"),
    ("weight-shape", lambda a: dict(weight=a["weight"][:, :, :2]), r"grad_out has shape|weight"),
    ("activation", lambda a: dict(activation="tanh"), r"unknown activation"),
    ("stride-0", lambda a: dict(stride=[1, 0]), r"stride"),
    ("var-shape", lambda a: dict(var=a["var"][:-1]), r"var must have shape"),
    ("device-grad-out", lambda a: dict(grad_out=a["grad_out"].to("meta")), r"meta"),
    ("out-shape", lambda a: dict(shuffle_groups=1, out=a["grad_out"][:, :, :-1]), r"out has shape"),
    ("out-dtype", lambda a: dict(shuffle_groups=1, out=a["grad_out"].float()), r"out has dtype"),
    ("out-device", lambda a: dict(shuffle_groups=1, out=a["grad_out"].to("meta")), r"meta"),
]


@requires_ext
@pytest.mark.parametrize(
    "make,match", [b[1:] for b in DIRECT_BACKWARD_BAD], ids=[b[0] for b in DIRECT_BACKWARD_BAD]
)
def test_direct_backward_op_bad_input(make, match):
    args = _backward_args()
    args.update(make(args))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.fastdw.dwconv_bn_act_backward(*args.values())


def test_module_buffers_on_other_device():
    """BN buffers on another device than the input: a clear error, nothing modified."""
    m = DWConvBNAct(C).double()
    m[1].running_mean = m[1].running_mean.to("meta")
    nbt = m[1].num_batches_tracked.clone()
    with pytest.raises(RuntimeError, match=r"running_mean is on meta"):
        m(torch.randn(2, C, 5, 5, dtype=torch.float64))
    assert torch.equal(m[1].num_batches_tracked, nbt)
    assert isinstance(m[0], nn.Conv2d)
