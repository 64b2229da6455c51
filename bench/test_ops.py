"""Per-op microbenchmarks with pytest-benchmark: fastdw against eager PyTorch at a few real layer shapes.

    pytest bench/                          # timings, grouped per layer (eager vs fastdw side by side)
    pytest bench/ --benchmark-disable      # each benchmark runs once: a quick smoke test

The layers and modules are those of ``python -m fastdw.bench`` (fastdw.bench.ops); every fastdw
result is checked against eager before it is timed. Threads: $FASTDW_BENCH_THREADS (default 2).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdw.bench import ops, timing

CASES = [ops.CASES[i] for i in (1, 6, 8, 10, 12)]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    previous = torch.get_num_threads()
    timing.setup(int(os.environ.get("FASTDW_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(previous)


def _prepare(case: ops.OpCase, layout: str, training: bool):
    torch.manual_seed(0)
    eager, xs = ops.build(case, 1)
    eager.train(training)
    ours = ops.build_twin(case, eager).train(training)
    fmt = LAYOUTS[layout]
    eager = eager.to(memory_format=fmt)
    xs = [x.contiguous(memory_format=fmt) for x in xs]
    return eager, ours, xs


def _label(case: ops.OpCase) -> str:
    return " ".join(str(v) for v in case.key(1).values())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("engine", ["eager", "fastdw"])
@pytest.mark.parametrize("case", CASES, ids=_label)
def test_inference(benchmark, case: ops.OpCase, engine: str, layout: str) -> None:
    eager, ours, xs = _prepare(case, layout, training=False)
    module = eager if engine == "eager" else ours
    with torch.no_grad():
        torch.testing.assert_close(module(*xs), eager(*xs), rtol=1e-4, atol=1e-4)
        benchmark.group = f"eval {_label(case)}"
        benchmark(module, *xs)


@pytest.mark.parametrize("engine", ["eager", "fastdw"])
@pytest.mark.parametrize("case", CASES[:3], ids=_label)
def test_training(benchmark, case: ops.OpCase, engine: str) -> None:
    eager, ours, xs = _prepare(case, "cl", training=True)
    module = eager if engine == "eager" else ours
    grad = torch.randn_like(eager(*xs))

    def step() -> torch.Tensor:
        leaves = [x.detach().requires_grad_() for x in xs]
        module(*leaves).backward(grad)
        return leaves[0].grad

    benchmark.group = f"train {_label(case)}"
    got = benchmark(step)
    assert got is not None and torch.isfinite(got).all()
