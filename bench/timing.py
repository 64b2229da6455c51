"""Timing helpers shared by every benchmark: fixed threads, denormals flushed, warm-up, medians of
interleaved repetitions (so a noisy neighbour slows every contender alike), ratios from one run."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 30, warmup: int = 3,
                min_time: float = 0.0) -> dict[str, float]:
    """Median milliseconds of each callable, timed round-robin. ``min_time`` (s) repeats a whole
    round until a round takes at least that long, for very short ops."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    inner = 1
    if min_time > 0:
        while True:
            t0 = time.perf_counter()
            for _ in range(inner):
                for f in fns.values():
                    f()
            if time.perf_counter() - t0 >= min_time or inner >= 1 << 12:
                break
            inner *= 2
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            samples[k].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def machine() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if v < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
