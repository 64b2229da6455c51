"""Channel shuffle and Squeeze-and-Excitation: fastdw against PyTorch eager, on CPU.

    python -m bench.shuffle [--threads 2] [--reps 21] [--quick] [--out bench/results]

Tables (Markdown, times in ms, medians of interleaved repetitions; speed-up = PyTorch / fastdw),
also written to <out>/shuffle.md and shuffle.json:

1. ShuffleNetV2 unit (torchvision ``InvertedResidual``, stride 1, 116 channels, 28x28, eval)
   against the same unit built from fastdw primitives: ``fastdw.nn.DWConvBNAct`` for the depthwise
   conv + BN and ``fastdw.ops.concat_shuffle`` for the concat + shuffle (same modules, same weights).
2. ``concat_shuffle(x1, b)`` against ``F.channel_shuffle(torch.cat([x1, b], 1), 2)`` on the unit's
   tensors (x1 a channel slice of the block input): the fused path must be >= 1.5x faster.
3. ``fastdw.ops.channel_shuffle`` against ``F.channel_shuffle`` standalone.
4. ``fastdw.nn.SqueezeExcite`` against torchvision's ``SqueezeExcitation`` (Hardsigmoid gate, as in
   MobileNetV3) at MobileNetV3-Large shapes, inference and training (forward + backward).

Denormals are flushed (torch.set_flush_denormal(True)); BatchNorm statistics are calibrated on
random data first. Every fastdw result is checked against PyTorch's before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import fastdw
from bench import timing

FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
MIN_TIME = 0.002  # seconds per timed round, so 10 us ops are timed over many calls


def measure(fns, reps: int) -> dict[str, float]:
    return timing.interleaved(fns, reps=reps, min_time=MIN_TIME)


def section(title: str, header: list[str], rows: list[list[object]]) -> str:
    return f"### {title}\n\n" + timing.markdown_table(header, rows) + "\n"


def check(got: torch.Tensor, expect: torch.Tensor, what: str, exact: bool = False) -> None:
    ok = torch.equal(got, expect) if exact else torch.allclose(got, expect, rtol=1e-4, atol=1e-4)
    if not ok:
        raise AssertionError(f"{what}: fastdw differs from PyTorch (max abs diff "
                             f"{(got - expect).abs().max().item():.3g})")


# --- 1. ShuffleNetV2 unit -------------------------------------------------------------------------


class FusedShuffleUnit(nn.Module):
    """torchvision's stride-1 ShuffleNetV2 ``InvertedResidual`` from fastdw primitives (sharing its
    modules): 1x1 conv + BN + ReLU (eager), depthwise 3x3 + BN (DWConvBNAct), 1x1 conv + BN + ReLU
    (eager), then concat + shuffle in one pass (concat_shuffle)."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        b = unit.branch2
        self.pw1 = nn.Sequential(b[0], b[1], b[2])
        self.dw = fastdw.nn.DWConvBNAct.from_modules(b[3], b[4], None)
        self.pw2 = nn.Sequential(b[5], b[6], b[7])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return fastdw.ops.concat_shuffle(x1, self.pw2(self.dw(self.pw1(x2))))


def bench_unit(reps: int, results: dict) -> str:
    from torchvision.models.shufflenetv2 import InvertedResidual

    torch.manual_seed(0)
    unit = InvertedResidual(116, 116, 1)
    with torch.no_grad():  # realistic BatchNorm statistics: a few training batches of random data
        unit.train()
        for _ in range(3):
            unit(torch.randn(8, 116, 28, 28))
    unit.eval()
    fused = FusedShuffleUnit(unit).eval()
    rows = []
    for n in (1, 8):
        for fmt_name, fmt in FORMATS.items():
            x = torch.randn(n, 116, 28, 28).contiguous(memory_format=fmt)
            with torch.inference_mode():
                check(fused(x), unit(x), f"ShuffleNetV2 unit N={n} {fmt_name}")
                t = measure({"torch": lambda x=x: unit(x), "fastdw": lambda x=x: fused(x)}, reps)
            results["unit"].append({"n": n, "format": fmt_name, "ms": t})
            rows.append([n, fmt_name, t["torch"], t["fastdw"], f"{t['torch'] / t['fastdw']:.2f}x"])
    return section("ShuffleNetV2 unit (torchvision InvertedResidual, stride 1, 116 ch, 28x28, eval, ms)",
                   ["N", "format", "torchvision", "fastdw", "speed-up"], rows)


# --- 2. concat + shuffle --------------------------------------------------------------------------


def bench_concat_shuffle(reps: int, results: dict) -> str:
    rows = []
    for n in (1, 8):
        for fmt_name, fmt in FORMATS.items():
            x = torch.randn(n, 116, 28, 28).contiguous(memory_format=fmt)
            x1 = x.chunk(2, dim=1)[0]  # the pass-through half: a channel slice, as in the unit
            b = torch.randn(n, 58, 28, 28).contiguous(memory_format=fmt)
            with torch.inference_mode():
                check(fastdw.ops.concat_shuffle(x1, b), F.channel_shuffle(torch.cat([x1, b], 1), 2),
                      "concat_shuffle", exact=True)
                t = measure({"torch": lambda x1=x1, b=b: F.channel_shuffle(torch.cat([x1, b], 1), 2),
                             "fastdw": lambda x1=x1, b=b: fastdw.ops.concat_shuffle(x1, b)}, reps)
            results["concat_shuffle"].append({"n": n, "format": fmt_name, "ms": t})
            rows.append([n, fmt_name, t["torch"], t["fastdw"], f"{t['torch'] / t['fastdw']:.2f}x"])
    return section("concat + shuffle(2): x1 = x.chunk(2, 1)[0] and b, each [N, 58, 28, 28] (ms)",
                   ["N", "format", "cat + F.channel_shuffle", "concat_shuffle", "speed-up"], rows)


# --- 3. standalone channel shuffle ------------------------------------------------------------------

SHUFFLE_CASES = [(116, 28, 2), (232, 14, 2), (240, 28, 3), (384, 14, 8)]  # (C, H = W, groups)


def bench_channel_shuffle(reps: int, results: dict) -> str:
    rows = []
    for n in (1, 8):
        for c, hw, g in SHUFFLE_CASES:
            for fmt_name, fmt in FORMATS.items():
                x = torch.randn(n, c, hw, hw).contiguous(memory_format=fmt)
                with torch.inference_mode():
                    check(fastdw.ops.channel_shuffle(x, g), F.channel_shuffle(x, g), "channel_shuffle",
                          exact=True)
                    t = measure({"torch": lambda x=x, g=g: F.channel_shuffle(x, g),
                                 "fastdw": lambda x=x, g=g: fastdw.ops.channel_shuffle(x, g)}, reps)
                results["channel_shuffle"].append({"shape": [n, c, hw, hw], "groups": g, "format": fmt_name,
                                                   "ms": t})
                rows.append([f"{n}x{c}x{hw}x{hw}", g, fmt_name, t["torch"], t["fastdw"],
                             f"{t['torch'] / t['fastdw']:.2f}x"])
    return section("channel_shuffle standalone (ms)",
                   ["shape", "groups", "format", "F.channel_shuffle", "fastdw", "speed-up"], rows)


# --- 4. Squeeze-and-Excitation --------------------------------------------------------------------

SE_SHAPES = [(72, 56, 24), (120, 28, 32), (480, 14, 120), (672, 14, 168), (960, 7, 240)]  # (C, H = W, S)


def _train_step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(gy)


def bench_se(reps: int, train: bool, results: dict) -> str:
    from torchvision.ops.misc import SqueezeExcitation

    rows = []
    for n in (1, 8):
        for c, hw, s in SE_SHAPES:
            torch.manual_seed(0)
            se = SqueezeExcitation(c, s, scale_activation=nn.Hardsigmoid)
            fused = fastdw.nn.SqueezeExcite.from_module(se)
            for fmt_name, fmt in FORMATS.items():
                x = torch.randn(n, c, hw, hw).contiguous(memory_format=fmt)
                with torch.inference_mode():
                    check(fused(x), se(x), f"SqueezeExcite N={n} C={c} {fmt_name}")
                    t = measure({"torch": lambda x=x, m=se: m(x), "fastdw": lambda x=x, m=fused: m(x)}, reps)
                entry = {"shape": [n, c, hw, hw], "squeeze": s, "format": fmt_name, "ms": t}
                row = [f"{n}x{c}x{hw}x{hw}", s, fmt_name, t["torch"], t["fastdw"],
                       f"{t['torch'] / t['fastdw']:.2f}x"]
                if train:
                    xg, gy = x.clone().requires_grad_(), torch.randn_like(x)
                    tt = measure({"torch": lambda m=se, xg=xg, gy=gy: _train_step(m, xg, gy),
                                  "fastdw": lambda m=fused, xg=xg, gy=gy: _train_step(m, xg, gy)}, reps)
                    entry["train_ms"] = tt
                    row += [tt["torch"], tt["fastdw"], f"{tt['torch'] / tt['fastdw']:.2f}x"]
                results["se"].append(entry)
                rows.append(row)
    header = ["N x C x H x W", "S", "format", "torchvision", "fastdw", "speed-up"]
    if train:
        header += ["train torchvision", "train fastdw", "train speed-up"]
    return section("SqueezeExcitation at MobileNetV3-Large shapes, hardsigmoid gate (ms; train = forward + "
                   "backward)", header, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="7 repetitions, no SE training step")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    args = p.parse_args(argv)
    timing.setup(args.threads)
    reps = 7 if args.quick else args.reps
    cap = fastdw._C.cpu_capability() if fastdw._backend.extension_loaded() else "reference (not built)"
    print(f"fastdw shuffle / SE benchmark: {args.threads} threads, float32, CPU kernels: {cap}, "
          f"{reps} interleaved repetitions, denormals flushed\n")

    results: dict = {"machine": timing.machine(), "capability": cap, "unit": [], "concat_shuffle": [],
                     "channel_shuffle": [], "se": []}
    parts = [bench_unit(reps, results), bench_concat_shuffle(reps, results),
             bench_channel_shuffle(reps, results), bench_se(reps, not args.quick, results)]
    for part in parts[:3]:
        print(part)
    print(parts[3])

    def worst(key: str) -> float:
        return min(r["ms"]["torch"] / r["ms"]["fastdw"] for r in results[key])

    summary = (f"concat_shuffle vs cat + channel_shuffle: worst speed-up {worst('concat_shuffle'):.2f}x "
               f"(target >= 1.5x: {'met' if worst('concat_shuffle') >= 1.5 else 'NOT met'}); "
               f"channel_shuffle vs F.channel_shuffle: worst {worst('channel_shuffle'):.2f}x")
    print(summary)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shuffle.md"), "w") as f:
        f.write(f"`python -m bench.shuffle --threads {args.threads}` ({cap})\n\n" + "\n".join(parts)
                + "\n" + summary + "\n")
    with open(os.path.join(args.out, "shuffle.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
