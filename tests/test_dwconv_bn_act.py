"""fastdw.ops.dwconv_bn_act against the `reference` backend and against PyTorch's unfused modules.

Every case computes the same thing three ways from identical copies of the inputs:
  * the op on the `cpu` backend (the C++ kernels),
  * the op on the `reference` backend (F.conv2d -> F.batch_norm -> activation),
  * nn.Sequential(nn.Conv2d(groups=C), nn.BatchNorm2d, activation module),
and compares outputs, every gradient (input, conv weight, conv bias, BN weight, BN bias) and the
running statistics (running_mean, running_var, num_batches_tracked).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass, replace

import pytest
import torch
from conftest import (
    ACT_MODULES,
    SUPPORTED_CAPABILITIES,
    Inputs,
    assert_close,
    assert_same_memory_format,
    make_inputs,
    memory_format_of,
    requires_ext,
)
from torch import nn

import fastdw
from fastdw.nn import DWConvBNAct
from fastdw.ops import dwconv_bn_act

pytestmark = requires_ext

ACTIVATIONS = ("relu", "relu6", "hardswish", "silu", "none")
# bn modes: "affine" (weight, bias, running stats), "noaffine" (running stats only),
# "nostats" (affine, track_running_stats=False: batch statistics in train and eval),
# "none" (no BatchNorm at all: conv + bias + activation).
BN_MODES = ("affine", "noaffine", "nostats", "none")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]
    kernel: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    dilation: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | None = None
    bias: bool = False
    bn: str = "affine"
    activation: str = "relu6"
    channels_last: bool = False
    training: bool = False
    momentum: float | None = 0.1
    eps: float = 1e-5

    @property
    def kernel_hw(self):
        return _pair(self.kernel)

    @property
    def padding_hw(self):
        if self.padding is None:
            kh, kw = self.kernel_hw
            dh, dw = _pair(self.dilation)
            return ((kh // 2) * dh, (kw // 2) * dw)
        return _pair(self.padding)

    def out_hw(self):
        _, _, h, w = self.shape
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
            self.kernel_hw,
            _pair(self.stride),
            _pair(self.dilation),
            self.padding_hw,
        )
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def valid(self) -> bool:
        ho, wo = self.out_hw()
        if ho < 1 or wo < 1:
            return False
        uses_batch_stats = self.bn == "nostats" or (self.training and self.bn != "none")
        return not (uses_batch_stats and self.shape[0] * ho * wo == 1)

    @property
    def op_training(self) -> bool:
        """The op's `training` flag: batch statistics in train mode, and always without running stats."""
        return self.bn == "nostats" or (self.training and self.bn != "none")

    def __str__(self):
        n, c, h, w = self.shape
        k = "x".join(map(str, self.kernel_hw))
        return (
            f"{n}x{c}x{h}x{w}-k{k}-s{self.stride}-d{self.dilation}-p{self.padding}-"
            f"{'bias' if self.bias else 'nobias'}-{self.bn}-{self.activation}-"
            f"{'cl' if self.channels_last else 'nchw'}-{'train' if self.training else 'eval'}"
            f"-m{self.momentum}"
        )


def inputs_for(case: Case, dtype=torch.float64) -> Inputs:
    n, c, h, w = case.shape
    return make_inputs(
        n,
        c,
        h,
        w,
        case.kernel,
        dtype=dtype,
        channels_last=case.channels_last,
        bias=case.bias,
        affine=case.bn in ("affine", "nostats"),
        stats=case.bn in ("affine", "noaffine"),
    )


def run_op(case: Case, inp: Inputs, backend: str, grad_out: torch.Tensor):
    """Forward + backward through fastdw.ops.dwconv_bn_act; returns (out, {name: grad})."""
    with fastdw.use_backend(backend):
        out = dwconv_bn_act(
            inp.x,
            inp.weight,
            inp.bias,
            inp.bn_weight,
            inp.bn_bias,
            inp.running_mean,
            inp.running_var,
            training=case.op_training,
            momentum=case.momentum,
            eps=case.eps,
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            activation=case.activation,
            num_batches_tracked=inp.num_batches_tracked,
        )
        params = {k: v for k, v in inp.params().items() if v.requires_grad}
        grads = torch.autograd.grad(out, list(params.values()), grad_out)
    return out, dict(zip(params, grads, strict=True))


def torch_modules(case: Case, inp: Inputs) -> nn.Sequential:
    """nn.Sequential(Conv2d(groups=C), BatchNorm2d, act) holding copies of the inputs' tensors."""
    c = case.shape[1]
    dtype = inp.x.dtype
    conv = nn.Conv2d(
        c,
        c,
        case.kernel_hw,
        case.stride,
        case.padding_hw,
        case.dilation,
        groups=c,
        bias=case.bias,
        dtype=dtype,
    )
    conv.weight = nn.Parameter(inp.weight.detach().clone())
    if case.bias:
        conv.bias = nn.Parameter(inp.bias.detach().clone())
    layers: list[nn.Module] = [conv]
    if case.bn != "none":
        bn = nn.BatchNorm2d(
            c,
            eps=case.eps,
            momentum=case.momentum,
            affine=case.bn in ("affine", "nostats"),
            track_running_stats=case.bn != "nostats",
            dtype=dtype,
        )
        if bn.affine:
            bn.weight = nn.Parameter(inp.bn_weight.detach().clone())
            bn.bias = nn.Parameter(inp.bn_bias.detach().clone())
        if bn.track_running_stats:
            bn.running_mean.copy_(inp.running_mean)
            bn.running_var.copy_(inp.running_var)
            bn.num_batches_tracked.copy_(inp.num_batches_tracked)
        layers.append(bn)
    if case.activation != "none":
        layers.append(ACT_MODULES[case.activation]())
    seq = nn.Sequential(*layers)
    seq.train(case.training)
    return seq


def run_torch(case: Case, inp: Inputs, grad_out: torch.Tensor):
    seq = torch_modules(case, inp)
    x = inp.x.detach().clone(memory_format=torch.preserve_format).requires_grad_(inp.x.requires_grad)
    out = seq(x)
    conv = seq[0]
    bn = seq[1] if len(seq) > 1 and isinstance(seq[1], nn.BatchNorm2d) else None
    tensors = {"x": x, "weight": conv.weight}
    if case.bias:
        tensors["bias"] = conv.bias
    if bn is not None and bn.affine:
        tensors["bn_weight"] = bn.weight
        tensors["bn_bias"] = bn.bias
    tensors = {k: v for k, v in tensors.items() if v.requires_grad}
    grads = torch.autograd.grad(out, list(tensors.values()), grad_out)
    stats = {}
    if bn is not None and bn.track_running_stats:
        stats = {
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
            "num_batches_tracked": bn.num_batches_tracked,
        }
    return out, dict(zip(tensors, grads, strict=True)), stats


def check_case(case: Case, dtype=torch.float64, tol: float | None = None, backend: str = "cpu") -> None:
    inp = inputs_for(case, dtype)
    n, c, _, _ = case.shape
    ho, wo = case.out_hw()
    grad_out = torch.randn(n, c, ho, wo, dtype=torch.float64).to(dtype)
    if case.channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)

    fused_inp, ref_inp = inp.clone(), inp.clone()
    out, grads = run_op(case, fused_inp, backend, grad_out)
    ref_out, ref_grads = run_op(case, ref_inp, "reference", grad_out)
    mod_out, mod_grads, mod_stats = run_torch(case, inp.clone(), grad_out)

    assert out.shape == (n, c, ho, wo)
    assert out.dtype == dtype
    assert_same_memory_format(out, inp.x)
    assert_same_memory_format(out, mod_out)  # and the same as PyTorch's conv gives
    if memory_format_of(inp.x) == torch.channels_last and c > 1 and ho * wo > 1:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert set(grads) == set(ref_grads) == set(mod_grads)
    for name, expected, g in (("reference", ref_out, ref_grads), ("nn.Sequential", mod_out, mod_grads)):
        assert_close(out, expected, dtype, what=f"output vs {name}", tol=tol)
        for k in grads:
            assert_close(grads[k], g[k], dtype, what=f"grad {k} vs {name}", tol=tol)
    assert_same_memory_format(grads["x"], inp.x)
    # Running statistics: same updates as F.batch_norm / nn.BatchNorm2d, and never touched in eval.
    for k, v in fused_inp.stats().items():
        assert_close(v, ref_inp.stats()[k], dtype, what=f"{k} vs reference", tol=tol)
        assert_close(v, mod_stats[k], dtype, what=f"{k} vs nn.BatchNorm2d", tol=tol)
        if not case.training:
            assert torch.equal(v, inp.stats()[k]), f"{k} changed in eval mode"
    if case.training and case.bn in ("affine", "noaffine") and n > 0:
        assert not torch.equal(fused_inp.running_mean, inp.running_mean), "running_mean not updated"
        assert int(fused_inp.num_batches_tracked) == 1


# ---- the cases ------------------------------------------------------------------------------------

SHAPES = [
    (2, 3, 7, 7),
    (1, 5, 9, 6),
    (3, 8, 5, 11),
    (2, 17, 6, 6),
    (2, 1, 8, 8),
    (4, 6, 1, 1),
    (2, 33, 13, 4),
    (1, 24, 3, 3),
    (2, 16, 10, 9),
]
KERNELS = [3, 5, 7, (3, 5)]
STRIDES = [1, 2]
DILATIONS = [1, 2]
PADDINGS = [None, 0, 1, (2, 1)]


def _sample(k: int, seed: int) -> list[Case]:
    grid = [
        Case(shape, kern, s, d, p, bias, bn, act, cl, train)
        for shape, kern, s, d, p, bias, bn, act, cl, train in itertools.product(
            SHAPES,
            KERNELS,
            STRIDES,
            DILATIONS,
            PADDINGS,
            (False, True),
            BN_MODES,
            ACTIVATIONS,
            (False, True),
            (False, True),
        )
    ]
    grid = [c for c in grid if c.valid()]
    return random.Random(seed).sample(grid, k)


CASES_F64 = _sample(110, 0)
CASES_F32 = _sample(40, 1)

EDGE_CASES = [
    Case((2, 5, 1, 1), 3, training=False, activation="relu"),  # 1x1 spatial, eval
    Case((3, 5, 1, 1), 3, training=True, activation="silu", channels_last=True),  # 1x1 spatial, train
    Case((2, 4, 1, 1), 3, padding=2, training=True, bias=True, channels_last=True),  # 1x1 in, 3x3 out
    Case((2, 4, 1, 1), 3, padding=2, training=False, activation="hardswish"),
    Case((2, 1, 6, 5), 3, training=True, activation="hardswish", bias=True),  # C = 1
    Case((2, 1, 6, 5), 5, training=False, channels_last=True),
    Case((2, 512, 3, 3), 3, training=True, channels_last=True, activation="relu"),  # large C
    Case((2, 512, 3, 3), 3, training=False, activation="silu", bias=True),
    Case((2, 1024, 2, 2), 3, stride=2, training=True, activation="relu6"),
    Case((1, 1024, 4, 3), 5, training=False, channels_last=True, bias=True, activation="hardswish"),
    Case((0, 6, 5, 5), 3, training=False, activation="relu"),  # batch 0
    Case((0, 6, 5, 5), 3, training=True, bias=True, activation="silu"),
    Case((0, 6, 5, 5), 3, training=True, channels_last=True, bn="noaffine"),
    Case((0, 6, 5, 5), 3, training=False, channels_last=True, bn="none"),
    Case((2, 3, 9, 10), 5, dilation=2, padding=0, stride=2, training=True, bias=True),  # one output row
    Case((2, 3, 5, 6), (3, 5), padding=(1, 2), training=True, channels_last=True, activation="silu"),
    Case((2, 3, 5, 6), (5, 3), stride=(2, 1), dilation=(1, 2), padding=(2, 0), training=False),
    Case((2, 4, 6, 6), 3, padding=4, stride=2, training=True, activation="hardswish"),  # padding > kernel
    Case((2, 4, 6, 6), 3, padding=4, stride=2, training=False, channels_last=True, activation="relu6"),
    Case((3, 9, 5, 4), 1, padding=0, training=True, bias=True, activation="relu"),  # 1x1 kernel
    Case((2, 4, 12, 40), 3, training=True, activation="silu"),  # a wide row (several vectors)
    Case((2, 4, 12, 40), 5, stride=2, training=True, channels_last=True, activation="hardswish"),
    # channels_last input gradient off the stride-1 fast path: column runs of up to 4 taps (stride 2
    # and 3, padding beyond the kernel at stride 1) and the tap-list fallback beyond 4 taps
    Case((2, 20, 11, 13), 3, stride=2, training=True, channels_last=True, activation="relu6"),
    Case((2, 20, 11, 13), (3, 7), stride=(2, 3), training=True, channels_last=True, bias=True),
    Case((2, 6, 7, 8), 3, padding=3, training=True, channels_last=True, activation="silu"),
    Case((2, 6, 7, 8), 7, padding=7, training=True, channels_last=True),
    Case((2, 6, 13, 12), 9, stride=2, training=True, channels_last=True, activation="hardswish"),
    # NCHW input gradient by column phases: stride 2 (two phases interleaved, rows of several
    # vectors, odd width), strides 3 and (1, 2) / (2, 1), and the stride-1 path with padding
    # beyond the kernel (gz rows and columns that no input pixel reads)
    Case((2, 3, 11, 45), 3, stride=2, training=True, activation="relu6"),
    Case((2, 3, 10, 37), (3, 7), stride=(2, 3), training=True, bias=True),
    Case((2, 3, 9, 34), 5, stride=(1, 2), dilation=2, training=False, bias=True, activation="silu"),
    Case((2, 3, 9, 35), 3, stride=(2, 1), padding=3, training=True, activation="hardswish"),
    Case((2, 3, 8, 20), 3, padding=3, training=True, activation="relu"),
    # NCHW small planes (C >= 8, <= 256 pixels) on slabs of 64 channels: one image in training (the
    # sums pass's slabs reused), two blocks with a ragged one, and the input gradient's column runs,
    # flipped conv with padding beyond the kernel and tap-list fallback on the slab
    Case((1, 72, 9, 9), 3, stride=2, training=True, bias=True, activation="relu6"),
    Case((3, 72, 6, 5), 5, training=True, activation="silu"),
    Case((2, 12, 7, 8), 7, padding=7, training=True, bias=True, activation="relu"),
    Case((2, 12, 7, 8), 3, padding=3, training=False, activation="hardswish"),
    Case((2, 12, 13, 12), 9, stride=2, training=True, activation="hardswish"),
    Case((2, 12, 13, 12), 9, stride=2, training=False, bias=True, bn="noaffine"),
    Case((0, 16, 5, 5), 3, training=True, bias=True, activation="relu6"),  # batch 0 on the slab path
    Case((0, 16, 5, 5), 3, training=False, activation="silu"),
]


def test_sample_covers_every_axis():
    cases = CASES_F64 + EDGE_CASES
    for attr, values in (
        ("shape", SHAPES),
        ("kernel", KERNELS),
        ("stride", STRIDES),
        ("dilation", DILATIONS),
        ("padding", PADDINGS),
        ("bn", BN_MODES),
        ("activation", ACTIVATIONS),
        ("channels_last", (False, True)),
        ("training", (False, True)),
        ("bias", (False, True)),
    ):
        seen = {getattr(c, attr) for c in cases}
        assert set(values) <= seen, f"{attr}: {set(values) - seen} never sampled"


@pytest.mark.parametrize("case", CASES_F64 + EDGE_CASES, ids=str)
def test_float64(case):
    check_case(case, torch.float64)


@pytest.mark.parametrize("case", CASES_F32 + EDGE_CASES[::3], ids=str)
def test_float32(case):
    check_case(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [False, True])
def test_small_nchw_planes_on_slabs(dtype, training):
    """NCHW planes of <= 256 positions run on the channels_last kernels, on slabs of 64 channels
    transposed inside the kernel (16 x 16 register blocks): several blocks along C and 16-blocks
    along H*W, ragged at both edges, forward and backward (x and grad_out in, grad_input out)."""
    check_case(Case((2, 200, 13, 11), 3, training=training, bias=True, activation="hardswish"), dtype)


@pytest.mark.parametrize("case,dtype", [
    # channels_last eval outputs of >= 8 MiB (FASTDW_STREAM_MIN_BYTES in conftest) are written
    # with non-temporal stores:
    # C a multiple of the vector (every store streams), C = 72 (pixels alternately aligned and not:
    # streamed and plain stores mixed) and C = 20 (a partial vector per pixel); float64 too
    (Case((1, 64, 256, 256), channels_last=True), torch.float32),
    (Case((1, 72, 248, 248), channels_last=True, activation="hardswish"), torch.float32),
    (Case((1, 20, 460, 460), channels_last=True, bias=True), torch.float32),
    (Case((1, 64, 182, 182), channels_last=True), torch.float64),
    # channels_last eval inputs of as many bytes also prefetch the next rows into L2
    # (AheadPrefetch): the cases above, and stride 2 across two images
    (Case((2, 48, 160, 160), stride=2, channels_last=True, activation="relu"), torch.float32),
    # NCHW inputs of >= 4 MiB prefetch the next plane (forward, and backward for plane_z)
    (Case((2, 32, 128, 128), training=True), torch.float32),
    (Case((2, 32, 128, 128), stride=2, bias=True), torch.float32),
], ids=str)
def test_large_tensors(case, dtype):
    """The paths taken only by large tensors: streamed stores and row / plane prefetches."""
    check_case(case, dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case,dtype", [
    # channels_last 3x3, stride 1 and 2, dilation 1: two output rows at a time (nhwc_conv_rows)
    # where both rows' kernel rows lie inside the image, one row at the top and bottom edges, at
    # an odd row count per image, at a thread's last row, and between images. Channel counts with
    # several groups of 4 vectors and partial vectors; widths whose interior columns leave some
    # over after the blocks of 4; padding 0 and 2; no BN, conv bias, other activations.
    (Case((3, 80, 9, 11), channels_last=True), torch.float64),
    (Case((2, 20, 10, 13), stride=2, bias=True, channels_last=True, activation="hardswish"), torch.float64),
    (Case((2, 24, 8, 8), padding=0, channels_last=True, activation="silu"), torch.float64),
    (Case((1, 19, 12, 12), stride=2, padding=0, channels_last=True), torch.float64),
    (Case((2, 16, 6, 9), padding=2, bn="none", bias=True, channels_last=True, activation="relu"),
     torch.float64),
    (Case((2, 16, 9, 9), stride=2, padding=2, channels_last=True, activation="none"), torch.float64),
    (Case((4, 144, 14, 14), channels_last=True), torch.float32),
    (Case((2, 96, 15, 15), stride=2, channels_last=True), torch.float32),
    # interior columns left after the blocks of 4 (and of 8) taken as one block of 3 or 2, and
    # edge columns of four channel vectors and a partial one (float64: 8 lanes)
    (Case((2, 72, 10, 9), channels_last=True, activation="relu6"), torch.float64),
    (Case((1, 40, 8, 17), stride=2, bias=True, channels_last=True), torch.float64),
    (Case((1, 96, 7, 7), channels_last=True), torch.float32),
], ids=str)
def test_two_row_blocks(case, dtype, training):
    check_case(replace(case, training=training), dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case,dtype", [
    # NCHW planes of more than 256 pixels go through the phase buffer (PlaneBuf), whose origin and
    # phase spacing depend on the padding so that the fill's vector stores are aligned: paddings
    # 0-3 at stride 1 and 2 (first image column in each phase 0, 1 or 2), odd and even widths,
    # 5x5 and 7x7, stride 3 (unaligned phases), float32 (16 lanes) and float64 (8).
    (Case((2, 3, 19, 37), 3, padding=0, stride=2), torch.float64),
    (Case((2, 3, 19, 37), 3, padding=1, stride=2, bias=True), torch.float32),
    (Case((1, 3, 20, 34), 5, padding=2, stride=2, activation="hardswish"), torch.float64),
    (Case((1, 3, 20, 35), 5, padding=3, stride=2), torch.float32),
    (Case((1, 3, 17, 40), 7, padding=3, stride=2, activation="silu"), torch.float64),
    (Case((2, 3, 18, 33), 3, padding=0), torch.float32),
    (Case((2, 3, 18, 33), 5, padding=2, bias=True), torch.float64),
    (Case((1, 3, 18, 30), 7, padding=3, activation="relu"), torch.float32),
    (Case((2, 3, 19, 37), 3, padding=2, stride=3), torch.float64),
], ids=str)
def test_nchw_phase_buffer_paddings(case, dtype, training):
    check_case(replace(case, training=training), dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case,dtype", [
    # channels_last planes of at most 64 pixels: the backward runs on slabs of 64 channels copied
    # out of each pixel (use_slabs_for_tiny_nhwc): batch 1 (sums and gradients from one recompute)
    # and more, channel counts with a partial slab and a partial vector, stride 2, 5x5 at dilation
    # 2, 1x1 maps, no BN.
    (Case((1, 72, 7, 7), channels_last=True), torch.float64),
    (Case((3, 20, 8, 8), stride=2, bias=True, channels_last=True, activation="hardswish"), torch.float64),
    (Case((2, 12, 6, 5), 5, dilation=2, channels_last=True, activation="silu"), torch.float64),
    (Case((4, 8, 1, 1), channels_last=True, activation="relu"), torch.float64),
    (Case((2, 200, 4, 7), bn="none", bias=True, channels_last=True, activation="none"), torch.float64),
    (Case((1, 960, 7, 7), channels_last=True), torch.float32),
], ids=str)
def test_tiny_nhwc_planes_on_slabs(case, dtype, training, threads):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_case(replace(case, training=training), dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", [
    # The channels_last backward runs over chunks of output rows (an image, or a part of one when
    # there are fewer images than threads: 1 image on 2, 3, 5 threads, 3 images on 2), each with a
    # band of gz rows: images taller than the band (it moves on), the gz rows before a part that
    # its first input rows read (1 for 3x3 at stride 1 and 2, 8 for 5x5 at dilation 2), input rows
    # that read no gz row (1x1 kernel at stride 2, stride 3 with a 2-row kernel), column runs
    # (padding beyond the kernel at stride 1) and the tap-list fallback (a 9x9 kernel at stride 2).
    Case((1, 24, 41, 9), channels_last=True),
    Case((3, 20, 30, 7), stride=2, bias=True, channels_last=True, activation="hardswish"),
    Case((2, 12, 29, 6), 5, dilation=2, channels_last=True, activation="silu"),
    Case((1, 10, 27, 5), 1, stride=2, padding=0, bias=True, channels_last=True, activation="relu"),
    Case((1, 10, 31, 6), (2, 3), stride=(3, 1), padding=(0, 1), channels_last=True),
    Case((1, 6, 26, 8), 3, padding=3, channels_last=True, activation="silu"),
    Case((1, 6, 30, 13), 9, stride=2, bias=True, channels_last=True, activation="none"),
], ids=str)
def test_backward_row_bands(case, training, threads):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_case(replace(case, training=training), torch.float64)
    finally:
        torch.set_num_threads(previous)


def _backward_from(args, grad_out, out):
    """fastdw::dwconv_bn_act_backward of the forward call `args`, given its output `out` or not."""
    x, w, b, g, beta, mean, var, training, eps, stride, padding, dilation, act = args
    mask = [True, True, b is not None, g is not None, beta is not None]
    return torch.ops.fastdw.dwconv_bn_act_backward(grad_out, x, w, b, g, beta, mean, var, training, eps,
                                                   stride, padding, dilation, act, mask, 1, out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("shape,stride", [((2, 24, 13, 11), 1), ((1, 40, 18, 16), 2), ((3, 7, 9, 10), 2)])
def test_training_sums_from_output(shape, stride, activation, dtype):
    """CPU training, channels_last, relu / relu6: the backward takes its BatchNorm sums from the
    forward's output when given it. The gradients equal those of the conv recompute (no output);
    an output that is not the forward's changes them, so the given one is what was read."""
    n, c, h, w = shape
    inp = make_inputs(n, c, h, w, channels_last=True, requires_grad=False, dtype=dtype)
    args = (inp.x, inp.weight, inp.bias, inp.bn_weight, inp.bn_bias, None, None, True, 1e-5, [stride] * 2,
            [1, 1], [1, 1], activation)
    out, mean, var = torch.ops.fastdw.dwconv_bn_act(*args)
    args = args[:5] + (mean, var) + args[7:]
    grad_out = torch.randn_like(out)
    recomputed = _backward_from(args, grad_out, None)
    from_out = _backward_from(args, grad_out, out)
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    for a, r, name in zip(from_out, recomputed, ("x", "weight", "bias", "bn_weight", "bn_bias"), strict=True):
        assert_close(a, r, tol=tol, what=name)
    other = _backward_from(args, grad_out, (out * 0.5).contiguous(memory_format=torch.channels_last))
    assert not torch.allclose(other[3], recomputed[3], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("gamma", ["zero", "tiny", "negative"])
def test_training_sums_from_output_small_gamma(gamma):
    """Where gamma is ~0 against beta (or 0) the output does not give xhat accurately: the backward
    recomputes the conv instead; a negative gamma keeps the output's sums. Either way the gradients
    match the reference in float64."""
    case = Case((2, 16, 12, 12), stride=2, bias=True, channels_last=True, training=True)
    inp = inputs_for(case, torch.float64)
    with torch.no_grad():
        inp.bn_weight[3] = {"zero": 0.0, "tiny": 1e-9, "negative": -0.7}[gamma]
        inp.bn_bias[3] = 2.0
    grad_out = torch.randn(2, 16, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out, grads = run_op(case, inp.clone(), "cpu", grad_out)
    ref_out, ref_grads = run_op(case, inp.clone(), "reference", grad_out)
    assert_close(out, ref_out, what="out")
    for name in grads:
        assert_close(grads[name], ref_grads[name], what=name)


@pytest.mark.parametrize("activation,saved", [("relu6", True), ("relu", True), ("none", False),
                                              ("hardswish", False)])
def test_inplace_change_of_training_output(activation, saved):
    """CPU training with relu / relu6 keeps the output for backward (as eager's ReLU6(inplace=True)
    does): changing it in place before backward is autograd's clear error, never a wrong gradient.
    Other activations and eval keep nothing of it."""
    m = DWConvBNAct(8, activation=activation).double().train()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = m(x.requires_grad_())
    y.add_(1.0)
    if saved:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    else:
        y.sum().backward()
        assert x.grad is not None
    m.eval()
    y = m(x)
    y.add_(1.0)
    y.sum().backward()


@pytest.mark.parametrize("training", [False, True])
def test_small_nchw_planes_strided_view(training):
    """A non-dense NCHW input with small planes takes a transposed copy instead of the slabs."""
    case = Case((2, 40, 9, 9), 3, stride=2, training=training, bias=True, activation="relu6")
    x = torch.randn(2, 80, 9, 9, dtype=torch.float64)[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    inp = inputs_for(case)
    go = torch.randn(2, 40, *case.out_hw(), dtype=torch.float64)
    f, r = inp.clone(), inp.clone()
    f.x = r.x = x.detach().requires_grad_(True)
    out, grads = run_op(case, f, "cpu", go)
    ref_out, ref_grads = run_op(case, r, "reference", go)
    assert_close(out, ref_out)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], what=k)


SUBSET_CASES = [
    Case((2, 6, 7, 7), 3, training=True, bias=True),
    Case((2, 6, 7, 7), 5, stride=2, training=False, bias=True, channels_last=True, activation="silu"),
    Case((2, 6, 7, 7), 3, training=True, bn="noaffine", channels_last=True, activation="hardswish"),
    Case((2, 6, 7, 7), 3, training=False, bn="none", activation="relu"),
    # NCHW small planes on slabs (C >= 8)
    Case((2, 20, 7, 7), 3, training=True, bias=True),
    Case((2, 20, 9, 9), 3, stride=2, training=False, bias=True, activation="relu6"),
]


def _present(case: Case) -> set[str]:
    names = {"x", "weight"} | ({"bias"} if case.bias else set())
    return names | ({"bn_weight", "bn_bias"} if case.bn in ("affine", "nostats") else set())


SUBSETS = [
    (case, which)
    for case in SUBSET_CASES
    for which in ("x", "weight", "bias", "bn_weight", "bn_bias", "params")
    if which == "params" or which in _present(case)
]


@pytest.mark.parametrize("case,which", SUBSETS, ids=str)
def test_gradient_subsets(case, which):
    check_gradient_subset(case, which, "cpu")


def check_gradient_subset(case: Case, which: str, backend: str) -> None:
    """Only some inputs require grad: the op computes exactly those gradients, still correctly."""
    inp = inputs_for(case)
    want = set(inp.params()) - {"x"} if which == "params" else {which}
    assert set(inp.params()) == _present(case)
    for name, t in inp.params().items():
        t.requires_grad_(name in want)
    n, c, _, _ = case.shape
    go = torch.randn(n, c, *case.out_hw(), dtype=torch.float64)
    fused, ref = inp.clone(requires_grad=True), inp.clone(requires_grad=True)
    for i in (fused, ref):
        for name, t in i.params().items():
            t.requires_grad_(name in want)
    out, grads = run_op(case, fused, backend, go)
    ref_out, ref_grads = run_op(case, ref, "reference", go)
    assert set(grads) == want
    assert_close(out, ref_out)
    for k in want:
        assert_close(grads[k], ref_grads[k], what=k)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_no_grad_and_inference_mode(channels_last, training):
    case = Case((2, 5, 8, 7), 3, training=training, bias=True, channels_last=channels_last, activation="silu")
    inp = inputs_for(case)
    with fastdw.use_backend("reference"):
        r = inp.clone()
        expected = dwconv_bn_act(
            r.x,
            r.weight,
            r.bias,
            r.bn_weight,
            r.bn_bias,
            r.running_mean,
            r.running_var,
            training=training,
            num_batches_tracked=r.num_batches_tracked,
            activation="silu",
        )
    for ctx in (torch.no_grad, torch.inference_mode):
        f = inp.clone()
        with ctx():
            out = dwconv_bn_act(
                f.x,
                f.weight,
                f.bias,
                f.bn_weight,
                f.bn_bias,
                f.running_mean,
                f.running_var,
                training=training,
                num_batches_tracked=f.num_batches_tracked,
                activation="silu",
            )
        assert not out.requires_grad
        assert_close(out, expected)
        assert_same_memory_format(out, inp.x)
        for k, v in f.stats().items():
            assert_close(v, r.stats()[k], what=k)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_input(backend):
    """Strided views (neither NCHW- nor NHWC-dense) are read correctly."""
    if not fastdw.backends()[backend]:
        pytest.skip(f"{backend} backend not usable here")
    case = Case((2, 6, 9, 8), 3, training=True, bias=True, activation="hardswish")
    base = torch.randn(2, 12, 18, 8, dtype=torch.float64)
    for x in (
        base[:, ::2, ::2],
        base.permute(0, 1, 3, 2)[:, :6, :, :9].transpose(2, 3),
        base.contiguous(memory_format=torch.channels_last)[:, 3:9, 1:10],
    ):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        sub = replace(case, shape=tuple(x.shape))
        inp = inputs_for(sub)
        go = torch.randn(*x.shape[:2], *sub.out_hw(), dtype=torch.float64)
        f, r = inp.clone(), inp.clone()
        f.x = r.x = x.detach().requires_grad_(True)
        out, grads = run_op(sub, f, backend, go)
        ref_out, ref_grads = run_op(sub, r, "reference", go)
        assert_close(out, ref_out)
        for k in grads:
            assert_close(grads[k], ref_grads[k], what=k)


# ---- running statistics over several steps --------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_stats_several_steps(backend, channels_last, momentum, dtype):
    """running_mean/var and num_batches_tracked follow nn.BatchNorm2d step by step (momentum=None:
    cumulative average), then eval uses the accumulated statistics."""
    if backend != "reference" and not fastdw.backends()[backend]:
        pytest.skip(f"{backend} backend not usable here")
    c = 6
    case = Case((3, c, 6, 5), 3, training=True, bias=True, channels_last=channels_last, momentum=momentum)
    inp = inputs_for(case, dtype)
    seq = torch_modules(case, inp)
    for step in range(4):
        x = (torch.randn(3 + step, c, 6, 5, dtype=torch.float64) * (1 + step) + step).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with fastdw.use_backend(backend):
            out = dwconv_bn_act(
                x,
                inp.weight,
                inp.bias,
                inp.bn_weight,
                inp.bn_bias,
                inp.running_mean,
                inp.running_var,
                training=True,
                momentum=momentum,
                num_batches_tracked=inp.num_batches_tracked,
            )
        expected = seq(x)
        assert_close(out, expected, what=f"output step {step}")
        assert_close(inp.running_mean, seq[1].running_mean, what=f"running_mean step {step}")
        assert_close(inp.running_var, seq[1].running_var, what=f"running_var step {step}")
        assert int(inp.num_batches_tracked) == int(seq[1].num_batches_tracked) == step + 1
    seq.eval()
    x = torch.randn(2, c, 6, 5, dtype=torch.float64).to(dtype)
    with fastdw.use_backend(backend):
        out = dwconv_bn_act(
            x,
            inp.weight,
            inp.bias,
            inp.bn_weight,
            inp.bn_bias,
            inp.running_mean,
            inp.running_var,
            training=False,
            momentum=momentum,
            num_batches_tracked=inp.num_batches_tracked,
        )
    assert_close(out, seq(x), what="eval after training")
    assert int(inp.num_batches_tracked) == 4


def test_training_without_num_batches_tracked():
    """momentum given and no counter: running stats are still updated (as F.batch_norm does)."""
    inp = make_inputs(3, 4, 6, 6)
    rm, rv = inp.running_mean.clone(), inp.running_var.clone()
    out = dwconv_bn_act(
        inp.x,
        inp.weight,
        None,
        None,
        None,
        inp.running_mean,
        inp.running_var,
        training=True,
        momentum=0.25,
        activation="none",
    )
    ref = torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(inp.x, inp.weight, None, 1, 1, 1, 4), rm, rv, None, None, True, 0.25, 1e-5
    )
    assert_close(out, ref)
    assert_close(inp.running_mean, rm)
    assert_close(inp.running_var, rv)


def test_momentum_none_needs_counter():
    inp = make_inputs(3, 4, 6, 6)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        dwconv_bn_act(
            inp.x,
            inp.weight,
            None,
            None,
            None,
            inp.running_mean,
            inp.running_var,
            training=True,
            momentum=None,
        )


# ---- gradcheck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "shape,kernel,stride,activation",
    [
        ((2, 3, 5, 5), 3, 1, "silu"),
        ((1, 4, 6, 5), (3, 5), 2, "hardswish"),
    ],
)
def test_gradcheck(channels_last, training, shape, kernel, stride, activation):
    inp = make_inputs(*shape, kernel, channels_last=channels_last, bias=True)
    stats = (None, None) if training else (inp.running_mean, inp.running_var)

    def f(x, w, b, g, beta):
        with fastdw.use_backend("cpu"):
            return dwconv_bn_act(
                x, w, b, g, beta, *stats, training=training, stride=stride, activation=activation
            )

    assert torch.autograd.gradcheck(
        f, (inp.x, inp.weight, inp.bias, inp.bn_weight, inp.bn_bias), eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("training", [False, True])
def test_gradgrad_is_not_silently_wrong(training):
    """Double backward is either supported and correct, or raises; it never returns wrong numbers."""
    inp = make_inputs(2, 3, 5, 5, bias=True)
    stats = (None, None) if training else (inp.running_mean, inp.running_var)
    with fastdw.use_backend("cpu"):
        out = dwconv_bn_act(
            inp.x,
            inp.weight,
            inp.bias,
            inp.bn_weight,
            inp.bn_bias,
            *stats,
            training=training,
            activation="silu",
        )
    (gx,) = torch.autograd.grad(out.pow(2).sum(), inp.x, create_graph=True)
    try:
        (gw,) = torch.autograd.grad(gx.sum(), inp.weight)
    except RuntimeError:
        return
    r = inp.clone()
    with fastdw.use_backend("reference"):
        ref = dwconv_bn_act(
            r.x,
            r.weight,
            r.bias,
            r.bn_weight,
            r.bn_bias,
            *((None, None) if training else (r.running_mean, r.running_var)),
            training=training,
            activation="silu",
        )
    (rgx,) = torch.autograd.grad(ref.pow(2).sum(), r.x, create_graph=True)
    (rgw,) = torch.autograd.grad(rgx.sum(), r.weight)
    assert_close(gw, rgw)


# ---- opcheck --------------------------------------------------------------------------------------


def _op_args(
    training,
    channels_last,
    with_bias=True,
    affine=True,
    stats=True,
    kernel=3,
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    activation="relu6",
    requires_grad=True,
    dtype=torch.float64,
):
    inp = make_inputs(
        2,
        5,
        6,
        7,
        kernel,
        channels_last=channels_last,
        bias=with_bias,
        affine=affine,
        stats=stats,
        requires_grad=requires_grad,
        dtype=dtype,
    )
    return (
        inp.x,
        inp.weight,
        inp.bias,
        inp.bn_weight,
        inp.bn_bias,
        inp.running_mean,
        inp.running_var,
        training,
        1e-5,
        list(stride),
        list(padding),
        list(dilation),
        activation,
    )


OPCHECK_SAMPLES = {
    "eval-nchw-all": dict(training=False, channels_last=False),
    "eval-cl-nobias-noaffine": dict(training=False, channels_last=True, with_bias=False, affine=False),
    "eval-nobn": dict(training=False, channels_last=False, affine=False, stats=False, activation="silu"),
    "train-nchw-all": dict(training=True, channels_last=False, activation="hardswish"),
    "train-cl-nostats": dict(training=True, channels_last=True, stats=False, activation="relu"),
    "train-cl-noaffine-nobias": dict(training=True, channels_last=True, with_bias=False, affine=False),
    "eval-rect-s2-d2": dict(
        training=False,
        channels_last=True,
        kernel=(3, 5),
        stride=(2, 1),
        padding=(0, 2),
        dilation=(1, 2),
        activation="none",
    ),
    "train-float32": dict(training=True, channels_last=False, dtype=torch.float32, activation="silu"),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES), ids=str)
def test_opcheck_forward(sample):
    check_opcheck_forward(sample)


def check_opcheck_forward(sample: str, prefix: str = "") -> None:
    """opcheck of fastdw::<prefix>dwconv_bn_act ('' the C++ op, 'triton_' its Triton twin)."""
    args = _op_args(**OPCHECK_SAMPLES[sample])
    torch.library.opcheck(getattr(torch.ops.fastdw, f"{prefix}dwconv_bn_act").default, args)


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES), ids=str)
def test_opcheck_backward(sample):
    check_opcheck_backward(sample)


def check_opcheck_backward(sample: str, prefix: str = "") -> None:
    args = _op_args(**OPCHECK_SAMPLES[sample], requires_grad=False)
    out, save_mean, save_var = getattr(torch.ops.fastdw, f"{prefix}dwconv_bn_act")(*args)
    x, w, b, g, beta, mean, var, training, eps, stride, padding, dilation, act = args
    if training:
        mean, var = save_mean, save_var
    grad_out = torch.randn_like(out)
    for mask in (
        [True, True, b is not None, g is not None, beta is not None],
        [True, False, False, False, False],
        [False, True, True, True, True],
    ):
        torch.library.opcheck(
            getattr(torch.ops.fastdw, f"{prefix}dwconv_bn_act_backward").default,
            (grad_out, x, w, b, g, beta, mean, var, training, eps, stride, padding, dilation, act, mask),
        )
        if not prefix:  # the C++ op also takes the forward's output (the Triton twin does not)
            torch.library.opcheck(
                torch.ops.fastdw.dwconv_bn_act_backward.default,
                (grad_out, x, w, b, g, beta, mean, var, training, eps, stride, padding, dilation, act, mask,
                 1, out),
            )


def test_op_returns_batch_statistics():
    """In training the op returns the batch mean and biased variance of conv(x) + bias."""
    inp = make_inputs(3, 5, 6, 7, bias=True, requires_grad=False)
    out, mean, var = torch.ops.fastdw.dwconv_bn_act(
        inp.x,
        inp.weight,
        inp.bias,
        inp.bn_weight,
        inp.bn_bias,
        None,
        None,
        True,
        1e-5,
        [1, 1],
        [1, 1],
        [1, 1],
        "none",
    )
    z = torch.nn.functional.conv2d(inp.x, inp.weight, inp.bias, 1, 1, 1, 5)
    assert_close(mean, z.mean((0, 2, 3)))
    assert_close(var, z.var((0, 2, 3), unbiased=False))
    _, mean, var = torch.ops.fastdw.dwconv_bn_act(
        inp.x,
        inp.weight,
        inp.bias,
        inp.bn_weight,
        inp.bn_bias,
        inp.running_mean,
        inp.running_var,
        False,
        1e-5,
        [1, 1],
        [1, 1],
        [1, 1],
        "none",
    )
    assert mean.numel() == 0 and var.numel() == 0


# ---- torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,channels_last,momentum", [("eval", True, 0.1), ("train", False, 0.1), ("train", True, None)]
)
def test_compile_fullgraph(mode, channels_last, momentum):
    check_compile_fullgraph(mode, channels_last, momentum)


def check_compile_fullgraph(mode: str, channels_last: bool, momentum, backend: str = "auto") -> None:
    """torch.compile(fullgraph=True) of DWConvBNAct, the backend forced while it runs, vs eager."""
    torch._dynamo.reset()
    model = DWConvBNAct(8, 3, stride=1, activation="hardswish", bias=True, momentum=momentum).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    model.train(mode == "train")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(2):
        x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with fastdw.use_backend(backend):
            out = compiled(xc)
        expected = eager(xe)
        assert_close(out, expected, what=f"output step {step}")
        assert_same_memory_format(out, x)
        go = torch.randn_like(expected)
        with fastdw.use_backend(backend):
            out.backward(go)
        expected.backward(go)
        assert_close(xc.grad, xe.grad, what="grad x")
        for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
            assert_close(p.grad, pe.grad, what=f"grad {name}")
        for (name, b), (_, be) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
            assert_close(b, be, what=f"buffer {name} step {step}")
    if mode == "train":
        assert int(model[1].num_batches_tracked) == 2


# ---- CPU instruction sets -------------------------------------------------------------------------

CAPABILITY_CASES = [
    Case((2, 19, 13, 11), 3, training=True, bias=True, activation="silu"),
    Case((2, 19, 13, 11), 5, stride=2, dilation=2, training=True, channels_last=True, activation="hardswish"),
    Case((3, 21, 9, 23), 3, stride=2, training=False, bias=True, activation="relu6"),
    Case((3, 21, 9, 23), (3, 5), training=False, channels_last=True, bn="noaffine", activation="relu"),
    # NCHW small planes run on the NHWC kernels on transposed slabs: whole 16 x 16 blocks only
    # (C = 32, 8x8 planes) here; the cases above have partial blocks too.
    Case((2, 32, 8, 8), 3, training=True, activation="relu6"),
    Case((2, 32, 8, 8), 3, training=False, activation="relu6"),
    # NCHW planes of > 256 pixels: the native NCHW kernels (the cases above are all <= 256)
    Case((2, 5, 17, 37), 3, stride=2, training=True, activation="relu6"),
    Case((2, 5, 17, 37), 3, training=True, bias=True, activation="hardswish"),
    # channels_last 3x3, dilation 1: two output rows at a time (nhwc_conv_rows), stride 1 and 2
    Case((2, 19, 13, 11), 3, training=True, channels_last=True, activation="relu6"),
    Case((3, 21, 9, 23), 3, stride=2, training=False, bias=True, channels_last=True, activation="silu"),
]


@pytest.mark.parametrize("case", CAPABILITY_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_capability(cpu_capability, case, dtype):
    check_case(case, dtype)


@pytest.mark.parametrize("case", CAPABILITY_CASES, ids=str)
def test_cpu_capabilities_agree(case):
    """Every instruction set gives the same result (to rounding) on the same inputs."""
    from fastdw import _C

    original = _C.cpu_capability()
    inp = inputs_for(case, torch.float32)
    n, c, _, _ = case.shape
    go = torch.randn(n, c, *case.out_hw())
    results = {}
    try:
        for cap in SUPPORTED_CAPABILITIES:
            _C.set_cpu_capability(cap)
            i = inp.clone()
            out, grads = run_op(case, i, "cpu", go)
            results[cap] = (out, grads, i.stats())
    finally:
        _C.set_cpu_capability(original)
    assert _C.cpu_capability() == original
    base_out, base_grads, base_stats = results[SUPPORTED_CAPABILITIES[0]]
    terms = n * math.prod(case.out_hw())
    for cap, (out, grads, stats) in results.items():
        assert_close(out, base_out, what=f"{cap} output", tol=1e-5)
        for k in grads:
            tol = 1e-5
            if k == "bias" and case.training and case.bn != "none":
                # BatchNorm on batch statistics cancels the conv bias: its gradient is 0 but for the
                # rounding noise of a sum of N*Ho*Wo terms of either sign, which grows like sqrt(terms)
                tol = 1e-5 * math.sqrt(terms)
            assert_close(grads[k], base_grads[k], what=f"{cap} grad {k}", tol=tol)
        for k in stats:
            assert_close(stats[k], base_stats[k], what=f"{cap} {k}", tol=1e-5)


def test_capability_fixture_restores():
    from fastdw import _C

    assert _C.cpu_capability() in SUPPORTED_CAPABILITIES
    with pytest.raises(ValueError, match="capability"):
        _C.set_cpu_capability("sse9")


# ---- determinism and threads ----------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_and_thread_count(channels_last, dtype):
    """Big enough to be split across threads: repeated calls are bitwise identical, and one thread
    gives the same result (to rounding) as all of them."""
    case = Case((4, 32, 16, 16), 3, training=True, bias=True, channels_last=channels_last, activation="silu")
    inp = inputs_for(case, dtype)
    go = torch.randn(4, 32, 16, 16, dtype=torch.float64).to(dtype)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            i = inp.clone()
            out, grads = run_op(case, i, "cpu", go)
            runs.append((out, grads, i.stats()))
    finally:
        torch.set_num_threads(threads)
    (o1, g1, s1), (o2, g2, s2), (o3, g3, s3) = runs
    assert torch.equal(o1, o2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert_close(o3, o1)
    for k in g1:
        assert_close(g3[k], g1[k], what=k)
    for k in s1:
        assert_close(s3[k], s1[k], what=k)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [7, 58])
def test_batch_statistics_with_a_large_mean(channels_last, hw):
    """float32 batch statistics where the conv output is ~1e3 and its spread ~1e-2: no
    cancellation in the mean or the variance. Inputs (1000 + k / 256) and weights (j / 16) are
    chosen so that every conv output is exact in float32 (no padding: all 9 taps, sums < 2^11
    with 12 fractional bits), so any error is the statistics' own. 58x58 planes take several
    partial-sum flushes of the NCHW statistics."""
    g = torch.Generator().manual_seed(0)
    x = 1000 + torch.randint(0, 8, (2, 20, hw, hw), generator=g).float() / 256
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = fastdw.nn.DWConvBNAct(20, 3, padding=0, momentum=1.0).train()
    with torch.no_grad():
        m[0].weight.copy_(torch.randint(1, 4, (20, 1, 3, 3), generator=g).float() / 16)
    with fastdw.use_backend("cpu"):
        m(x)
    z = torch.nn.functional.conv2d(x.double(), m[0].weight.detach().double(), groups=20)
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
    ulp = torch.finfo(torch.float32).eps * mean.abs()  # the running mean is stored in float32
    assert ((m[1].running_mean.double() - mean).abs() <= 1e-3 * var.sqrt() + ulp).all()
    torch.testing.assert_close(m[1].running_var.double(), var, rtol=1e-5, atol=0)
