"""fastdw.convert on torchvision and timm models: state_dict unchanged, same outputs and training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from model_helpers import (
    TOL,
    assert_outputs_close,
    assert_same_state,
    assert_same_training_step,
    calibrate,
    rand_input,
)
from torch import nn

import fastdw

torchvision = pytest.importorskip("torchvision")

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x0_5",
               "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "mnasnet0_5", "mnasnet0_75",
               "mnasnet1_0", "mnasnet1_3", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
               "efficientnet_b3"]
TIMM = ["mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0", "mnasnet_100"]
SIZE = 48  # the last feature maps are 2x2: BatchNorm statistics in training are well conditioned


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Randomly initialised networks produce denormal intermediates, on which x86 float math is many
    times slower; flushing them keeps these tests fast and changes values by less than 1e-300."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def build(source: str, name: str, dtype: torch.dtype = torch.float32, size: int = SIZE) -> nn.Module:
    torch.manual_seed(0)
    if source == "torchvision":
        model = getattr(torchvision.models, name)()
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False)
    return calibrate(model.to(dtype), (4, 3, size, size))


def zeroed(model: nn.Module) -> nn.Module:
    """A copy with every parameter and buffer zeroed: a loaded state_dict must overwrite all of it."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for t in copy_.state_dict().values():
            t.zero_()
    return copy_


def depthwise_convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels]


def se_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("SqueezeExcitation", "SqueezeExcite")]


CASES = [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM]


@pytest.mark.parametrize("source,name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_convert_keeps_state_dict_and_outputs(source, name, tmp_path):
    model = build(source, name)
    before = copy.deepcopy(model.state_dict())
    converted, report = fastdw.convert(model, report=True)
    assert converted is not model
    assert_same_state(model, before, what="the original must be untouched")
    # every depthwise conv and SE block was swapped, nothing skipped
    assert report.skipped == []
    assert report.counts["dwconv_bn_act"] == len(depthwise_convs(model))
    assert report.counts.get("squeeze_excite", 0) == len(se_blocks(model))
    if "shufflenet" in name:
        assert report.counts["concat_shuffle"] == 16
    # state_dict: same keys, same order, same values; loads in both directions
    assert_same_state(converted, model, what=name)
    path = tmp_path / "before.pt"
    torch.save(model.state_dict(), path)
    fresh = fastdw.convert(zeroed(model))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert_same_state(fresh, model)
    original = zeroed(model)
    original.load_state_dict(converted.state_dict())
    assert_same_state(original, model)
    # eval outputs, both memory formats
    for channels_last in (False, True):
        x = rand_input((2, 3, SIZE, SIZE), torch.float32, channels_last)
        with torch.no_grad():
            assert_outputs_close(converted.eval()(x), model.eval()(x), TOL[torch.float32], what=name)


TRAIN_CASES = [("torchvision", "mobilenet_v3_small"), ("torchvision", "shufflenet_v2_x0_5"),
               ("torchvision", "mnasnet0_5"), ("torchvision", "efficientnet_b0"),
               ("timm", "mobilenetv3_small_100")]  # timm DepthwiseSeparableConv, InvertedResidual, SE


@pytest.mark.parametrize("source,name", TRAIN_CASES, ids=[f"{s}-{n}" for s, n in TRAIN_CASES])
def test_convert_training_step_float64(source, name):
    """float64: eval outputs and a training step (loss, every gradient, every running statistic)."""
    model = build(source, name, torch.float64)
    converted = fastdw.convert(model)
    # PyTorch's hardsigmoid backward uses a float32 1/6 even in float64 (relative error 3e-8)
    tol = 1e-7 if "mobilenet" in name else TOL[torch.float64]
    x = rand_input((2, 3, SIZE, SIZE), torch.float64, "shufflenet" in name)
    with torch.no_grad():
        assert_outputs_close(converted(x), model(x), TOL[torch.float64], what=name)
    assert_same_training_step(converted, model, x, tol, what=name)


def test_convert_inplace_and_report():
    model = build("torchvision", "mobilenet_v3_small")
    same, report = fastdw.convert(model, inplace=True, report=True)
    assert same is model
    assert isinstance(model.features[1].block[0], fastdw.nn.DWConvBNAct)
    assert isinstance(model.features[1].block[1], fastdw.nn.SqueezeExcite)
    assert model.features[1].block[0].out_channels == 16  # Conv2dNormActivation's attribute is kept
    text = str(report)
    assert "11 dwconv_bn_act" in text and "9 squeeze_excite" in text and "skipped 0" in text
    assert isinstance(fastdw.convert(model), nn.Module)  # converting twice is harmless
    again, report2 = fastdw.convert(model, report=True)
    assert report2.counts == {} and report2.skipped == []


def test_unrecognised_patterns_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GroupNorm(2, 8), nn.ReLU(),  # not BatchNorm
        nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),  # depth multiplier 2
        nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="reflect"), nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.GELU(),  # GELU: fuse conv+BN only
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # nothing after it
    )
    calibrate(model, (2, 8, 9, 9))
    converted, report = fastdw.convert(model, report=True)
    assert type(converted) is fastdw.nn.FusedSequential
    assert report.counts == {"dwconv_bn_act": 1} and report.swapped["dwconv_bn_act"] == ["8"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"0", "3", "6", "11"}
    assert "GroupNorm" in skipped["0"] and "depthwise" in skipped["3"] and "reflect" in skipped["6"]
    assert_same_state(converted, model)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert_outputs_close(converted(x), model(x), 1e-5)
    assert_same_training_step(converted, model, x, 1e-4)


def test_se_with_unsupported_activation_is_skipped():
    from torchvision.ops.misc import SqueezeExcitation

    model = nn.Sequential(SqueezeExcitation(16, 4, activation=nn.GELU))
    converted, report = fastdw.convert(model, report=True)
    assert isinstance(converted[0], SqueezeExcitation)
    assert report.skipped and "GELU" in report.skipped[0][1]


def test_fold_bn_option():
    model = build("torchvision", "mobilenet_v3_small")
    folded, report = fastdw.convert(model, fold_bn=True, report=True)
    assert report.counts["conv_bn_fold"] == 23  # stem, 10 expansions, 11 projections, last 1x1 conv
    assert isinstance(folded.features[0], fastdw.nn.FusedSequential) and folded.features[0].fold_bn
    assert_same_state(folded, model)
    x = rand_input((2, 3, SIZE, SIZE), torch.float32, True)
    with torch.no_grad():
        assert_outputs_close(folded.eval()(x), model.eval()(x), TOL[torch.float32])
    # judged against float64: two float32 runs differ by ~1e-2 from BatchNorm over few values
    assert_same_training_step(folded, copy.deepcopy(model).double(), x.double(), 1e-3, norm=True)


def test_converted_model_copies_and_pickles():
    model = fastdw.convert(build("torchvision", "shufflenet_v2_x0_5"))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert_same_state(clone, model)
            assert_outputs_close(clone(x), expected, 1e-6)
            # the copy computes with its own parameters, not the original's
            clone.fc.bias.add_(1.0)
            assert not torch.allclose(clone(x), expected)


def test_timm_block_follows_replaced_children():
    timm = pytest.importorskip("timm")
    model = calibrate(timm.create_model("mnasnet_100", pretrained=False), (2, 3, SIZE, SIZE))
    converted = fastdw.convert(model)
    block = converted.blocks[1][0]
    assert type(block).__name__ == "FusedInvertedResidual"
    assert isinstance(block, timm.models._efficientnet_blocks.InvertedResidual)
    x = torch.randn(2, 3, SIZE, SIZE)
    # a replaced child is picked up: the fused pair is rebuilt over the new BatchNorm
    block.bn2 = copy.deepcopy(model.blocks[1][0].bn2)
    with torch.no_grad():
        block.bn2.running_mean.add_(0.5)
        model.blocks[1][0].bn2.running_mean.add_(0.5)
    with torch.no_grad():
        assert_outputs_close(converted(x), model(x), TOL[torch.float32])
