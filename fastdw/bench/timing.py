"""Timing helpers shared by every benchmark: fixed threads, denormals flushed, warm-up, medians of
interleaved repetitions (so a noisy neighbour slows every contender alike), ratios from one run."""

from __future__ import annotations

import importlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch


def setup(threads: int) -> None:
    """Same thread count for every engine (intra-op and inter-op), denormals flushed to zero and
    freed memory kept by malloc (``keep_heap``).

    Denormals matter: with randomly initialised weights some activations decay into the denormal
    range, where x86 arithmetic is 10-100x slower (see shared/ANCHORS.md). The flush mode is a
    per-thread register that threads inherit when they are created: call this before PyTorch
    starts its thread pool (``denormals_flushed`` tells whether every pool thread flushes)."""
    torch.set_flush_denormal(True)
    keep_heap()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed once, before any inter-op work: already set
        pass


_heap_kept = False


def keep_heap() -> bool:
    """Make glibc's malloc keep freed memory in the heap (no trimming, no mmap per allocation), as
    a caching allocator (jemalloc, tcmalloc: PyTorch's CPU tuning guide recommends them) does.

    With glibc's defaults, a large freed tensor at the top of the heap (or one above the dynamic
    mmap threshold) goes back to the kernel, and the next allocation of that size page-faults on
    every page: ~1 us per 4 KiB page here, so an 8x144x56x56 float output took ~3500 faults
    (~3.3 ms, on an op of ~1.3 ms). Which callable paid it depended on the one timed before it,
    not on its own work. Every engine runs under the same setting; eager, which allocates more
    intermediates, is the one that loses the most page faults. False where not glibc, or with
    FASTDW_BENCH_GLIBC_MALLOC=1 in the environment (glibc's defaults, to measure with them)."""
    global _heap_kept
    if _heap_kept:
        return True
    if os.environ.get("FASTDW_BENCH_GLIBC_MALLOC") == "1":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _heap_kept = ok
    return ok


def denormals_flushed(numel: int = 1 << 22) -> bool:
    """Whether every thread of PyTorch's pool flushes denormals: a parallel multiply of the
    smallest denormal (written as an integer bit pattern, so no thread converts it) gives zero in
    threads that flush and a denormal in the others (read back as integers, for the same reason)."""
    x = torch.ones(numel, dtype=torch.int32).view(torch.float32)
    return not bool((x * 2).view(torch.int32).ne(0).any())


_clock = time.perf_counter


def use_cpu_time(enabled: bool = True) -> None:
    """Time with the calling thread's CPU time instead of wall time. Only meaningful with one
    thread (all work on the calling thread); it makes single-thread comparisons robust to other
    processes competing for the cores, which wall-clock medians are not."""
    global _clock
    _clock = time.thread_time if enabled else time.perf_counter


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 30, warmup: int = 3,
                min_time: float = 0.0, spread: dict[str, float] | None = None) -> dict[str, float]:
    """Median milliseconds of each callable, timed round-robin. ``min_time`` (s) repeats a whole
    round until a round takes at least that long, for very short ops. ``spread``, if given, gets
    each callable's interquartile range relative to its median (a noise gauge: > 0.2 is noisy).

    Each round runs the callables in a new random order (seeded: the same orders in every run),
    so no callable always follows the same ones. With a fixed order a callable's time depended on
    what ran before it: three identical calls of fastdw's channels_last 1x96x112x112 s2 layer,
    each after an eager channels_last call, took 0.19, 0.11-0.14 and 0.09-0.11 ms; the slow one
    came two calls after the NCHW engines (rotating the order kept that and the times)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    inner = 1
    if min_time > 0:
        while True:
            t0 = _clock()
            for _ in range(inner):
                for f in fns.values():
                    f()
            if _clock() - t0 >= min_time or inner >= 1 << 12:
                break
            inner *= 2
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for k, f in order:
            t0 = _clock()
            for _ in range(inner):
                f()
            samples[k].append((_clock() - t0) * 1e3 / inner)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    if spread is not None:
        for k, v in samples.items():
            if len(v) >= 2:
                q1, _, q3 = statistics.quantiles(v, n=4)
                spread[k] = round((q3 - q1) / medians[k], 3)
    return medians


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """The machine and library versions a result was measured with (absent libraries: None)."""
    import fastdw

    info: dict[str, str] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "fastdw": fastdw.__version__,
        "fastdw_cpu_kernels": capability(),
        "torch": torch.__version__,
        "denormals_flushed_in_all_threads": str(denormals_flushed()),
        "malloc_heap_kept": str(_heap_kept),
    }
    for name in ("torchvision", "onnx", "onnxruntime", "openvino", "timm", "numpy"):
        info[name] = _version(name)
    return info


def capability() -> str:
    """The instruction set fastdw's CPU kernels run with, or why they do not run."""
    import fastdw

    if not fastdw._backend.extension_loaded():
        return "reference (extension not built)"
    from fastdw import _C

    return _C.cpu_capability()


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if v < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
