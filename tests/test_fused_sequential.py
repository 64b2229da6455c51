"""FusedSequential's eval path: conv -> BatchNorm (-> activation) folded into one oneDNN call (the
1x1 convs as a matrix product of the channels_last view), equal to the plain Sequential."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import assert_outputs_close, rand_input
from torch import nn

from fastdw.nn import FusedSequential
from fastdw.nn import fused_sequential as fs

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "none": None}

# conv arguments: (in, out, kernel, stride, padding, groups); 1x1 / stride 1 / one group is the matrix product
CONVS = {
    "1x1": (24, 40, 1, 1, 0, 1),
    "1x1 stride 2": (24, 40, 1, 2, 0, 1),
    "1x1 grouped": (24, 48, 1, 1, 0, 3),
    "3x3 stride 2": (3, 16, 3, 2, 1, 1),
}


def _pair(conv_args, act: str, bias: bool):
    torch.manual_seed(0)
    cin, cout, k, s, p, g = conv_args
    layers = [nn.Conv2d(cin, cout, k, s, p, groups=g, bias=bias), nn.BatchNorm2d(cout)]
    if ACTS[act] is not None:
        layers.append(ACTS[act]())
    plain = nn.Sequential(*layers)
    with torch.no_grad():
        bn = plain[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    fused = FusedSequential(*copy.deepcopy(plain))
    return fused.eval(), plain.eval()


@pytest.mark.skipif(not fs._onednn_usable(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("act", list(ACTS))
def test_folded_eval_equals_plain_sequential(conv, act):
    fused, plain = _pair(CONVS[conv], act, bias=conv == "1x1")
    cin = CONVS[conv][0]
    for channels_last in (False, True):
        x = rand_input((2, cin, 9, 7), torch.float32, channels_last)
        with torch.no_grad():
            got, expected = fused(x), plain(x)
        assert_outputs_close(got, expected, 1e-5, what=f"{conv} {act} channels_last={channels_last}")
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or cin == 3
    step = fused._steps()[0][1]
    assert isinstance(step, fs._FoldedConvBN)
    assert step._pointwise == (conv == "1x1")  # the channels_last call above took oneDNN's path


@pytest.mark.skipif(not fs._onednn_usable(), reason="PyTorch built without oneDNN")
def test_folded_1x1_reads_a_channel_slice_and_follows_parameter_changes():
    """A channel slice of a channels_last tensor (ShuffleNetV2's halves) is a valid input, and an
    in-place parameter or statistic update reaches the next call (the folded cache is re-made)."""
    fused, plain = _pair(CONVS["1x1"], "relu", bias=False)
    whole = rand_input((1, 48, 6, 6), torch.float32, True)
    half = whole[:, 24:]
    with torch.no_grad():
        assert_outputs_close(fused(half), plain(half), 1e-5, what="channel slice")
        for m in (fused, plain):
            m[0].weight.mul_(-1.5)
            m[1].running_var.add_(0.25)
        assert_outputs_close(fused(half), plain(half), 1e-5, what="after an in-place update")
        # batch size other than the one the weight was packed for
        x = rand_input((3, 24, 5, 4), torch.float32, True)
        assert_outputs_close(fused(x), plain(x), 1e-5, what="another batch size")
