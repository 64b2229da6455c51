"""fastdw.ops.se_scale and fastdw.nn.SqueezeExcite against torchvision's and timm's SE modules."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_ext
from torch import nn

import fastdw
from fastdw import reference as ref

timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")
timm_se = pytest.importorskip("timm.layers.squeeze_excite")
tv_misc = pytest.importorskip("torchvision.ops.misc")

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}
GATES = {"hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}


def _random_shapes(count: int, seed: int = 0) -> list[tuple[int, int, int, int, int]]:
    """(N, C, S, H, W) with C up to 1024, including 1x1 spatial."""
    rng = random.Random(seed)
    shapes = [(1, 1024, 256, 1, 1), (3, 960, 240, 1, 1), (2, 72, 24, 9, 11), (1, 8, 2, 17, 3)]
    for _ in range(count):
        c = rng.choice([3, 16, 40, 72, 117, 240, 513, 1024])
        h, w = rng.choice([(1, 1), (2, 3), (7, 7), (5, 13), (14, 14)])
        shapes.append((rng.randint(1, 4), c, max(1, c // rng.choice([4, 8])), h, w))
    return shapes


SHAPES = _random_shapes(4)


def _tol(dtype: torch.dtype, gate: str = "sigmoid") -> dict:
    if dtype != torch.float64:
        return {"rtol": 2e-4, "atol": 2e-5}
    if gate == "hardsigmoid":
        # PyTorch's hardsigmoid backward multiplies by the float32 constant 1/6 even in float64
        # (relative error 3e-8, more after cancellation in sums); fastdw uses the exact 1/6.
        # Tight comparisons of that gate are against fastdw.reference (test_matches_reference).
        return {"rtol": 1e-6, "atol": 1e-7}
    return {"rtol": 1e-10, "atol": 1e-11}


def _input(n, c, h, w, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    return x.requires_grad_()


def _torchvision_se(c, s, act, gate, dtype, seed=1):
    torch.manual_seed(seed)
    se = tv_misc.SqueezeExcitation(c, s, activation=ACTS[act], scale_activation=GATES[gate]).to(dtype)
    with torch.no_grad():  # gates away from saturation, so gradients are not all ~0
        for p in se.parameters():
            p.mul_(3.0)
    return se


def _grads(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, call=None):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = (module if call is None else call)(x)
    y.backward(gy)
    return y, x.grad, {k: p.grad for k, p in module.named_parameters()}


def _assert_same(fused: nn.Module, orig: nn.Module, x: torch.Tensor) -> None:
    gy = torch.randn_like(x)
    y1, gx1, gp1 = _grads(fused, x, gy)
    y0, gx0, gp0 = _grads(orig, x, gy)
    tol = _tol(x.dtype, fused.gate)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    assert gp1.keys() == gp0.keys()
    for k in gp0:
        torch.testing.assert_close(gp1[k], gp0[k], **tol, msg=lambda m, k=k: f"grad of {k}: {m}")
    cl = torch.channels_last
    assert y1.is_contiguous(memory_format=cl) == x.is_contiguous(memory_format=cl)


# --- against torchvision and timm ----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_torchvision(backend, shape, fmt, dtype):
    n, c, s, h, w = shape
    for act, gate in (("relu", "hardsigmoid"), ("silu", "sigmoid")):
        se = _torchvision_se(c, s, act, gate, dtype)
        fused = fastdw.nn.SqueezeExcite.from_module(se)
        _assert_same(fused, se, _input(n, c, h, w, fmt, dtype))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_all_activations_and_gates(backend, act, gate, fmt):
    se = _torchvision_se(40, 10, act, gate, torch.float64)
    _assert_same(fastdw.nn.SqueezeExcite.from_module(se), se, _input(3, 40, 6, 5, fmt, torch.float64))


@requires_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference(shape, fmt):
    """The C++ kernels against fastdw.reference in float64, tightly, for every act and gate."""
    n, c, s, h, w = shape
    x = _input(n, c, h, w, fmt, torch.float64)
    gy = torch.randn_like(x)
    for act in ACTS:
        for gate in GATES:
            m = fastdw.nn.SqueezeExcite.from_module(_torchvision_se(c, s, act, gate, torch.float64))
            results = []
            for be in ("cpu", "reference"):
                with fastdw.use_backend(be):
                    y, gx, gp = _grads(m, x, gy)
                    results.append((y, gx, *gp.values()))
            for a, b in zip(*results, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_timm_squeeze_excite(backend, fmt, dtype, mode):
    # timm's MobileNetV3 and EfficientNet configurations of SqueezeExcite.
    configs = [dict(act_layer=nn.ReLU, gate_layer="hard_sigmoid"),
               dict(act_layer=nn.SiLU, gate_layer="sigmoid"),
               dict(act_layer="swish", gate_layer=nn.Sigmoid)]
    for i, cfg in enumerate(configs):
        torch.manual_seed(i)
        se = timm_blocks.SqueezeExcite(72, rd_ratio=0.25, **cfg).to(dtype)
        fused = fastdw.nn.SqueezeExcite.from_module(se)
        getattr(se, mode)()
        getattr(fused, mode)()
        _assert_same(fused, se, _input(2, 72, 7, 9, fmt, dtype, seed=i))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_timm_se_module(backend, fmt, bias):
    torch.manual_seed(0)
    se = timm_se.SEModule(64, rd_ratio=1 / 8, bias=bias).double()
    fused = fastdw.nn.SqueezeExcite.from_module(se)
    _assert_same(fused, se, _input(2, 64, 5, 5, fmt, torch.float64))


def test_state_dict_keys_and_shared_parameters():
    modules = [tv_misc.SqueezeExcitation(32, 8), timm_blocks.SqueezeExcite(32),
               timm_se.SEModule(32, rd_channels=8)]
    for se in modules:
        fused = fastdw.nn.SqueezeExcite.from_module(se)
        assert list(fused.state_dict()) == list(se.state_dict())
        for (k0, v0), (k1, v1) in zip(se.state_dict().items(), fused.state_dict().items(), strict=True):
            assert k0 == k1 and v0.data_ptr() == v1.data_ptr()
        fused.load_state_dict(se.state_dict())
    own = fastdw.nn.SqueezeExcite(32, 8)
    assert list(own.state_dict()) == list(tv_misc.SqueezeExcitation(32, 8).state_dict())
    own.load_state_dict(tv_misc.SqueezeExcitation(32, 8).state_dict())


def test_module_constructor_matches_functional(backend):
    torch.manual_seed(0)
    m = fastdw.nn.SqueezeExcite(24, 6, activation="silu", gate="sigmoid").double()
    x = torch.randn(2, 24, 5, 5, dtype=torch.float64)
    expect = ref.se_scale(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, "silu", "sigmoid")
    torch.testing.assert_close(m(x), expect, **_tol(torch.float64))


@requires_ext
def test_linear_weights_and_no_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    w1, w2 = torch.randn(4, 16, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    got = fastdw.ops.se_scale(x, w1, None, w2, None, activation="relu", gate="sigmoid")
    expect = ref.se_scale(x, w1, None, w2, None, "relu", "sigmoid")
    torch.testing.assert_close(got, expect, **_tol(torch.float64))


# --- autograd, kinks, opcheck, compile -----------------------------------------------------------


@requires_ext
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck(act, gate, fmt):
    torch.manual_seed(0)
    x = _input(2, 12, 3, 4, fmt, torch.float64)
    shapes = [(3, 12, 1, 1), (3,), (12, 3, 1, 1), (12,)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    f = lambda *a: fastdw.ops.se_scale(*a, activation=act, gate=gate)
    assert torch.autograd.gradcheck(f, (x, *params))


@requires_ext
def test_derivative_conventions_at_kinks():
    # h = 0 exactly (relu'(0) = 0) and z = +-3 exactly (hardsigmoid' = 0 there), as PyTorch.
    x = torch.ones(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    w1 = torch.zeros(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    b1 = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(4, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor([3.0, -3.0, 2.5, -2.5], dtype=torch.float64, requires_grad=True)
    grads = []
    for be in ("cpu", "reference"):
        with fastdw.use_backend(be):
            y = fastdw.ops.se_scale(x, w1, b1, w2, b2, activation="relu", gate="hardsigmoid")
            grads.append(torch.autograd.grad(y.sum(), (x, w1, b1, w2, b2)))
    for g_cpu, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_cpu, g_ref, rtol=0, atol=1e-15)


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    check_opcheck(fmt)


def check_opcheck(fmt: str, prefix: str = "") -> None:
    """opcheck of the C++ ops (prefix '') or their Triton twins (prefix 'triton_')."""
    op = getattr(torch.ops.fastdw, f"{prefix}se_scale").default
    backward = getattr(torch.ops.fastdw, f"{prefix}se_scale_backward").default
    torch.manual_seed(0)
    x = _input(2, 16, 3, 5, fmt, torch.float32)
    w1, b1 = torch.randn(4, 16, 1, 1, requires_grad=True), torch.randn(4, requires_grad=True)
    w2, b2 = torch.randn(16, 4, 1, 1, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(op, (x, w1, b1, w2, b2, "relu", "hardsigmoid"))
    torch.library.opcheck(op, (x, w1, None, w2, None, "silu", "sigmoid"))
    xd = x.detach()
    params = [t.detach() for t in (w1, b1, w2, b2)]
    _, pooled = op(xd, *params, "relu", "sigmoid")
    args = (torch.randn_like(xd), xd, pooled, *params, "relu", "sigmoid")
    for mask in ([True] * 5, [True, False, False, True, False], [False, True, True, False, False]):
        torch.library.opcheck(backward, (*args, mask))


@requires_ext
def test_compile_fullgraph():
    torch.manual_seed(0)
    se = _torchvision_se(24, 8, "relu", "hardsigmoid", torch.float32)
    fused = fastdw.nn.SqueezeExcite.from_module(se)
    compiled = torch.compile(fused, fullgraph=True)
    x = _input(2, 24, 5, 5, "nhwc", torch.float32)
    gy = torch.randn_like(x)
    y1, gx1, gp1 = _grads(fused, x, gy, call=compiled)
    y0, gx0, gp0 = _grads(se, x, gy)
    torch.testing.assert_close(y1, y0, **_tol(torch.float32))
    torch.testing.assert_close(gx1, gx0, **_tol(torch.float32))
    for k in gp0:
        torch.testing.assert_close(gp1[k], gp0[k], **_tol(torch.float32))


# --- kernels: every instruction set, thread counts, edge sizes -----------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_instruction_set(cpu_capability, fmt):
    for c, s in ((37, 9), (256, 64)):  # vector tails and full vectors
        for dtype in (torch.float32, torch.float64):
            se = _torchvision_se(c, s, "silu", "hardsigmoid", dtype)
            _assert_same(fastdw.nn.SqueezeExcite.from_module(se), se, _input(2, c, 5, 7, fmt, dtype))


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_result_does_not_depend_on_thread_count(fmt):
    se = fastdw.nn.SqueezeExcite.from_module(_torchvision_se(96, 24, "relu", "sigmoid", torch.float32))
    x = _input(1, 96, 56, 56, fmt, torch.float32)
    gy = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y, gx, gp = _grads(se, x, gy)
            results.append((y, gx, *gp.values()))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@requires_ext
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 1, 1), (1, 1, 1, 1)])
def test_edge_sizes(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w1, w2 = torch.randn(2, c, 1, 1, dtype=torch.float64), torch.randn(c, 2, 1, 1, dtype=torch.float64)
    y = fastdw.ops.se_scale(x, w1, None, w2, None, activation="relu", gate="sigmoid")
    torch.testing.assert_close(y, ref.se_scale(x, w1, None, w2, None, "relu", "sigmoid"))
    y.sum().backward()
    assert x.grad.shape == x.shape


@requires_ext
@pytest.mark.parametrize("shape, fmt", [((2, 12, 7), None), ((2, 12, 3, 2, 4), None),
                                        ((2, 12, 3, 2, 4), torch.channels_last_3d)])
def test_other_ranks(shape, fmt):
    """[N, C, *]: the mean is over every position (3-D sequences, 5-D volumes, channels_last_3d)."""
    x = torch.randn(shape, dtype=torch.float64)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    shapes = [(3, 12, 1, 1), (3,), (12, 3, 1, 1), (12,)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    gy = torch.randn_like(x)
    results = []
    for be in ("cpu", "reference"):
        with fastdw.use_backend(be):
            y = fastdw.ops.se_scale(x, *params, activation="silu", gate="hardsigmoid")
            results.append((y, *torch.autograd.grad(y, (x, *params), gy)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    if fmt is not None:
        assert results[0][0].is_contiguous(memory_format=fmt)


# --- bad input -----------------------------------------------------------------------------------


def _good():
    return dict(x=torch.randn(2, 8, 3, 3), fc1_weight=torch.randn(2, 8, 1, 1), fc1_bias=torch.randn(2),
                fc2_weight=torch.randn(8, 2, 1, 1), fc2_bias=torch.randn(8))


BAD = {
    "channel mismatch": (dict(x=torch.randn(2, 6, 3, 3)), ValueError, "fc1_weight"),
    "fc1 shape": (dict(fc1_weight=torch.randn(2, 8, 3, 3)), ValueError, "fc1_weight"),
    "fc2 shape": (dict(fc2_weight=torch.randn(8, 3, 1, 1)), ValueError, "fc2_weight"),
    "fc1 bias shape": (dict(fc1_bias=torch.randn(3)), ValueError, "fc1_bias"),
    "fc2 bias shape": (dict(fc2_bias=torch.randn(2, 4)), ValueError, "fc2_bias"),
    "2-D input": (dict(x=torch.randn(2, 8)), ValueError, "input"),
    "integer input": (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError, "input"),
    "integer weight": (dict(fc2_weight=torch.ones(8, 2, 1, 1, dtype=torch.int32)), TypeError, "fc2_weight"),
    "mixed dtype": (dict(fc1_weight=torch.randn(2, 8, 1, 1, dtype=torch.float64)), TypeError, "fc1_weight"),
    "mixed device": (dict(fc2_bias=torch.randn(8, device="meta")), RuntimeError, "fc2_bias"),
    "not a tensor": (dict(fc1_weight=[[1.0]]), TypeError, "fc1_weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(backend, case):
    change, exc, name = BAD[case]
    args = _good()
    args.update(change)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(exc, match=name):
        fastdw.ops.se_scale(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v)


@pytest.mark.parametrize("kw, name", [(dict(activation="gelu"), "activation"), (dict(gate="tanh"), "gate")])
def test_bad_activation_or_gate(kw, name):
    a = _good()
    with pytest.raises(ValueError, match=name):
        fastdw.ops.se_scale(a["x"], a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"], **kw)
    with pytest.raises(ValueError, match=name):
        fastdw.nn.SqueezeExcite(8, 2, **kw)


@requires_ext
def test_bad_input_reaching_the_cpp_op_raises_python_errors():
    a = _good()
    with pytest.raises(ValueError, match="fc2_weight"):
        torch.ops.fastdw.se_scale(a["x"], a["fc1_weight"], None, torch.randn(8, 3, 1, 1), None, "relu",
                                  "sigmoid")
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.fastdw.se_scale(a["x"].half(), a["fc1_weight"].half(), None, a["fc2_weight"].half(), None,
                                  "relu", "sigmoid")
    with pytest.raises(ValueError, match="gate"):
        torch.ops.fastdw.se_scale(a["x"], a["fc1_weight"], None, a["fc2_weight"], None, "relu", "tanh")
    with pytest.raises(ValueError, match="fc2_weight"):
        torch.ops.fastdw.se_scale(a["x"], a["fc1_weight"], None, torch.randn(8), None, "relu", "sigmoid")


def test_from_module_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="norm layer"):
        fastdw.nn.SqueezeExcite.from_module(timm_se.SEModule(32, rd_channels=8, norm_layer=nn.BatchNorm2d))
    with pytest.raises(ValueError, match="add_maxpool"):
        fastdw.nn.SqueezeExcite.from_module(timm_se.SEModule(32, rd_channels=8, add_maxpool=True))
    with pytest.raises(ValueError, match="activation GELU"):
        fastdw.nn.SqueezeExcite.from_module(tv_misc.SqueezeExcitation(32, 8, activation=nn.GELU))
    with pytest.raises(ValueError, match="gate Tanh"):
        fastdw.nn.SqueezeExcite.from_module(timm_blocks.SqueezeExcite(32, gate_layer=nn.Tanh))
    with pytest.raises(TypeError, match="cannot convert"):
        fastdw.nn.SqueezeExcite.from_module(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="cannot convert"):
        fastdw.nn.SqueezeExcite.from_module(timm_se.EffectiveSEModule(32))


def test_reference_matches_manual_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    w1, b1, w2, b2 = (torch.randn(2, 6, 1, 1, dtype=torch.float64), torch.randn(2, dtype=torch.float64),
                      torch.randn(6, 2, 1, 1, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    pooled = F.adaptive_avg_pool2d(x, 1)
    expect = x * F.hardsigmoid(F.conv2d(F.relu(F.conv2d(pooled, w1, b1)), w2, b2))
    torch.testing.assert_close(ref.se_scale(x, w1, b1, w2, b2, "relu", "hardsigmoid"), expect)
