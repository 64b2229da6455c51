"""``python -m fastdw.bench``: fastdw against every anchor in one run (what ``make bench`` runs).

Ops at the layer shapes of MobileNetV2/V3 and ShuffleNetV2 and whole models at 224x224, against
eager PyTorch (NCHW and channels_last), eager with BatchNorm folded, torch.compile, ONNX Runtime and
OpenVINO; inference and training. Writes a Markdown table, a JSON file and a PNG plot to --out.
The method is in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

from fastdw.bench import engines, models, ops, report, timing

DEFAULT_OUT = os.path.join("bench", "results")
README_BEGIN = "<!-- fastdw.bench results: begin -->"
README_END = "<!-- fastdw.bench results: end -->"


def _csv(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdw.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a subset: batch 1, fewer repetitions, models {','.join(models.QUICK)}, "
                        f"{len(ops.QUICK)} op shapes (a few minutes on 2 cores)")
    p.add_argument("--models", help="comma-separated torchvision model names, or 'none' "
                                    f"(default: {','.join(models.DEFAULT)})")
    p.add_argument("--ops", help=f"comma-separated ops among {','.join(ops.OPS)}, or 'none' (default: all)")
    p.add_argument("--batch", help="comma-separated batch sizes of model inference and of the ops "
                                   "(default: models 1,8, ops 1; --quick: 1)")
    p.add_argument("--train-batch", type=int, default=8, help="batch size of the model training step (8)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (2)")
    p.add_argument("--reps", type=int, help="timed repetitions per engine (default: 30 ops, 20 models, 8 "
                                            "training steps; --quick: 15, 8, 3)")
    p.add_argument("--resolution", type=int, default=224, help="model input height and width (224)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip ONNX Runtime and OpenVINO (both run the exported ONNX graph)")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the .md, .json and .png ({DEFAULT_OUT})")
    p.add_argument("--readme", help="also put the table between the result markers of this Markdown file")
    return p


def _tasks(args: argparse.Namespace, settings: engines.Settings) -> list[tuple[str, Callable]]:
    quick = args.quick
    batches = [int(b) for b in _csv(args.batch)] if args.batch else ([1] if quick else [1, 8])
    op_batches = [int(b) for b in _csv(args.batch)] if args.batch else [1]
    default_models = models.QUICK if quick else models.DEFAULT
    model_names = _csv(args.models) if args.models is not None else default_models
    op_names = _csv(args.ops) if args.ops is not None else list(ops.OPS)
    cases = ops.select(op_names, quick)
    known = set(models.available())
    unknown = [m for m in model_names if m not in known]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; torchvision has e.g. "
                         f"{', '.join(models.DEFAULT)}")
    op_reps = args.reps or (15 if quick else 30)
    model_reps = args.reps or (8 if quick else 20)
    train_reps = args.reps or (3 if quick else 8)
    onnx_cache = engines.OnnxCache()

    tasks: list[tuple[str, Callable]] = []
    for case in cases:
        for n in op_batches:
            tasks.append((f"op {case.op} {case.key(n)['layer']} N={n} eval",
                          lambda case=case, n=n: ops.bench_inference(case, n, settings, op_reps)))
            if not args.no_train:
                tasks.append((f"op {case.op} {case.key(n)['layer']} N={n} train",
                              lambda case=case, n=n: ops.bench_training(case, n, settings, op_reps)))
    for name in model_names:
        for n in batches:
            tasks.append((f"model {name} batch {n} eval", lambda name=name, n=n: models.bench_inference(
                name, n, settings, model_reps, args.resolution, onnx_cache)))
        if not args.no_train:
            tasks.append((f"model {name} batch {args.train_batch} train",
                          lambda name=name: models.bench_training(name, args.train_batch, settings,
                                                                  train_reps, args.resolution,
                                                                  warmup=1 if quick else 2)))
    return tasks


class _PlainProgress:
    """What the run uses when tqdm is not installed: one line per measurement."""

    def __init__(self, tasks: list) -> None:
        self.tasks = tasks

    def __iter__(self):
        for i, task in enumerate(self.tasks):
            print(f"[{i + 1}/{len(self.tasks)}] {task[0]}", file=sys.stderr, flush=True)
            yield task

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(tasks: list):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(tasks)
    return tqdm(tasks, unit="run", dynamic_ncols=True, file=sys.stderr)


def update_readme(path: str, text: str) -> None:
    """Replace what lies between the result markers of ``path`` with ``text``."""
    with open(path) as f:
        content = f.read()
    if README_BEGIN not in content or README_END not in content:
        raise SystemExit(f"{path} has no '{README_BEGIN}' ... '{README_END}' markers")
    head, rest = content.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_BEGIN + "\n" + text + README_END + tail)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m fastdw.bench", *argv])
    timing.setup(args.threads)
    settings = engines.Settings(threads=args.threads, workdir=os.path.join(args.out, "tmp"),
                                compile=not args.no_compile, onnx=not args.no_onnx)
    tasks = _tasks(args, settings)
    machine = timing.machine()
    heap = ", freed memory kept by malloc" if machine["malloc_heap_kept"] == "True" else ""
    header = (f"{args.threads} threads, float32, denormals flushed{heap}, BatchNorm statistics calibrated on "
              f"random data; medians of interleaved repetitions, in ms; (Nx) = speed-up over eager NCHW; "
              f"CL = channels_last. fastdw CPU kernels: {machine['fastdw_cpu_kernels']}; "
              f"torch {machine['torch']}, {machine['cpu']}, {machine['cpu_count']} cores.")
    print(f"fastdw.bench: {len(tasks)} measurements. {header}\n", flush=True)
    if machine["denormals_flushed_in_all_threads"] != "True":
        print("WARNING: some of PyTorch's threads do not flush denormals (its thread pool started before "
              "fastdw.bench.timing.setup); times may be inflated. Run the benchmark in a fresh process.",
              file=sys.stderr)

    rows: list[report.Row] = []
    start = time.perf_counter()
    bar = _progress(tasks)
    for desc, task in bar:
        bar.set_description(desc[:60])
        t0 = time.perf_counter()
        try:
            row = task()
        except models.Mismatch as e:
            bar.close()
            print(f"\nFAILED: fastdw's result differs from eager PyTorch: {e}", file=sys.stderr)
            return 1
        row.extra["elapsed_s"] = round(time.perf_counter() - t0, 1)  # setup, checks and timing
        rows.append(row)
    bar.close()
    elapsed = time.perf_counter() - start

    stem = "bench-quick" if args.quick else "bench"
    meta = {"machine": machine, "config": {**vars(args), "elapsed_s": round(elapsed, 1)},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node()}
    paths = report.write(rows, args.out, stem, command, header, meta)
    text = report.markdown(rows, command, header)
    print("\n" + text)
    print(f"{elapsed:.0f} s. Wrote {', '.join(paths.values())}")
    if args.readme:
        update_readme(args.readme, text)
        print(f"Updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
