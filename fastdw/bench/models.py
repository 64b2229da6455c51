"""Whole models: fastdw (bundled twins and ``fastdw.convert``ed torchvision) against every anchor.

Inference, per model and batch size, float32, eval mode under ``torch.no_grad``: torchvision eager
(NCHW and channels_last), eager with BatchNorm folded (channels_last), ``torch.compile`` (inductor,
freezing), ONNX Runtime and OpenVINO (CPU, same thread count, float32), fastdw's bundled model
(NCHW and channels_last) and ``fastdw.convert(model, fold_bn=True)`` (channels_last). Training: one
step (forward, cross-entropy, backward, SGD step) at one batch size, eager against fastdw, with
the bytes autograd saves for backward.

Every engine starts from the same weights; BatchNorm statistics are calibrated on random data (no
pretrained weights offline). Before timing, each engine's output is compared with eager NCHW: a
fastdw mismatch raises ``Mismatch`` (the run fails), another engine's is reported as "mismatch".
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fastdw
from fastdw.bench import engines, timing
from fastdw.bench.engines import Settings, Skipped
from fastdw.bench.report import FASTDW_ENGINES, Row

DEFAULT = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0"]
QUICK = ["mobilenet_v2", "shufflenet_v2_x1_0"]
INFERENCE = ["eager", "eager_cl", "folded_cl", "compile", "onnxruntime", "openvino", "fastdw", "fastdw_cl",
             "convert_cl"]
TRAINING = ["eager", "eager_cl", "fastdw", "fastdw_cl", "convert_cl"]
TOLERANCE = {"fastdw": 1e-4, "other": 1e-3}  # max |difference| / max |eager output|
TRAIN_TOLERANCE = 1e-3  # training outputs (batch statistics) and gradients, at least


class Mismatch(AssertionError):
    """A fastdw result differs from eager PyTorch: the benchmark must not report its time."""


def available() -> list[str]:
    """torchvision classification models this suite knows how to build."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def calibrate(model: nn.Module, resolution: int, batches: int = 4, batch_size: int = 4) -> nn.Module:
    """Realistic BatchNorm statistics from random data: reset them and average the batch statistics
    of a few training-mode forwards (cumulative average, whatever the model's momentum). Without
    this a random model's activations drift into denormals and every engine measures that instead."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, resolution, resolution))
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    return model.eval()


def torchvision_model(name: str, resolution: int, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` with random weights (seeded) and calibrated statistics, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    return calibrate(torchvision.models.get_model(name, weights=None), resolution)


def bundled(name: str, eager_model: nn.Module) -> nn.Module:
    """fastdw's bundled twin of a torchvision model, holding its weights (eval mode)."""
    factory = getattr(fastdw.models, name, None)
    if factory is None:
        raise Skipped(f"fastdw.models has no {name}")
    ours = factory().to(next(eager_model.parameters()).dtype)
    ours.load_state_dict(eager_model.state_dict())
    return ours.eval()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, the figure compared against the tolerances."""
    got, ref = engines.to_tensor(got), engines.to_tensor(ref)
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def check(engine: str, what: str, got: object, ref: torch.Tensor, tol: float, row: Row | None = None,
          ) -> str | None:
    """None if close; otherwise raises ``Mismatch`` for fastdw, returns the status for others.
    The error is kept in ``row.extra["max_relative_error"]`` (the largest of an engine's checks)."""
    err = relative_error(engines.to_tensor(got), ref)
    if row is not None:
        errors = row.extra.setdefault("max_relative_error", {})
        errors[engine] = max(errors.get(engine, 0.0), err)
    if err <= tol:
        return None
    message = f"{engine} on {what}: max relative error {err:.2e} > {tol:.0e}"
    if engine in FASTDW_ENGINES:
        raise Mismatch(message)
    return f"mismatch: error {err:.1e}"


def build_and_run(engine: str, build: Callable[[], Callable], row: Row) -> tuple[Callable, object] | None:
    """``fn = build()`` and one ``fn()``: (fn, output), or None with the engine's status in ``row``
    ("skipped: ..." or, for an engine other than fastdw's, "error: ..."). A fastdw engine's
    failure propagates: it must never be hidden as a status."""
    try:
        fn = build()
        return fn, fn()
    except Skipped as e:
        row.status[engine] = f"skipped: {e}"
    except Exception as e:
        if engine in FASTDW_ENGINES:
            raise
        row.status[engine] = f"error: {engines._short(e)}"
    return None


def keep_if_close(engine: str, what: str, fn: Callable, out: object, ref: torch.Tensor, row: Row,
                  fns: dict[str, Callable]) -> None:
    """Times ``fn`` (adds it to ``fns``) if its output agrees with ``ref``; see ``check``."""
    status = check(engine, what, out, ref, TOLERANCE["fastdw" if engine in FASTDW_ENGINES else "other"], row)
    if status is None:
        fns[engine] = fn
    else:
        row.status[engine] = status


def _inference_builders(name: str, ref_model: nn.Module, settings: Settings,
                        onnx_cache: engines.OnnxCache) -> dict[str, Callable]:
    def onnx_path(x):
        return lambda: onnx_cache.get(name, ref_model, x, settings)

    def fastdw_nchw(model, x, s):
        ours = bundled(name, model)
        return lambda: ours(x)

    def fastdw_cl(model, x, s):
        ours, xc = engines.channels_last(bundled(name, model), x)
        return lambda: ours(xc)

    def convert_cl(model, x, s):
        ours, xc = engines.channels_last(fastdw.convert(model, fold_bn=True), x)
        return lambda: ours(xc)

    return {
        "eager": engines.eager,
        "eager_cl": engines.eager_cl,
        "folded_cl": engines.folded_cl,
        "compile": engines.compiled,
        "onnxruntime": lambda m, x, s: engines.onnxruntime(m, x, s, onnx_path(x)),
        "openvino": lambda m, x, s: engines.openvino(m, x, s, onnx_path(x)),
        "fastdw": fastdw_nchw,
        "fastdw_cl": fastdw_cl,
        "convert_cl": convert_cl,
    }


def bench_inference(name: str, batch: int, settings: Settings, reps: int, resolution: int = 224,
                    onnx_cache: engines.OnnxCache | None = None) -> Row:
    """One row: every inference engine on ``name`` at ``batch``, checked, then timed interleaved."""
    onnx_cache = onnx_cache or engines.OnnxCache()
    model = torchvision_model(name, resolution)
    x = torch.randn(batch, 3, resolution, resolution)
    row = Row("models_eval", {"model": name, "batch": batch})
    fns: dict[str, Callable] = {}
    setup: dict[str, float] = {}  # seconds to build (export, compile) and run once
    row.extra["setup_s"] = setup
    with torch.no_grad():
        ref = model(x)
        for engine, build in _inference_builders(name, model, settings, onnx_cache).items():
            t0 = time.perf_counter()
            built = build_and_run(engine, lambda build=build: build(model, x, settings), row)
            if built is None:
                continue
            setup[engine] = round(time.perf_counter() - t0, 2)
            keep_if_close(engine, f"{name} batch {batch}", *built, ref, row, fns)
        row.ms = timing.interleaved(fns, reps=reps, warmup=3, spread=row.spread())
    if name in onnx_cache.exporter:
        row.extra["onnx_exporter"] = onnx_cache.exporter[name]
    return row


def saved_bytes(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``forward()`` and the bytes autograd holds for backward after it built the graph: the
    storages of the tensors packed by ``saved_tensors_hooks`` (parameters included), each counted
    once. A tensor saved twice is held once: a layer's output that the next layer saves as its input
    and that the layer's own backward (fastdw's relu / relu6 training op, eager's in-place ReLU6)
    saves too. (../shared/ANCHORS.md sums every packed tensor instead, repeats included.)"""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(storages.values())


def _training_models(name: str, model: nn.Module) -> dict[str, Callable[[], nn.Module]]:
    def cl(m: nn.Module) -> nn.Module:
        return m.to(memory_format=torch.channels_last)

    return {
        "eager": lambda: copy.deepcopy(model),
        "eager_cl": lambda: cl(copy.deepcopy(model)),
        "fastdw": lambda: bundled(name, model),
        "fastdw_cl": lambda: cl(bundled(name, model)),
        "convert_cl": lambda: cl(fastdw.convert(model, fold_bn=True)),
    }


def bench_training(name: str, batch: int, settings: Settings, reps: int, resolution: int = 224,
                   warmup: int = 2) -> Row:
    """One row: a training step per engine (same weights, same batch), checked, then timed."""
    model = torchvision_model(name, resolution)
    x = torch.randn(batch, 3, resolution, resolution)
    row = Row("models_train", {"model": name, "batch": batch})
    ours: dict[str, nn.Module] = {}
    for engine, make in _training_models(name, model).items():
        try:
            ours[engine] = make().train()
        except Skipped as e:
            row.status[engine] = f"skipped: {e}"
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    target = torch.randint(0, n_classes, (batch,))

    def inputs(engine: str) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if engine.endswith("_cl") else x

    # correctness: output and every parameter gradient of one step from the same state; the
    # bytes autograd saves for backward are counted on the way
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    saved: dict[str, int] = {}
    names = [k for k, _ in model.named_parameters()]
    for engine, m in ours.items():
        probe = copy.deepcopy(m)
        torch.manual_seed(1)  # the same dropout masks for every engine
        out, saved[engine] = saved_bytes(lambda probe=probe, engine=engine: probe(inputs(engine)))
        F.cross_entropy(out, target).backward()
        params = dict(probe.named_parameters())
        results[engine] = (out.detach(), torch.cat([params[k].grad.flatten() for k in names]))
    ref_out, ref_grads = results["eager"]
    # Training-mode BatchNorm over few values per channel and gradients of early layers through a
    # stack of BatchNorms are ill-conditioned: float32 eager NCHW and eager channels_last differ by
    # up to ~1e-2. fastdw must agree with eager as well as eager agrees with itself across layouts.
    out_tol, grad_tol = TRAIN_TOLERANCE, TRAIN_TOLERANCE
    if "eager_cl" in results:
        out_tol = max(out_tol, 4 * relative_error(results["eager_cl"][0], ref_out))
        grad_tol = max(grad_tol, 4 * relative_error(results["eager_cl"][1], ref_grads))
    row.extra["tolerance"] = {"output": out_tol, "gradients": grad_tol}
    for engine, (out, grads) in results.items():
        what = f"{name} training batch {batch}"
        status = (check(engine, what + " output", out, ref_out, out_tol, row)
                  or check(engine, what + " parameter gradients", grads, ref_grads, grad_tol, row))
        if status is not None:
            row.status[engine] = status
            del ours[engine]

    fns = {}
    for engine, m in ours.items():
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        xe = inputs(engine)

        def step(m=m, opt=opt, xe=xe) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(xe), target).backward()
            opt.step()

        fns[engine] = step
    row.ms = timing.interleaved(fns, reps=reps, warmup=warmup, spread=row.spread())
    row.extra["saved_mib"] = {e: b / 2**20 for e, b in saved.items() if e in ours}
    base = saved.get("eager") if "eager" in ours else None
    best = min((saved[e] for e in ours if e in FASTDW_ENGINES), default=None)
    if base and best:
        row.columns["saved for backward: eager / fastdw (MiB)"] = f"{base / 2**20:.0f} / {best / 2**20:.0f}"
    return row
