"""fastdw.nn.DWConvBNAct: a drop-in for torchvision's Conv2dNormActivation (depthwise)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, assert_same_memory_format, requires_ext
from torch import nn

import fastdw
from fastdw.nn import DWConvBNAct

torchvision = pytest.importorskip("torchvision")
Conv2dNormActivation = torchvision.ops.Conv2dNormActivation

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and running statistics (fresh BN is the identity in eval)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
                if m.track_running_stats:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.5)
    return module


def torchvision_block(c, k=3, stride=1, dilation=1, act=nn.ReLU6, bias=None):
    return Conv2dNormActivation(
        c,
        c,
        k,
        stride=stride,
        groups=c,
        dilation=dilation,
        norm_layer=nn.BatchNorm2d,
        activation_layer=act,
        bias=bias,
    )


def rand_x(n=2, c=8, h=9, w=7, channels_last=False, dtype=torch.float64):
    x = torch.randn(n, c, h, w, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def params_and_buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def check_forward_backward(fused: nn.Module, ref: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Same outputs, input/parameter gradients and buffers as `ref` over a few steps."""
    for step in range(steps):
        xf = (x + step).detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        xr = (x + step).detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        out, expected = fused(xf), ref(xr)
        assert_close(out, expected, what=f"output step {step}")
        assert_same_memory_format(out, x)
        go = torch.randn_like(expected)
        out.backward(go)
        expected.backward(go)
        assert_close(xf.grad, xr.grad, what="grad input")
        fp, rp = dict(fused.named_parameters()), dict(ref.named_parameters())
        assert fp.keys() == rp.keys()
        for k in fp:
            assert_close(fp[k].grad, rp[k].grad, what=f"grad {k}")
        fb, rb = dict(fused.named_buffers()), dict(ref.named_buffers())
        assert fb.keys() == rb.keys()
        for k in fb:
            assert_close(fb[k], rb[k], what=f"buffer {k} step {step}")
        fused.zero_grad()
        ref.zero_grad()


# ---- state_dict compatibility with torchvision --------------------------------------------------


@pytest.mark.parametrize("c", [1, 8, 32])
def test_state_dict_keys_match_torchvision(c):
    ours = DWConvBNAct(c)
    theirs = torchvision_block(c)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
        assert ours.state_dict()[k].dtype == v.dtype, k
    assert isinstance(ours, nn.Sequential)
    assert (
        isinstance(ours[0], nn.Conv2d)
        and isinstance(ours[1], nn.BatchNorm2d)
        and isinstance(ours[2], nn.ReLU6)
    )


def test_load_state_dict_both_ways():
    c = 12
    theirs = randomise(torchvision_block(c)).double()
    ours = DWConvBNAct(c).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours2 = randomise(DWConvBNAct(c)).double()
    ours2[1].num_batches_tracked.fill_(7)
    theirs2 = torchvision_block(c).double()
    theirs2.load_state_dict(ours2.state_dict(), strict=True)
    for k, v in ours2.state_dict().items():
        assert torch.equal(theirs2.state_dict()[k], v), k


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "k,stride,dilation,act,activation",
    [
        (3, 1, 1, nn.ReLU6, "relu6"),
        (3, 2, 1, nn.ReLU, "relu"),
        (5, 1, 2, nn.Hardswish, "hardswish"),
        (7, 2, 1, nn.SiLU, "silu"),
        (3, 1, 1, None, "none"),
    ],
)
def test_outputs_equal_torchvision(channels_last, k, stride, dilation, act, activation):
    c = 10
    theirs = randomise(torchvision_block(c, k, stride, dilation, act)).double()
    ours = DWConvBNAct(c, k, stride, dilation=dilation, activation=activation).double()
    ours.load_state_dict(theirs.state_dict())
    x = rand_x(3, c, 11, 8, channels_last)
    # train: batch statistics, running-stat updates and gradients
    check_forward_backward(ours.train(), theirs.train(), x)
    # eval: running statistics
    check_forward_backward(ours.eval(), theirs.eval(), x, steps=1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_module(channels_last):
    c = 16
    theirs = randomise(torchvision_block(c, act=nn.Hardswish))
    ours = DWConvBNAct(c, activation="hardswish")
    ours.load_state_dict(theirs.state_dict())
    x = rand_x(2, c, 10, 9, channels_last, dtype=torch.float32)
    check_forward_backward(ours.train(), theirs.train(), x)
    check_forward_backward(ours.eval(), theirs.eval(), x, steps=1)


def test_momentum_none_cumulative_average():
    c = 6
    ours = DWConvBNAct(c, momentum=None, activation="silu").double()
    ref = nn.Sequential(
        nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c, momentum=None), nn.SiLU()
    ).double()
    randomise(ref)
    ours.load_state_dict(ref.state_dict())
    check_forward_backward(ours, ref, rand_x(3, c, 6, 6), steps=4)
    assert int(ours[1].num_batches_tracked) == 4


def test_train_eval_switch():
    c = 8
    ours = randomise(DWConvBNAct(c, activation="relu")).double()
    ref = copy.deepcopy(ours)
    # the reference computes with the unfused modules (the Sequential's own forward)
    ref_forward = lambda m, x: nn.Sequential.forward(m, x)
    x = rand_x(4, c, 7, 7)
    assert ours.training and ours[1].training
    out_train = ours(x)
    assert_close(out_train, ref_forward(ref, x))
    assert int(ours[1].num_batches_tracked) == 1
    ours.eval()
    ref.eval()
    assert not ours.training and not ours[1].training
    stats = {k: v.clone() for k, v in ours.named_buffers()}
    out_eval = ours(x)
    assert_close(out_eval, ref_forward(ref, x))
    assert not torch.allclose(out_eval, out_train), "eval must use running statistics, not batch statistics"
    for k, v in ours.named_buffers():
        assert torch.equal(v, stats[k]), f"{k} changed in eval"
    ours.train()
    ref.train()
    assert_close(ours(x), ref_forward(ref, x))
    assert int(ours[1].num_batches_tracked) == 2


@pytest.mark.parametrize("activation", ["relu6", "none", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_no_bn(activation, bias):
    c = 7
    ours = randomise(DWConvBNAct(c, 5, stride=2, activation=activation, bn=False, bias=bias)).double()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert all(not k.startswith("1.running") for k in ours.state_dict())
    ref = copy.deepcopy(ours)
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        x = rand_x(2, c, 9, 8).requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        out = ours(x)
        expected = nn.Sequential.forward(ref, xr)
        assert_close(out, expected)
        out.backward(torch.ones_like(out))
        expected.backward(torch.ones_like(expected))
        assert_close(x.grad, xr.grad)
        assert_close(ours[0].weight.grad, ref[0].weight.grad)
        if bias:
            assert_close(ours[0].bias.grad, ref[0].bias.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_without_running_stats(channels_last):
    c = 9
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True)
    bn = nn.BatchNorm2d(c, track_running_stats=False)
    ref = randomise(nn.Sequential(conv, bn, nn.Hardswish())).double()
    ours = DWConvBNAct.from_modules(*copy.deepcopy(ref))
    x = rand_x(2, c, 6, 7, channels_last)
    check_forward_backward(ours.train(), ref.train(), x)
    check_forward_backward(ours.eval(), ref.eval(), x)  # batch statistics in eval too


# ---- from_modules --------------------------------------------------------------------------------


def test_from_modules_shares_parameters_and_buffers():
    c = 8
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True).double()
    bn = nn.BatchNorm2d(c).double()
    act = nn.ReLU6()
    randomise(nn.Sequential(conv, bn))
    originals = {
        "0.weight": conv.weight,
        "0.bias": conv.bias,
        "1.weight": bn.weight,
        "1.bias": bn.bias,
        "1.running_mean": bn.running_mean,
        "1.running_var": bn.running_var,
        "1.num_batches_tracked": bn.num_batches_tracked,
    }
    before = {k: v.detach().clone() for k, v in originals.items()}
    ours = DWConvBNAct.from_modules(conv, bn, act)
    assert ours[0] is conv and ours[1] is bn and ours[2] is act
    shared = params_and_buffers(ours)
    assert shared.keys() == originals.keys()
    for k, t in originals.items():
        assert shared[k] is t, k
        assert shared[k].data_ptr() == t.data_ptr(), k
    assert ours.activation == "relu6"

    # training the fused module updates the original modules
    ref = copy.deepcopy(nn.Sequential(conv, bn, nn.ReLU6()))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        x = rand_x(3, c, 6, 6)
        opt.zero_grad()
        ref_opt.zero_grad()
        ours(x).pow(2).mean().backward()
        ref(x).pow(2).mean().backward()
        opt.step()
        ref_opt.step()
    for k, t in originals.items():
        if k != "0.bias":  # its gradient is ~0: BatchNorm with batch statistics cancels a conv bias
            assert not torch.equal(t, before[k]), f"{k} was not updated in the original module"
        assert_close(t, params_and_buffers(ref)[k], what=k)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize(
    "act,name",
    [
        (None, "none"),
        (nn.Identity(), "none"),
        (nn.ReLU(), "relu"),
        (nn.ReLU(inplace=True), "relu"),
        (nn.ReLU6(), "relu6"),
        (nn.Hardtanh(0.0, 6.0), "relu6"),
        (nn.Hardswish(), "hardswish"),
        (nn.SiLU(), "silu"),
    ],
)
def test_from_modules_activations(act, name):
    c = 5
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).double()
    bn = nn.BatchNorm2d(c).double()
    ref = randomise(nn.Sequential(*[m for m in (conv, bn, act) if m is not None]))
    ours = DWConvBNAct.from_modules(*copy.deepcopy([conv, bn, act]))
    assert ours.activation == name
    check_forward_backward(ours.train(), ref.train(), rand_x(2, c, 5, 6))
    check_forward_backward(ours.eval(), ref.eval(), rand_x(2, c, 5, 6), steps=1)


@pytest.mark.parametrize("padding", ["same", "valid", (0, 2)])
def test_from_modules_conv_padding(padding):
    c = 4
    conv = nn.Conv2d(c, c, (3, 5), padding=padding, groups=c, dilation=(2, 1)).double()
    ref = randomise(nn.Sequential(conv, nn.BatchNorm2d(c).double(), nn.SiLU()))
    ours = DWConvBNAct.from_modules(*copy.deepcopy(list(ref)))
    check_forward_backward(ours.train(), ref.train(), rand_x(2, c, 9, 8))


def test_from_modules_without_bn():
    c = 6
    conv = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=True).double()
    ref = randomise(nn.Sequential(conv, nn.ReLU()))
    ours = DWConvBNAct.from_modules(copy.deepcopy(conv), None, nn.ReLU())
    assert list(ours.state_dict().keys()) == ["0.weight", "0.bias"]
    check_forward_backward(ours.train(), ref.train(), rand_x(2, c, 8, 9))


def test_from_modules_rejects_non_depthwise():
    with pytest.raises(ValueError, match="depthwise"):
        DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match="depthwise"):
        DWConvBNAct.from_modules(nn.Conv2d(4, 8, 3, padding=1, groups=4))  # channel multiplier 2
    with pytest.raises(ValueError, match="depthwise"):
        DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, padding=1, groups=2))


def test_from_modules_rejects_padding_mode():
    for mode in ("reflect", "replicate", "circular"):
        with pytest.raises(ValueError, match="padding_mode"):
            DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode=mode))


def test_from_modules_rejects_unknown_activation():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    for act in (nn.GELU(), nn.LeakyReLU(), nn.Hardtanh(-1.0, 1.0), nn.Sigmoid()):
        with pytest.raises(ValueError, match=type(act).__name__):
            DWConvBNAct.from_modules(conv, nn.BatchNorm2d(4), act)


def test_from_modules_rejects_wrong_types():
    with pytest.raises(TypeError, match="Conv2d"):
        DWConvBNAct.from_modules(nn.Linear(4, 4))
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        DWConvBNAct.from_modules(conv, nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="features"):
        DWConvBNAct.from_modules(conv, nn.BatchNorm2d(5))


def test_constructor_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        DWConvBNAct(4, activation="gelu")


def test_module_on_reference_backend_matches_cpu():
    c = 8
    ours = randomise(DWConvBNAct(c, 5, stride=2, activation="hardswish", bias=True)).double()
    other = copy.deepcopy(ours)
    x = rand_x(2, c, 9, 9, channels_last=True)
    out = ours(x)
    with fastdw.use_backend("reference"):
        expected = other(x)
    assert_close(out, expected)
    for (k, a), (_, b) in zip(ours.named_buffers(), other.named_buffers(), strict=True):
        assert_close(a, b, what=k)


# ---- eval mode on the compiled backend: the module's arguments go straight to the C++ op ---------


def _eval_module(c=24, k=3, stride=1, act="hardswish", bias=False, groups=None, dtype=torch.float64):
    torch.manual_seed(0)
    m = DWConvBNAct(c, k, stride, activation=act, bias=bias, input_shuffle_groups=groups).to(dtype)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m.eval()


@requires_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k, stride, bias, groups",
                         [(3, 1, False, None), (5, 2, True, None), (3, 1, False, 4)])
def test_compiled_path_skips_python_checks_and_equals_general_path(monkeypatch, channels_last, k, stride,
                                                                   bias, groups):
    """Eval and training on the cpu backend call the C++ op directly (ops.dwconv_bn_act, with its
    Python checks, is not called) and give what the general path and the reference give: outputs,
    gradients and BatchNorm's running statistics."""
    m = _eval_module(k=k, stride=stride, bias=bias, groups=groups)
    x = torch.randn(2, 24, 13, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fastdw.use_backend("reference"):
        expected = m(x)
    calls = []
    real = fastdw.ops.dwconv_bn_act
    monkeypatch.setattr(fastdw.ops, "dwconv_bn_act", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = m(x)
        assert_close(got, expected)
        assert_same_memory_format(got, x)
    assert calls == []
    for momentum in (0.1, None):
        m[1].momentum = momentum
        m.zero_grad(set_to_none=True)
        ref = copy.deepcopy(m).train()
        m.train()
        for _ in range(2):  # momentum=None: a cumulative average over the steps
            xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            got = m(xg)
            assert calls == []
            with fastdw.use_backend("reference"):
                expected = ref(xr)
            calls.clear()
            assert_close(got, expected)
            assert_same_memory_format(got, x)
            gy = torch.randn_like(got)
            got.backward(gy)
            expected.backward(gy)
            assert_close(xg.grad, xr.grad)
            for (name, a), (_, b) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
                assert_close(a.grad, b.grad, what=name)
            for (name, a), (_, b) in zip(m.named_buffers(), ref.named_buffers(), strict=True):
                assert_close(a, b, what=name)
        m.eval()


def _raises_named_python_errors(m: nn.Module) -> None:
    """Bad input through a module (either mode) gets the Python check's message."""
    with pytest.raises(ValueError, match="input must be 4-D"):
        m(torch.randn(24, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight must have shape \[C, 1, kh, kw\] with C = 12"):
        m(torch.randn(1, 12, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but the input has dtype "):
        m(torch.randn(1, 24, 8, 8))
    m[1].eps = 0.0
    with pytest.raises(ValueError, match="eps must be a positive number"):
        m(torch.randn(2, 24, 8, 8, dtype=torch.float64))
    m[1].eps = 1e-5


@requires_ext
def test_eval_bad_input_still_gets_the_named_python_error():
    m = _eval_module()
    _raises_named_python_errors(m)
    unpadded = DWConvBNAct(24, 5, padding=0).double().eval()
    with pytest.raises(ValueError, match="too small"):
        unpadded(torch.randn(1, 24, 3, 3, dtype=torch.float64))
    bad = _eval_module()
    bad[1].running_var = torch.ones(7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"running_var must have shape \[24\]"):
        bad(torch.randn(1, 24, 8, 8, dtype=torch.float64))


@requires_ext
def test_train_bad_input_gets_the_named_python_error_and_changes_nothing():
    m = _eval_module().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _raises_named_python_errors(m)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 24, 1, 1, dtype=torch.float64))
    m[1].momentum, tracked = None, m[1].num_batches_tracked
    m[1].num_batches_tracked = None
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        m(torch.randn(2, 24, 8, 8, dtype=torch.float64))
    m[1].momentum, m[1].num_batches_tracked = 0.1, tracked
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failing call"
    for p in m.parameters():
        assert p.grad is None
