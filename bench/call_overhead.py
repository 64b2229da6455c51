"""Fixed per-call cost of fastdw's CPU ops at batch 1, and what skipping the autograd layer saves.

    python -m bench.call_overhead [--reps 11]

Single thread, thread CPU time (robust on a busy machine), eval, torch.no_grad, medians of
interleaved repetitions, in microseconds:

- ``DWConvBNAct`` (channels_last) with the Python autograd layer forced on (``can_skip_autograd``
  patched to False: what every call cost before ``fastdw.ops._dispatch``) and skipped (default),
  next to the bare C++ kernel call (``OpOverload.redispatch`` to CPU): the difference between the
  module and the bare call is fastdw's Python overhead;
- ``channel_shuffle`` (NCHW, 3 groups): ``F.channel_shuffle``, the bare kernel call, and
  ``fastdw.ops.channel_shuffle``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastdw
from fastdw.ops import _dispatch

CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _us(fn, n: int) -> float:
    start = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - start) / n / 1e3


def _medians(fns: dict, reps: int, n: int) -> dict[str, float]:
    res = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            res[k].append(f(n) if getattr(f, "takes_n", False) else _us(f, n))
    return {k: statistics.median(v) for k, v in res.items()}


def dwconv_rows(reps: int) -> list[str]:
    real = _dispatch.can_skip_autograd
    op = torch.ops.fastdw.dwconv_bn_act.default
    rows = ["| layer (channels_last) | with autograd layer | skipped | bare kernel call | saved "
            "| Python left |",
            "| --- | --- | --- | --- | --- | --- |"]
    for c, h in ((16, 4), (960, 7), (144, 56)):
        m = fastdw.nn.DWConvBNAct(c, 3).eval()
        conv, bn = m[0], m[1]
        x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
        args = (x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, bn.eps,
                [1, 1], [1, 1], [1, 1], "relu6", 1)

        def forced(n, m=m, x=x):
            _dispatch.can_skip_autograd = lambda tensors: False
            try:
                return _us(lambda: m(x), n)
            finally:
                _dispatch.can_skip_autograd = real

        forced.takes_n = True
        n = 300 if h < 50 else 40
        with torch.no_grad():
            r = _medians({"forced": forced, "skip": lambda m=m, x=x: m(x),
                          "bare": lambda args=args: op.redispatch(CPU, *args)}, reps, n)
        rows.append(f"| 1x{c}x{h}x{h} | {r['forced']:.1f} | {r['skip']:.1f} | {r['bare']:.1f} "
                    f"| {r['forced'] - r['skip']:.1f} | {r['skip'] - r['bare']:.1f} |")
    return rows


def shuffle_rows(reps: int) -> list[str]:
    op = torch.ops.fastdw.channel_shuffle.default
    rows = ["| channel_shuffle NCHW, 3 groups | F.channel_shuffle | bare kernel call | fastdw.ops "
            "| fastdw / F |",
            "| --- | --- | --- | --- | --- |"]
    for shape in ((1, 24, 4, 4), (1, 240, 28, 28)):
        x = torch.randn(*shape)
        with torch.no_grad():
            fns = {"F": lambda x=x: F.channel_shuffle(x, 3), "bare": lambda x=x: op.redispatch(CPU, x, 3),
                   "ops": lambda x=x: fastdw.ops.channel_shuffle(x, 3)}
            r = _medians(fns, reps, 500)
        rows.append(f"| {'x'.join(map(str, shape))} | {r['F']:.1f} | {r['bare']:.1f} | {r['ops']:.1f} "
                    f"| {r['F'] / r['ops']:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=11)
    args = p.parse_args(argv)
    if not fastdw.backends()["cpu"]:
        raise SystemExit("the compiled extension is not loaded: run `make build` first")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print("Per-call cost, 1 thread, thread CPU time, eval, no_grad, medians (us)\n")
    print("\n".join(dwconv_rows(args.reps)))
    print()
    print("\n".join(shuffle_rows(args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
