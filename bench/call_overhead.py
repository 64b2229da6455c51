"""Fixed per-call cost of fastdw's CPU ops at batch 1: fastdw's Python and autograd overhead.

    python -m bench.call_overhead [--reps 11]

Single thread, thread CPU time (robust on a busy machine), medians of interleaved repetitions, in
microseconds:

- ``DWConvBNAct`` (channels_last), eval under ``torch.no_grad`` and one training forward (the
  parameters need gradients, so autograd records the op and the running statistics are updated),
  each next to the bare C++ kernel call (``OpOverload.redispatch`` to CPU, no autograd, no
  checks): the difference is fastdw's overhead per call;
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
    op = torch.ops.fastdw.dwconv_bn_act.default
    rows = ["| layer (channels_last) | eval module | eval bare | eval overhead | train forward module "
            "| train bare | train overhead |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, h in ((16, 4), (960, 7), (144, 56)):
        m = fastdw.nn.DWConvBNAct(c, 3).eval()
        train = fastdw.nn.DWConvBNAct(c, 3).train()
        conv, bn = m[0], m[1]
        x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
        w, g, b = (t.detach() for t in (conv.weight, bn.weight, bn.bias))
        eval_args = (x, w, None, g, b, bn.running_mean, bn.running_var, False, bn.eps, [1, 1], [1, 1], [1, 1],
                     "relu6", 1)
        train_args = (x, w, None, g, b, None, None, True, bn.eps, [1, 1], [1, 1], [1, 1], "relu6", 1)

        def eval_module(m=m, x=x):
            with torch.no_grad():
                m(x)

        n = 300 if h < 50 else 40
        r = _medians({"eval": eval_module, "eval_bare": lambda a=eval_args: op.redispatch(CPU, *a),
                      "train": lambda m=train, x=x: m(x),
                      "train_bare": lambda a=train_args: op.redispatch(CPU, *a)}, reps, n)
        rows.append(f"| 1x{c}x{h}x{h} | {r['eval']:.1f} | {r['eval_bare']:.1f} "
                    f"| {r['eval'] - r['eval_bare']:.1f} "
                    f"| {r['train']:.1f} | {r['train_bare']:.1f} | {r['train'] - r['train_bare']:.1f} |")
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
    print("Per-call cost, 1 thread, thread CPU time, medians (us)\n")
    print("\n".join(dwconv_rows(args.reps)))
    print()
    print("\n".join(shuffle_rows(args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
