"""``python -m fastdw.selftest``: run every fastdw op on every usable backend against ``reference``.

What a user runs first on a new machine (above all one with a GPU, where the CUDA C++ and Triton
kernels have their only real test): for each device (cpu, and cuda when present) and each backend
that can run there, every op is run on random inputs (both memory formats; BatchNorm in eval and
training) and compared with the pure-PyTorch reference computed in float64 on the CPU: outputs,
the gradients of every input, and the running statistics. Prints one row per (device, backend,
op, case) with the largest error, pass/fail and the time of one forward; exits 1 on any failure.

Errors are relative to the largest magnitude of the reference tensor, or absolute where that is
below 1 (a true gradient can be ~0: the conv bias under training BatchNorm). Tolerances: 1e-4
for float32, 1e-10 for float64, 2e-2 for float16 and bfloat16.

On a machine without CUDA the Triton kernels are run by Triton's interpreter on CPU tensors; for
that ``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so this module sets it
(unless ``--no-interpret``) before fastdw loads Triton. The interpreter is slow: shapes are small.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdw.ops._layout import is_channels_last

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class Row:
    device: str
    backend: str
    op: str
    case: str
    dtype: str
    error: float | None  # None: the case raised
    tol: float
    ms: float | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error is not None and self.error <= self.tol


# ---- cases: each builds float64 CPU inputs and a function running the op on (device, dtype) copies ----


@dataclass
class Case:
    op: str
    name: str
    make: Callable[[torch.Generator], dict]  # float64 CPU tensors and options
    run: Callable[[dict], dict]  # runs the op on the given tensors; returns named results


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _rand_input(g: torch.Generator, shape, channels_last: bool) -> torch.Tensor:
    x = _rand(g, *shape)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _dw_case(
    k: int,
    stride: int,
    dilation: int,
    act: str,
    training: bool,
    channels_last: bool,
    bias: bool,
    shuffle: int | None = None,
    shape=(2, 12, 9, 10),
) -> Case:
    n, c, h, w = shape

    def make(g):
        x = _rand_input(g, (n, c, h, w), channels_last)
        return {
            "x": x,
            "weight": _rand(g, c, 1, k, k) * 0.4,
            "bias": _rand(g, c) if bias else None,
            "bn_weight": 1.0 + 0.2 * _rand(g, c),
            "bn_bias": _rand(g, c) * 0.3,
            "running_mean": _rand(g, c) * 0.1,
            "running_var": 0.5 + torch.rand(c, generator=g, dtype=torch.float64),
        }

    def run(t):
        from fastdw.ops import dwconv_bn_act

        stats = {"running_mean": t["running_mean"].clone(), "running_var": t["running_var"].clone()}
        out = dwconv_bn_act(
            t["x"],
            t["weight"],
            t["bias"],
            t["bn_weight"],
            t["bn_bias"],
            stats["running_mean"],
            stats["running_var"],
            training=training,
            stride=stride,
            dilation=dilation,
            activation=act,
            input_shuffle_groups=shuffle,
        )
        return {"out": out, **({k_: v for k_, v in stats.items()} if training else {})}

    fmt = "NHWC" if channels_last else "NCHW"
    mode = "train" if training else "eval"
    extra = ("+bias" if bias else "") + (f" shuffle{shuffle}" if shuffle else "")
    return Case("dwconv_bn_act", f"{mode} {fmt} k{k} s{stride} d{dilation} {act}{extra}", make, run)


def _se_case(act: str, gate: str, channels_last: bool, shape=(2, 24, 7, 6), squeeze=8) -> Case:
    n, c, h, w = shape

    def make(g):
        x = _rand_input(g, (n, c, h, w), channels_last)
        return {
            "x": x,
            "fc1_weight": _rand(g, squeeze, c, 1, 1) * 0.3,
            "fc1_bias": _rand(g, squeeze) * 0.1,
            "fc2_weight": _rand(g, c, squeeze, 1, 1) * 0.3,
            "fc2_bias": _rand(g, c) * 0.1,
        }

    def run(t):
        from fastdw.ops import se_scale

        return {
            "out": se_scale(
                t["x"],
                t["fc1_weight"],
                t["fc1_bias"],
                t["fc2_weight"],
                t["fc2_bias"],
                activation=act,
                gate=gate,
            )
        }

    return Case("se_scale", f"{'NHWC' if channels_last else 'NCHW'} {act}/{gate}", make, run)


def _shuffle_case(groups: int, channels_last: bool, shape=(2, 24, 5, 7)) -> Case:
    def make(g):
        return {"x": _rand_input(g, shape, channels_last)}

    def run(t):
        from fastdw.ops import channel_shuffle

        return {"out": channel_shuffle(t["x"], groups)}

    return Case("channel_shuffle", f"{'NHWC' if channels_last else 'NCHW'} groups={groups}", make, run)


def _concat_shuffle_case(channels_last: bool, shape=(2, 16, 5, 7)) -> Case:
    def make(g):
        x = _rand_input(g, (shape[0], 2 * shape[1], *shape[2:]), channels_last)
        return {"x": x, "b": _rand(g, *shape)}

    def run(t):
        from fastdw.ops import concat_shuffle

        a = t["x"].chunk(2, 1)[0]  # a strided view, as in ShuffleNetV2's pass-through half
        return {"out": concat_shuffle(a, t["b"])}

    return Case("concat_shuffle", f"{'NHWC' if channels_last else 'NCHW'} view+dense", make, run)


def cases(full: bool = False) -> list[Case]:
    out = []
    for cl in (False, True):
        for training in (False, True):
            out.append(_dw_case(3, 1, 1, "relu6", training, cl, bias=False))
            out.append(_dw_case(5, 2, 1, "hardswish", training, cl, bias=True))
        out.append(_dw_case(3, 1, 2, "silu", True, cl, bias=False))
        out.append(_dw_case(3, 2, 1, "relu", False, cl, bias=False, shuffle=3))
        out.append(_se_case("relu", "hardsigmoid", cl))
        out.append(_se_case("silu", "sigmoid", cl))
        out.append(_shuffle_case(3, cl))
        out.append(_concat_shuffle_case(cl))
    if full:
        for act in ("relu", "none"):
            out.append(_dw_case(7, 1, 1, act, True, False, bias=True))
        out.append(_dw_case(3, 1, 1, "relu6", True, True, bias=False, shape=(4, 96, 28, 28)))
        out.append(_se_case("relu", "hardsigmoid", True, shape=(4, 480, 14, 14), squeeze=120))
    return out


# ---- running and comparing ------------------------------------------------------------------------------


def _to(t: dict, device: str, dtype: torch.dtype, grad: bool) -> dict:
    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            fmt = torch.channels_last if is_channels_last(v) and v.dim() == 4 else torch.contiguous_format
            v = v.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
            if grad and k not in ("running_mean", "running_var"):
                v.requires_grad_(True)
        out[k] = v
    return out


def _with_grads(res: dict, t: dict, seed_grad: torch.Tensor) -> tuple[dict, dict]:
    """The op's results ``res`` (detached) and the gradients, for the output gradient
    ``seed_grad``, of every input in ``t`` that requires one."""
    out = res["out"]
    leaves = {k: v for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    seed_grad = seed_grad.to(out.device, out.dtype)
    got = torch.autograd.grad(out, list(leaves.values()), seed_grad, allow_unused=True)
    grads = {f"grad_{k}": g for k, g in zip(leaves, got, strict=True) if g is not None}
    return {k: v.detach() for k, v in res.items()}, grads


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    got = got.detach().to("cpu", torch.float64)
    # Relative to the reference's largest magnitude, but never below 1: some true values are ~0
    # (e.g. the conv-bias gradient under training BatchNorm, which cancels exactly).
    scale = max(want.abs().max().item(), 1.0)
    err = (got - want).abs().max().item() / scale
    return float("inf") if err != err else err  # NaN fails


def _layout_ok(got: torch.Tensor, like: torch.Tensor) -> bool:
    if got.dim() != 4 or got.shape[1] == 1 or got.shape[2] * got.shape[3] == 1:
        return True
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return got.is_contiguous(memory_format=fmt)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(case: Case, device: str, backend: str, dtype: torch.dtype, seed: int = 0) -> Row:
    import fastdw

    g = torch.Generator().manual_seed(seed)
    base = case.make(g)
    tol = TOL[dtype]
    row = Row(device, backend, case.op, case.name, str(dtype).replace("torch.", ""), None, tol, None)
    try:
        with fastdw.use_backend("reference"):
            ref_t = _to(base, "cpu", torch.float64, grad=True)
            ref = case.run(ref_t)
            seed_grad = torch.randn(ref["out"].shape, generator=g, dtype=torch.float64)
            want, want_g = _with_grads(ref, ref_t, seed_grad)
        with fastdw.use_backend(backend):
            t = _to(base, device, dtype, grad=True)
            got, got_g = _with_grads(case.run(t), t, seed_grad)
            if not _layout_ok(got["out"], t["x"]):
                raise AssertionError("output does not keep the input's memory format")
            # Time one eval-style forward (no autograd), after a warm-up call.
            t_ng = _to(base, device, dtype, grad=False)
            with torch.no_grad():
                case.run(t_ng)
                _sync(device)
                start = time.perf_counter()
                reps = 3
                for _ in range(reps):
                    case.run(t_ng)
                _sync(device)
                row.ms = (time.perf_counter() - start) / reps * 1e3
        errs = {}
        for name, ref in {**want, **want_g}.items():
            have = {**got, **got_g}.get(name)
            if have is None:
                raise AssertionError(f"{name} missing")
            errs[name] = _error(have, ref)
        worst = max(errs, key=errs.get)
        row.error = errs[worst]
        row.note = f"worst: {worst}"
    except Exception as e:  # a failing case is a row, not the end of the run
        row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def available(device: str) -> list[str]:
    """Backends that can run on this device here (what ``auto`` could pick, and every forced one)."""
    import fastdw

    have = fastdw.backends()
    names = []
    if device == "cpu":
        if have["cpu"]:
            names.append("cpu")
        if have["triton"] and os.environ.get("TRITON_INTERPRET") == "1":
            names.append("triton")
    else:
        for name in ("cuda", "triton"):
            if have[name]:
                names.append(name)
    return names


def format_table(rows: list[Row]) -> str:
    head = ["device", "backend", "op", "case", "dtype", "max rel err", "tol", "result", "fwd ms", "note"]
    body = []
    for r in rows:
        err = "-" if r.error is None else f"{r.error:.1e}"
        ms = "-" if r.ms is None else f"{r.ms:.3f}"
        body.append(
            [
                r.device,
                r.backend,
                r.op,
                r.case,
                r.dtype,
                err,
                f"{r.tol:.0e}",
                "pass" if r.ok else "FAIL",
                ms,
                r.note,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [head, ["-" * w for w in widths], *body]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdw.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="*", help="only these backends (default: every usable one)")
    p.add_argument("--ops", nargs="*", help="only these ops")
    p.add_argument(
        "--dtypes",
        nargs="*",
        choices=sorted(DTYPE_NAMES),
        help="default: float32 and float64 (plus float16 and bfloat16 on CUDA)",
    )
    p.add_argument(
        "--full", action="store_true", help="add larger, real-network shapes (slow under the interpreter)"
    )
    p.add_argument(
        "--no-interpret", action="store_true", help="do not run Triton through its CPU interpreter"
    )
    args = p.parse_args(argv)

    if not args.no_interpret and not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastdw

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"fastdw {fastdw.__version__}, torch {torch.__version__}, backends {fastdw.backends()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"
    )
    if not fastdw._backend.extension_loaded():
        print(f"compiled extension not loaded: {fastdw._backend.extension_error()}")
    rows: list[Row] = []
    all_cases = [c for c in cases(args.full) if not args.ops or c.op in args.ops]
    for device in devices:
        backends = [b for b in available(device) if not args.backends or b in args.backends]
        for backend in backends:
            if args.dtypes:
                dtypes = [DTYPE_NAMES[d] for d in args.dtypes]
            elif device == "cpu":
                dtypes = [torch.float64, torch.float32]
            else:
                dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
            for dtype in dtypes:
                for case in all_cases:
                    rows.append(run_case(case, device, backend, dtype))
                    if sys.stderr.isatty():
                        print(f"\r{len(rows)} cases run", end="", file=sys.stderr, flush=True)
    print("", file=sys.stderr)
    if not rows:
        print("no backend besides 'reference' can run here: nothing to test")
        return 1
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} passed" + (f", {len(failed)} FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
