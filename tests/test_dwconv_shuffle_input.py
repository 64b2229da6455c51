"""dwconv_bn_act reading its input through a channel shuffle (ShuffleNetV1's shuffle -> depthwise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_ext
from torch import nn

import fastdw


def _block(c: int, stride: int, act: str) -> nn.Sequential:
    acts = {"relu": nn.ReLU(), "none": nn.Identity()}
    block = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), acts[act])
    with torch.no_grad():
        block[1].running_mean.normal_()
        block[1].running_var.uniform_(0.5, 2.0)
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.normal_()
    return block.double()


@requires_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "groups,stride,act", [(3, 1, "none"), (2, 2, "relu"), (4, 1, "relu"), (12, 2, "none")]
)
def test_matches_explicit_shuffle(channels_last, training, groups, stride, act):
    c = 24
    ref = _block(c, stride, act)
    fused_mods = _block(c, stride, act)
    fused_mods.load_state_dict(ref.state_dict())
    fused = fastdw.nn.DWConvBNAct.from_modules(*fused_mods, input_shuffle_groups=groups)
    ref.train(training)
    fused.train(training)
    x = torch.randn(2, c, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    yr = ref(F.channel_shuffle(xr, groups))
    with fastdw.use_backend("cpu"):
        yf = fused(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
    assert yf.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-10)
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(fused[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(fused[1].running_var, ref[1].running_var)


@requires_ext
def test_reference_backend_agrees():
    c, groups = 12, 3
    block = fastdw.nn.DWConvBNAct(c, activation="relu6", input_shuffle_groups=groups).double().eval()
    x = torch.randn(1, c, 7, 7, dtype=torch.float64)
    with fastdw.use_backend("reference"):
        want = block(x)
    with fastdw.use_backend("cpu"):
        got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@requires_ext
def test_opcheck_with_shuffle():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        args = (xx.requires_grad_(), w, None, None, None, None, None, False, 1e-5, [1, 1], [1, 1], [1, 1],
                "relu", 3)
        torch.library.opcheck(torch.ops.fastdw.dwconv_bn_act.default, args)


@pytest.mark.parametrize("groups", [0, 5, -1, 2.0])
def test_bad_shuffle_groups(groups):
    x = torch.randn(1, 6, 5, 5)
    w = torch.randn(6, 1, 3, 3)
    with pytest.raises(ValueError, match="input_shuffle_groups"):
        fastdw.ops.dwconv_bn_act(x, w, input_shuffle_groups=groups)
