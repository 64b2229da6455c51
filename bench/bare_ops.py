"""The bare C++ kernels of ``fastdw::dwconv_bn_act`` (no autograd, no Python checks) at one shape,
NCHW against channels_last, in one interleaved run: where a layout's kernel loses time.

    python -m bench.bare_ops N C H STRIDE [--threads 2] [--reps 15]

Prints milliseconds (medians) of the eval forward (running statistics), the training forward
(batch statistics) and the training backward (all five gradients), each in both layouts. The
calls go straight to the CPU kernels (``OpOverload.redispatch``), so these are the numbers to
compare when changing a kernel; ``bench.dwconv_bn_act`` times whole training steps.
"""

from __future__ import annotations

import argparse

import torch

import fastdw  # noqa: F401  (registers the ops)
from fastdw.bench import timing

CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def calls(n: int, c: int, h: int, stride: int) -> dict:
    op = torch.ops.fastdw.dwconv_bn_act.default
    bop = torch.ops.fastdw.dwconv_bn_act_backward.default
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g)
    w = torch.randn(c, 1, 3, 3, generator=g)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    geometry = ([stride, stride], [1, 1], [1, 1], "relu6")
    fns = {}
    for name, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        xf = x.contiguous(memory_format=fmt)
        out, mean, var = op.redispatch(CPU, xf, w, None, gamma, beta, None, None, True, 1e-5, *geometry, 1)
        go = torch.randn(out.shape, generator=g).contiguous(memory_format=fmt)
        fns[f"eval_{name}"] = lambda xf=xf: op.redispatch(
            CPU, xf, w, None, gamma, beta, rm, rv, False, 1e-5, *geometry, 1)
        fns[f"train_fwd_{name}"] = lambda xf=xf: op.redispatch(
            CPU, xf, w, None, gamma, beta, None, None, True, 1e-5, *geometry, 1)
        fns[f"train_bwd_{name}"] = lambda xf=xf, go=go, mean=mean, var=var: bop.redispatch(
            CPU, go, xf, w, None, gamma, beta, mean, var, True, 1e-5, *geometry, [True] * 5, 1)
    return fns


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("n", "c", "h", "stride"):
        p.add_argument(name, type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args(argv)
    timing.setup(a.threads)
    ms = timing.interleaved(calls(a.n, a.c, a.h, a.stride), reps=a.reps, min_time=0.003)
    print(f"{a.n}x{a.c}x{a.h}x{a.h} stride {a.stride}, {a.threads} thread(s), ms:")
    for k, v in ms.items():
        print(f"  {k:14s} {v:.4f}")


if __name__ == "__main__":
    main()
