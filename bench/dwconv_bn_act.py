"""Benchmark of the fused depthwise conv + BN + ReLU6 op at MobileNetV2 shapes.

    python -m bench.dwconv_bn_act [--threads 2] [--reps 30] [--out bench/results]

Eval (float32, forward): fastdw vs eager Conv2d -> BatchNorm2d -> ReLU6 (3 ops), eager with BN
folded into the conv + clamp_, oneDNN's fused conv+hardtanh (what torch.compile calls on CPU) and
two floors no kernel can beat: a plain copy of the output bytes and a read of the input bytes
(`amax` over x, channels_last). Training (forward + backward of one
layer, batch statistics): fastdw vs eager. Every fastdw result is checked against eager first.
BatchNorm statistics are calibrated with a few training-mode batches; denormals are flushed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import fastdw
from fastdw.bench import models, timing
from fastdw.bench.ops import near_kinks

# (N, C, H, W, stride): the anchors of ../shared/ANCHORS.md plus the rest of MobileNetV2's dw layers.
SHAPES = [
    (1, 32, 112, 112, 1),
    (1, 96, 112, 112, 2),
    (1, 144, 56, 56, 1),
    (1, 144, 56, 56, 2),
    (1, 192, 28, 28, 1),
    (1, 384, 14, 14, 1),
    (1, 576, 14, 14, 2),
    (1, 960, 7, 7, 1),
    (8, 144, 56, 56, 1),
    (32, 144, 56, 56, 1),
]
QUICK = [(1, 96, 112, 112, 2), (1, 144, 56, 56, 1), (1, 960, 7, 7, 1), (8, 144, 56, 56, 1)]


def make_layer(c: int, stride: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
    with torch.no_grad():  # realistic statistics: a few training batches of random data
        layer.train()
        for _ in range(3):
            layer(torch.randn(2, c, 16, 16))
    return layer


def folded(layer: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = layer[0], layer[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = (conv.weight * scale.view(-1, 1, 1, 1)).detach().contiguous()
    b = (bn.bias - bn.running_mean * scale).detach().contiguous()
    return w, b


def bench_eval(shape, reps: int) -> dict[str, float]:
    n, c, h, w, s = shape
    layer = make_layer(c, s).eval()
    fused = fastdw.nn.DWConvBNAct.from_modules(layer[0], layer[1], layer[2]).eval()
    x = torch.randn(n, c, h, w)
    xcl = x.contiguous(memory_format=torch.channels_last)
    wf, bf = folded(layer)
    wf_cl = wf.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = layer(x)
        for xx in (x, xcl):
            got = fused(xx)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            assert got.is_contiguous(memory_format=torch.channels_last) == (xx is xcl)
        out_bytes = ref.clone()
        fns = {
            "eager_nchw": lambda: layer(x),
            "eager_cl": lambda: layer(xcl),
            "folded_nchw": lambda: F.conv2d(x, wf, bf, s, 1, 1, c).clamp_(0, 6),
            "folded_cl": lambda: F.conv2d(xcl, wf_cl, bf, s, 1, 1, c).clamp_(0, 6),
            "onednn_cl": lambda: torch.ops.mkldnn._convolution_pointwise(
                xcl, wf_cl, bf, [1, 1], [s, s], [1, 1], c, "hardtanh", [0.0, 6.0], ""),
            "fastdw_nchw": lambda: fused(x),
            "fastdw_cl": lambda: fused(xcl),
            "copy_out": lambda: out_bytes.clone(),
            # the op reads all of x: at a stride-2 layer (input 4x the output) that read is most of its time
            "read_in": lambda: torch.amax(xcl),
        }
        return timing.interleaved(fns, reps=reps, min_time=0.002)


def bench_train(shape, reps: int) -> dict[str, float]:
    n, c, h, w, s = shape
    layer = make_layer(c, s).train()
    fused = fastdw.nn.DWConvBNAct.from_modules(layer[0], layer[1], layer[2]).train()
    x = torch.randn(n, c, h, w)
    xcl = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(layer(x))

    def step(model, inp, g):
        def f():
            inp_ = inp.detach().requires_grad_()
            model(inp_).backward(g)
        return f

    # correctness of the training step (grads of input and conv weight) before timing; no gradient
    # where the pre-activation is within float32 rounding of a ReLU6 kink (fastdw.bench.ops.near_kinks)
    with torch.no_grad():
        grad_check = grad.masked_fill(near_kinks(copy.deepcopy(layer[:2])(x), "relu6"), 0.0)
    for xx in (x, xcl):
        outs = []
        for model in (layer, fused):
            model.zero_grad()
            xi = xx.detach().requires_grad_()
            model(xi).backward(grad_check)
            outs.append((xi.grad, layer[0].weight.grad.clone()))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-2)
    # channels_last steps get a channels_last output gradient, as the next layer of a CL model hands on
    grad_cl = grad.contiguous(memory_format=torch.channels_last)
    fns = {
        "eager_nchw": step(layer, x, grad),
        "eager_cl": step(layer, xcl, grad_cl),
        "fastdw_nchw": step(fused, x, grad),
        "fastdw_cl": step(fused, xcl, grad_cl),
    }
    # Whole rounds repeated until one takes >= 2 ms, as in bench_eval: a single step of a batch-1
    # layer is 0.3-1 ms, and ten one-step samples gave medians that moved by 10% between runs.
    return timing.interleaved(fns, reps=reps, min_time=0.002)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes held for backward by one training forward (fastdw.bench.models.saved_bytes)."""
    return models.saved_bytes(lambda: model(x.requires_grad_()))[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--cpu-time", action="store_true",
                   help="time with thread CPU time (needs --threads 1): robust on a loaded machine")
    args = p.parse_args(argv)
    timing.setup(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            p.error("--cpu-time needs --threads 1")
        from fastdw.bench.timing import use_cpu_time

        use_cpu_time()
    shapes = QUICK if args.quick else SHAPES
    cap = timing.capability()
    print(f"fastdw dwconv_bn_act benchmark: {args.threads} threads, float32, CPU kernels: {cap}\n")

    rows, results = [], {"machine": timing.machine(), "capability": cap, "eval": [], "train": []}
    for shape in shapes:
        t = bench_eval(shape, args.reps)
        results["eval"].append({"shape": shape, "ms": t})
        rows.append([", ".join(map(str, shape))] + [t[k] for k in (
            "eager_nchw", "eager_cl", "folded_nchw", "folded_cl", "onednn_cl", "fastdw_nchw", "fastdw_cl",
            "copy_out", "read_in")] + [t["eager_nchw"] / t["fastdw_nchw"], t["eager_cl"] / t["fastdw_cl"],
                            t["folded_cl"] / t["fastdw_cl"], t["onednn_cl"] / t["fastdw_cl"]])
    eval_md = timing.markdown_table(
        ["N, C, H, W, s", "eager NCHW", "eager CL", "folded NCHW", "folded CL", "oneDNN CL", "fastdw NCHW",
         "fastdw CL", "copy out", "read in", "x eager NCHW", "x eager CL", "x folded CL", "x oneDNN"], rows)
    print("Eval forward (ms; 'x' columns: speed-up of fastdw, same memory format)\n")
    print(eval_md + "\n")

    train_md = ""
    if not args.no_train:
        rows = []
        for shape in shapes[:-1] if not args.quick else shapes:
            t = bench_train(shape, args.reps)
            results["train"].append({"shape": shape, "ms": t})
            rows.append([", ".join(map(str, shape))] + [t[k] for k in (
                "eager_nchw", "eager_cl", "fastdw_nchw", "fastdw_cl")] + [
                t["eager_nchw"] / t["fastdw_nchw"], t["eager_cl"] / t["fastdw_cl"]])
        train_md = timing.markdown_table(
            ["N, C, H, W, s", "eager NCHW", "eager CL", "fastdw NCHW", "fastdw CL", "x NCHW", "x CL"], rows)
        print("Training step, one layer, forward + backward (ms)\n")
        print(train_md + "\n")
        n, c, h, w, s = 8, 144, 56, 56, 1
        layer = make_layer(c, s).train()
        fused = fastdw.nn.DWConvBNAct.from_modules(layer[0], layer[1], layer[2]).train()
        x = torch.randn(n, c, h, w)
        eager_b, fused_b = saved_bytes(layer, x.clone()), saved_bytes(fused, x.clone())
        results["saved_bytes"] = {"shape": [n, c, h, w, s], "eager": eager_b, "fastdw": fused_b}
        line = (f"Bytes saved for backward, one layer {n}x{c}x{h}x{w}: eager {eager_b / 2**20:.2f} MiB, "
                f"fastdw {fused_b / 2**20:.2f} MiB")
        print(line)
        train_md += "\n\n" + line

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dwconv_bn_act.md"), "w") as f:
        flags = f"--threads {args.threads}" + (" --cpu-time" if args.cpu_time else "")
        flags += " --quick" if args.quick else ""
        f.write(f"`python -m bench.dwconv_bn_act {flags}` ({cap})\n\n")
        f.write("Eval forward (ms)\n\n" + eval_md + "\n\nTraining step (ms)\n\n" + train_md + "\n")
    with open(os.path.join(args.out, "dwconv_bn_act.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
