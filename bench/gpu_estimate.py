"""A paper estimate (not a measurement) of what fastdw's GPU kernels should gain on MobileNetV2.

    python -m bench.gpu_estimate [--batch 8] [--dtype float16] [--bandwidth 3.35e12] [--out bench/results]

For every depthwise layer of torchvision's MobileNetV2 at 224x224 (shapes found by running the
model once on CPU with forward hooks) it counts the DRAM bytes each kernel of a sequence must move
at least (every tensor read or written once per kernel, no cache reuse between kernels, halo
re-reads ignored) and the FLOPs, for

- PyTorch's unfused sequence: ``Conv2d`` (depthwise) -> ``BatchNorm2d`` -> ``ReLU6(inplace)``,
  three kernels;
- fastdw's fused kernels as ``csrc/cuda/dwconv_bn_act.cu`` and ``fastdw/triton/dwconv_bn_act.py``
  are designed: eval one pass; training forward two passes over x (statistics, then recompute +
  normalise + activation), writing only the output; backward two passes (reductions, then the
  input gradient), recomputing the conv output instead of saving it.

Depthwise layers do ~2k^2 FLOPs per output element (18 for 3x3) against 4-8 bytes moved per
element, far below the ~100-300 FLOP/byte an H100 needs to be compute-bound, so the time estimate
is bytes / bandwidth. The ratio unfused / fused is what the GPU path should gain on these layers if
both sides run at the same fraction of peak bandwidth; it ignores launch overhead (which favours
fused kernels further at batch 1) and halo/tiling overheads (which cost the fused kernels a few %).
Nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass
class Layer:
    c: int
    h: int
    w: int
    ho: int
    wo: int
    k: int

    def elems(self, n: int) -> tuple[int, int]:
        return n * self.c * self.h * self.w, n * self.c * self.ho * self.wo


def mobilenet_v2_layers() -> list[Layer]:
    import torchvision

    model = torchvision.models.mobilenet_v2().eval()
    layers: list[Layer] = []

    def hook(mod, inp, out):
        x = inp[0]
        layers.append(
            Layer(x.shape[1], x.shape[2], x.shape[3], out.shape[2], out.shape[3], mod.kernel_size[0])
        )

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels and m.groups > 1:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    return layers


def traffic(layer: Layer, n: int, b: int) -> dict[str, tuple[float, float]]:
    """(bytes, flops) per variant; x / y = input / output elements, b bytes per element."""
    x, y = layer.elems(n)
    conv_flops = 2 * layer.k * layer.k * y
    bn_act = 4 * y  # scale, shift, clamp (twice)
    return {
        # conv: read x, write y; BN: read y, write y; ReLU6 in place: read y, write y.
        "eval unfused": ((x + 5 * y) * b, conv_flops + bn_act),
        # one kernel: read x (tile + halo), write y.
        "eval fused": ((x + y) * b, conv_flops + bn_act),
        # conv x->y; BN training: read y for statistics, read y + write y to normalise; act 2y.
        "train fwd unfused": ((x + 6 * y) * b, conv_flops + 3 * y + bn_act),
        # pass 1: read x, conv, per-block partial sums (no store); pass 2: read x, recompute, write y.
        "train fwd fused": ((2 * x + y) * b, 2 * conv_flops + 3 * y + bn_act),
        # act backward: read dy, out; write g (3y). BN backward: read g, conv-out for sums (2y), then
        # read g, conv-out, write g' (3y). conv backward: input grad reads g', writes dx (y + x);
        # weight grad reads g', x (y + x).
        "train bwd unfused": ((2 * x + 10 * y) * b, 2 * conv_flops + 10 * y),
        # pass 1: read x, dy; recompute conv, act', reduce sum(g), sum(g*xhat), weight-grad partials
        # (x + y). pass 2: read x, dy; recompute, form g' in the tile, transposed conv, write dx
        # (2x + y).
        "train bwd fused": ((3 * x + 2 * y) * b, 4 * conv_flops + 12 * y),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(BYTES), default="float16")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3: 3.35e12)")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    args = p.parse_args(argv)

    layers = mobilenet_v2_layers()
    b = BYTES[args.dtype]
    variants = list(traffic(layers[0], args.batch, b))
    totals = {v: [0.0, 0.0] for v in variants}
    rows = []
    for i, layer in enumerate(layers):
        t = traffic(layer, args.batch, b)
        for v, (nbytes, flops) in t.items():
            totals[v][0] += nbytes
            totals[v][1] += flops
        ev_u, ev_f = t["eval unfused"][0], t["eval fused"][0]
        tr_u = t["train fwd unfused"][0] + t["train bwd unfused"][0]
        tr_f = t["train fwd fused"][0] + t["train bwd fused"][0]
        rows.append(
            f"| {i} | {layer.c}x{layer.h}x{layer.w} k{layer.k} s{layer.h // layer.ho} "
            f"| {ev_u / 1e6:.2f} | {ev_f / 1e6:.2f} | {ev_u / ev_f:.2f}x "
            f"| {tr_u / 1e6:.2f} | {tr_f / 1e6:.2f} | {tr_u / tr_f:.2f}x |"
        )
    lines = [
        "# ESTIMATE, not a measurement: DRAM bytes of MobileNetV2's depthwise layers on a GPU",
        "",
        f"`python -m bench.gpu_estimate --batch {args.batch} --dtype {args.dtype} "
        f"--bandwidth {args.bandwidth:g}` (method in the module docstring; nothing ran on a GPU).",
        "",
        f"batch {args.batch}, 224x224, {args.dtype}; MB = 1e6 bytes; training = forward + backward.",
        "",
        "| layer | C x H x W, kernel, stride | eval unfused MB | eval fused MB | eval gain | train unfused MB"
        " | train fused MB | train gain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "| variant | total MB | GFLOP | FLOP/byte | time at the bandwidth, us |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v, (nbytes, flops) in totals.items():
        lines.append(
            f"| {v} | {nbytes / 1e6:.1f} | {flops / 1e9:.3f} | {flops / nbytes:.2f} "
            f"| {nbytes / args.bandwidth * 1e6:.1f} |"
        )
    ev = totals["eval unfused"][0] / totals["eval fused"][0]
    tr = (totals["train fwd unfused"][0] + totals["train bwd unfused"][0]) / (
        totals["train fwd fused"][0] + totals["train bwd fused"][0]
    )
    lines += [
        "",
        f"Estimated gain on these layers from bytes alone: eval {ev:.2f}x, training step {tr:.2f}x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_estimate.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
