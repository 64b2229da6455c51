"""Single layers at the real shapes of MobileNetV2/V3 and ShuffleNetV2: fastdw's fused op against
the eager PyTorch sequence it replaces.

Ops (``--ops``): ``dwconv`` (depthwise conv -> BatchNorm -> activation), ``se`` (torchvision's
``SqueezeExcitation``), ``shuffle`` (ShuffleNetV2's ``cat`` + 2-group channel shuffle, and one
ShuffleNetV1 3-group ``channel_shuffle``). Engines: eager (NCHW, channels_last), eager with the BN
folded into the conv (dwconv only), ``torch.compile`` of the eager sequence, fastdw (NCHW,
channels_last). Inference is the forward in eval mode under ``torch.no_grad``; training is forward
+ backward in training mode (batch statistics, running-stat updates). Every result is compared
with eager NCHW before it is timed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fastdw
from fastdw.bench import engines, timing
from fastdw.bench.engines import Settings, Skipped
from fastdw.bench.models import TRAIN_TOLERANCE, Mismatch, build_and_run, check, keep_if_close
from fastdw.bench.report import FASTDW_ENGINES, Row

OPS = ("dwconv", "se", "shuffle")
INFERENCE = ["eager", "eager_cl", "folded", "folded_cl", "compile", "fastdw", "fastdw_cl"]
TRAINING = ["eager", "eager_cl", "compile", "fastdw", "fastdw_cl"]
_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish,
                                             "none": nn.Identity}
# The pre-activation values where an activation's derivative jumps.
KINKS: dict[str, tuple[float, ...]] = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0),
                                       "none": ()}


def near_kinks(pre: torch.Tensor, act: str, eps: float = 1e-4) -> torch.Tensor:
    """Where the pre-activation ``pre`` lies within ``eps`` of a kink of ``act``. There two correct
    float32 implementations may round it to different sides and pass or stop that pixel's gradient:
    one such pixel moves a whole kernel footprint of the input gradient (e.g. 9 elements by ~0.2; 3
    of 65 fresh 8x144x56x56 ReLU6 layers had one, once eager's rounding and once fastdw's against
    float64). The training checks give those pixels no gradient."""
    near = torch.zeros_like(pre, dtype=torch.bool)
    for k in KINKS[act]:
        near |= (pre - k).abs() < eps
    return near


@dataclass(frozen=True)
class OpCase:
    """One layer: which op, the model it comes from, and its shape (batch given separately)."""

    op: str
    source: str
    c: int
    hw: int
    stride: int = 1
    kernel: int = 3
    act: str = "relu6"
    squeeze: int = 0  # SE: channels of the squeeze FC
    groups: int = 2  # shuffle

    def key(self, n: int) -> dict[str, object]:
        if self.op == "dwconv":
            detail = f"k{self.kernel} s{self.stride} {self.act}"
        elif self.op == "se":
            detail = f"squeeze {self.squeeze}"
        else:
            detail = "cat + shuffle g2" if self.groups == 2 else f"channel_shuffle g{self.groups}"
        return {"op": self.op, "layer": f"{self.source} {detail}", "N, C, H, W": f"{n}, {self.c}, {self.hw}, "
                                                                               f"{self.hw}"}


# Layers of the three target networks (torchvision's, 224x224), a few of each kind of shape.
CASES = [
    OpCase("dwconv", "mobilenet_v2", 96, 112, stride=2),
    OpCase("dwconv", "mobilenet_v2", 144, 56),
    OpCase("dwconv", "mobilenet_v2", 384, 14),
    OpCase("dwconv", "mobilenet_v2", 960, 7),
    OpCase("dwconv", "mobilenet_v3_large", 72, 56, stride=2, kernel=5, act="relu"),
    OpCase("dwconv", "mobilenet_v3_large", 120, 28, kernel=5, act="relu"),
    OpCase("dwconv", "mobilenet_v3_large", 960, 7, kernel=5, act="hardswish"),
    OpCase("dwconv", "shufflenet_v2_x1_0", 24, 56, stride=2, act="none"),
    OpCase("dwconv", "shufflenet_v2_x1_0", 58, 28, act="none"),
    OpCase("se", "mobilenet_v3_large", 72, 28, squeeze=24),
    OpCase("se", "mobilenet_v3_large", 672, 14, squeeze=168),
    OpCase("se", "mobilenet_v3_large", 960, 7, squeeze=240),
    OpCase("shuffle", "shufflenet_v2_x1_0", 116, 28),
    OpCase("shuffle", "shufflenet_v2_x1_0", 464, 7),
    OpCase("shuffle", "shufflenet_v1_g3", 240, 28, groups=3),
]
QUICK = [CASES[i] for i in (0, 1, 6, 10, 12)]


class ConcatShuffle(nn.Module):
    """ShuffleNetV2's stride-1 unit tail as torchvision writes it: keep half the input, concatenate
    the branch output, shuffle with 2 groups."""

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        from torchvision.models.shufflenetv2 import channel_shuffle

        x1, _ = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, branch), dim=1), 2)


class FusedConcatShuffle(nn.Module):
    """The same with ``fastdw.ops.concat_shuffle``: both halves written into their slots at once."""

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        x1, _ = x.chunk(2, dim=1)
        return fastdw.ops.concat_shuffle(x1, branch)


def calibrated_bn(c: int) -> nn.BatchNorm2d:
    """A BatchNorm2d with random affine parameters and plausible running statistics."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def build(case: OpCase, n: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """(eager module, its NCHW inputs) for one layer."""
    x = torch.randn(n, case.c, case.hw, case.hw)
    if case.op == "dwconv":
        c = case.c
        conv = nn.Conv2d(c, c, case.kernel, case.stride, case.kernel // 2, groups=c, bias=False)
        eager = nn.Sequential(conv, calibrated_bn(c), _ACTS[case.act]())
        return eager, [x]
    if case.op == "se":
        from torchvision.ops.misc import SqueezeExcitation

        return SqueezeExcitation(case.c, case.squeeze, scale_activation=nn.Hardsigmoid), [x]
    if case.op == "shuffle":
        if case.groups == 2:
            return ConcatShuffle(), [x, torch.randn(n, case.c // 2, case.hw, case.hw)]
        return nn.ChannelShuffle(case.groups), [x]
    raise ValueError(f"unknown op {case.op!r}; known: {', '.join(OPS)}")


def build_twin(case: OpCase, eager: nn.Module) -> nn.Module:
    """fastdw's module sharing the parameters of ``eager`` (as ``build`` made it, maybe copied)."""
    if case.op == "dwconv":
        return fastdw.nn.DWConvBNAct.from_modules(*eager)
    if case.op == "se":
        return fastdw.nn.SqueezeExcite.from_module(eager)
    return FusedConcatShuffle() if case.groups == 2 else fastdw.nn.ChannelShuffle(case.groups)


def _cl(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.contiguous(memory_format=torch.channels_last) for x in xs]


def _has_bn(m: nn.Module) -> bool:
    return any(isinstance(c, nn.BatchNorm2d) for c in m.modules())


def _inference_fns(case: OpCase, eager: nn.Module, ours: nn.Module, xs: list[torch.Tensor],
                   settings: Settings) -> dict[str, Callable[[], Callable]]:
    """engine -> a builder returning the callable to time (or raising Skipped)."""
    def layout(m: nn.Module, inputs: list[torch.Tensor]) -> Callable:
        return lambda: (lambda: m(*inputs))

    def folded(fmt: torch.memory_format) -> Callable:
        def make() -> Callable:
            m = copy.deepcopy(eager).to(memory_format=fmt)
            engines.fold_bn(m)
            inputs = [x.contiguous(memory_format=fmt) for x in xs]
            return lambda: m(*inputs)
        return make

    def compiled() -> Callable:
        if not settings.compile:
            raise Skipped("--no-compile")
        m, inputs = copy.deepcopy(eager).to(memory_format=torch.channels_last), _cl(xs)
        fn = engines.compile_inference(m, *inputs)
        return lambda: fn(*inputs)

    builders = {
        "eager": layout(eager, xs),
        "eager_cl": layout(copy.deepcopy(eager).to(memory_format=torch.channels_last), _cl(xs)),
        "compile": compiled,
        "fastdw": layout(ours, xs),
        "fastdw_cl": layout(ours, _cl(xs)),
    }
    if _has_bn(eager):
        builders["folded"] = folded(torch.contiguous_format)
        builders["folded_cl"] = folded(torch.channels_last)
    return builders


def bench_inference(case: OpCase, n: int, settings: Settings, reps: int) -> Row:
    eager, xs = build(case, n)
    eager.eval()
    ours = build_twin(case, eager).eval()
    row = Row("ops_eval", case.key(n))
    fns = {}
    with torch.no_grad():
        ref = eager(*xs)
        builders = _inference_fns(case, eager, ours, xs, settings)
        for engine in INFERENCE:
            if engine not in builders:
                row.status[engine] = "n/a"
                continue
            built = build_and_run(engine, builders[engine], row)
            if built is None:
                continue
            fn, out = built
            if engine.startswith("fastdw") and out.is_contiguous(memory_format=torch.channels_last) != (
                    engine.endswith("_cl")) and out.dim() == 4 and out.shape[1] > 1:
                raise Mismatch(f"{engine} on {case}: output memory format differs from the input's")
            keep_if_close(engine, " ".join(map(str, case.key(n).values())), fn, out, ref, row, fns)
        row.ms = timing.interleaved(fns, reps=reps, min_time=0.002, spread=row.spread())
    return row


def _format_of(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def bench_training(case: OpCase, n: int, settings: Settings, reps: int) -> Row:
    eager, xs = build(case, n)
    eager.train()
    grad = torch.randn_like(eager(*xs)).detach()
    if case.op == "dwconv":  # no gradient at the pixels next to a kink (near_kinks), for every engine
        with torch.no_grad():
            grad = grad.masked_fill(near_kinks(copy.deepcopy(eager[:2])(*xs), case.act), 0.0)
    row = Row("ops_train", case.key(n))

    def twin(m: nn.Module) -> nn.Module:
        return build_twin(case, m).train()

    models: dict[str, tuple[nn.Module | Callable, list[torch.Tensor]]] = {
        "eager": (eager, xs),
        "eager_cl": (copy.deepcopy(eager).to(memory_format=torch.channels_last), _cl(xs)),
        "fastdw": (twin(copy.deepcopy(eager)), xs),
        "fastdw_cl": (twin(copy.deepcopy(eager).to(memory_format=torch.channels_last)), _cl(xs)),
    }
    if settings.compile:
        m = copy.deepcopy(eager).to(memory_format=torch.channels_last)
        models["compile"] = (engines.compile_training(m), _cl(xs))
    else:
        row.status["compile"] = "skipped: --no-compile"

    def run(m, inputs, g=grad) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = m(*leaves)
        out.backward(g)
        return out, [x.grad for x in leaves]

    def param_grads(m: nn.Module) -> dict[str, torch.Tensor]:
        return {k.removeprefix("_orig_mod."): p.grad for k, p in m.named_parameters() if p.grad is not None}

    ref_out, ref_grads, ref_params = None, None, None
    fns = {}
    for engine in TRAINING:
        if engine not in models:
            continue
        m, inputs = models[engine]
        try:
            out, grads = run(m, inputs)
        except Exception as e:
            if engine in FASTDW_ENGINES:
                raise
            row.status[engine] = f"error: {engines._short(e)}"
            continue
        params = param_grads(m)
        if ref_out is None:
            ref_out, ref_grads, ref_params = out.detach(), grads, params
        what = f"{' '.join(map(str, case.key(n).values()))} training"
        status = check(engine, f"{what} output", out.detach(), ref_out, TRAIN_TOLERANCE, row)
        for g, gref in zip(grads, ref_grads, strict=True):
            status = status or check(engine, f"{what} input gradient", g, gref, TRAIN_TOLERANCE, row)
        for k, gref in ref_params.items():
            got = params.get(k, torch.zeros(0))
            status = status or check(engine, f"{what} gradient of {k}", got, gref, TRAIN_TOLERANCE, row)
        if status is not None:
            row.status[engine] = status
            continue
        # The timed step gets the output gradient in the output's memory format, as the next layer
        # of a channels_last model would hand it on (an NCHW gradient made every CL engine convert).
        g = grad.contiguous(memory_format=_format_of(out))
        fns[engine] = lambda m=m, inputs=inputs, g=g: run(m, inputs, g)
    row.ms = timing.interleaved(fns, reps=max(5, reps // 2), warmup=2, min_time=0.002,
                                spread=row.spread())
    return row


def select(ops: list[str], quick: bool) -> list[OpCase]:
    """The cases of the chosen ops (the quick subset with ``quick``)."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return [c for c in (QUICK if quick else CASES) if c.op in ops]
