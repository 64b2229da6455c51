"""Benchmark of the bundled models against their torchvision twins, eager inference on CPU.

    python -m bench.models [--threads 2] [--reps 20] [--models mobilenet_v2,...] [--out bench/results]

For each model, batch size (1, 8) and memory format (NCHW, channels_last): torchvision's eager
model and fastdw.models' twin with the same weights, in eval mode under ``torch.no_grad``, 224x224,
float32. BatchNorm statistics are calibrated with a few random training-mode batches (no pretrained
weights offline) and denormals are flushed. The twin's output is checked against torchvision's
before timing. Reported: medians of interleaved repetitions and the speed-up (torchvision time /
fastdw time, same memory format), then where fastdw's time goes (profiler, self CPU time by op
kind) at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections import defaultdict

import torch

from bench import timing
from fastdw import models
from fastdw.bench.models import torchvision_model

TARGETS = ["mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0"]
DEFAULT = TARGETS + ["mobilenet_v3_small", "squeezenet1_1"]
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torchvision's model with calibrated BatchNorm statistics and fastdw's twin with its weights."""
    theirs = torchvision_model(name, 224)  # seeded; BN statistics calibrated whatever the momentum
    ours = getattr(models, name)()
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs


def bench_model(name: str, batch: int, reps: int) -> dict[str, float]:
    ours, theirs = pair(name)
    fns, x = {}, torch.randn(batch, 3, 224, 224)
    for fmt_name, fmt in FORMATS.items():
        xf = x.contiguous(memory_format=fmt)
        o, t = copy.deepcopy(ours).to(memory_format=fmt), copy.deepcopy(theirs).to(memory_format=fmt)
        with torch.no_grad():
            expected, got = t(xf), o(xf)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)
        fns[f"torchvision_{fmt_name}"] = lambda t=t, xf=xf: t(xf)
        fns[f"fastdw_{fmt_name}"] = lambda o=o, xf=xf: o(xf)
    with torch.no_grad():
        return timing.interleaved(fns, reps=reps, warmup=3)


# op name -> kind, for "where does the time go"
KINDS = [
    ("fastdw::dwconv_bn_act", "depthwise conv + BN + act (fastdw)"),
    ("fastdw::se_scale", "SE (fastdw)"),
    ("fastdw::concat_shuffle", "concat + shuffle (fastdw)"),
    ("fastdw::channel_shuffle", "channel shuffle (fastdw)"),
    ("convolution", "dense convs (oneDNN / im2col)"),
    ("conv2d", "dense convs (oneDNN / im2col)"),
    ("batch_norm", "BatchNorm (training-style, unfolded)"),
    ("addmm", "classifier"),  # before "add"
    ("linear", "classifier"),
    ("clamp", "activations"),
    ("hardswish", "activations"),
    ("relu", "activations"),
    ("hardtanh", "activations"),
    ("add", "residual adds"),
    ("cat", "concat"),
    ("max_pool", "pooling"),
    ("mean", "pooling"),
    ("avg_pool", "pooling"),
    ("copy", "copies / layout"),
]


def breakdown(name: str, fmt: torch.memory_format, runs: int = 5) -> dict[str, float]:
    """Share of fastdw's self CPU time per op kind (batch 1), in percent."""
    from torch.profiler import ProfilerActivity, profile

    ours, _ = pair(name)
    ours = ours.to(memory_format=fmt)
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=fmt)
    with torch.no_grad():
        for _ in range(3):
            ours(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                ours(x)
    shares: dict[str, float] = defaultdict(float)
    total = 0.0
    for evt in prof.key_averages():
        t = evt.self_cpu_time_total
        total += t
        kind = next((k for key, k in KINDS if key in evt.key), "other")
        shares[kind] += t
    return {k: 100.0 * v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v > 0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--models", default=",".join(DEFAULT))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    args = p.parse_args(argv)
    timing.setup(args.threads)
    names = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"fastdw.models vs torchvision, eager inference, {args.threads} threads, float32, 224x224, "
          f"denormals flushed, BN calibrated on random data\n")

    rows, results = [], {"machine": timing.machine(), "runs": []}
    for name in names:
        for batch in batches:
            t = bench_model(name, batch, args.reps)
            results["runs"].append({"model": name, "batch": batch, "ms": t})
            row = [name, batch] + [t[k] for k in ("torchvision_nchw", "fastdw_nchw", "torchvision_cl",
                                                  "fastdw_cl")]
            row += [t["torchvision_nchw"] / t["fastdw_nchw"], t["torchvision_cl"] / t["fastdw_cl"],
                    min(t["torchvision_nchw"], t["torchvision_cl"]) / min(t["fastdw_nchw"], t["fastdw_cl"])]
            rows.append(row)
            print(timing.markdown_table(HEADER, [row]).splitlines()[-1], flush=True)
    table = timing.markdown_table(HEADER, rows)
    print("\n" + table + "\n")

    parts = []
    if not args.no_breakdown:
        for name in [n for n in TARGETS if n in names]:
            for fmt_name, fmt in FORMATS.items():
                shares = breakdown(name, fmt)
                entry = {"model": name, "format": fmt_name, "percent": shares}
                results.setdefault("breakdown", []).append(entry)
                line = ", ".join(f"{k} {v:.0f}%" for k, v in shares.items() if v >= 1.0)
                parts.append(f"- {name} {fmt_name}, batch 1: {line}")
        print("Where fastdw's time goes (self CPU time, batch 1):\n" + "\n".join(parts))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "models.md"), "w") as f:
        f.write(f"`python -m bench.models --threads {args.threads} --reps {args.reps}`: eager inference, "
                f"float32, 224x224, torch.no_grad, denormals flushed, BN calibrated on random data. "
                f"Times in ms (medians of interleaved repetitions); x = torchvision / fastdw.\n\n")
        f.write(table + "\n")
        if parts:
            f.write("\nWhere fastdw's time goes (profiler, self CPU time, batch 1):\n\n")
            f.write("\n".join(parts) + "\n")
    with open(os.path.join(args.out, "models.json"), "w") as f:
        json.dump(results, f, indent=1)


HEADER = ["model", "batch", "torchvision NCHW", "fastdw NCHW", "torchvision CL", "fastdw CL", "x NCHW",
          "x CL", "x best vs best"]


if __name__ == "__main__":
    main()
