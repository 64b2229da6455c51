"""Smoke test of the benchmark suite: the CLI runs in-process on a tiny configuration and writes
its Markdown, JSON and PNG files; fastdw's results are checked against eager inside the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastdw.bench import engines, models, timing
from fastdw.bench.__main__ import main


@pytest.fixture
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_cli_tiny_run(tmp_path, capsys, _keep_threads) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    rc = main(["--ops", "dwconv", "--models", "mobilenet_v2", "--batch", "1", "--train-batch", "2",
               "--threads", "1", "--no-compile", "--no-onnx", "--reps", "2", "--resolution", "32", "--quick",
               "--out", str(tmp_path)])
    assert rc == 0
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"bench-quick.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "bench-quick.json").read_text())
    sections = {row["section"] for row in data["rows"]}
    assert sections == {"ops_eval", "ops_train", "models_eval", "models_train"}
    model_row = next(r for r in data["rows"] if r["section"] == "models_eval")
    assert {"eager", "eager_cl", "fastdw", "fastdw_cl", "convert_cl"} <= set(model_row["ms"])
    assert model_row["status"]["compile"] == "skipped: --no-compile"
    assert data["machine"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "| mobilenet_v2 | 1 |" in out and "skipped" in out


def test_fastdw_mismatch_fails_the_run(tmp_path, monkeypatch, capsys, _keep_threads) -> None:
    real = models.bundled

    def wrong(name, eager_model):
        ours = real(name, eager_model)
        with torch.no_grad():
            ours.classifier[1].bias.add_(1.0)
        return ours

    monkeypatch.setattr(models, "bundled", wrong)
    rc = main(["--ops", "none", "--models", "mobilenet_v2", "--batch", "1", "--threads", "1", "--no-train",
               "--no-compile", "--no-onnx", "--reps", "1", "--resolution", "32", "--out", str(tmp_path)])
    assert rc == 1
    assert "FAILED" in capsys.readouterr().err
    assert not (tmp_path / "bench.md").exists()


def test_fold_bn_matches_eager() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert engines.fold_bn(model) == 52
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish", "none"])
def test_near_kinks_marks_only_the_kinks(act) -> None:
    """The training checks drop the gradient only next to the activation's kinks."""
    from fastdw.bench.ops import near_kinks

    pre = torch.tensor([-6.0, -3.0, -3.00005, -1.0, 0.0, 5e-5, -5e-5, 1.0, 2.99995, 3.0, 4.0, 6.0, 6.00005,
                        7.0])
    want = {"relu": [0.0, 5e-5, -5e-5], "relu6": [0.0, 5e-5, -5e-5, 6.0, 6.00005],
            "hardswish": [-3.0, -3.00005, 2.99995, 3.0], "none": []}[act]
    assert sorted(pre[near_kinks(pre, act)].tolist()) == sorted(torch.tensor(want).tolist())


_FAULTS = """
import resource, sys, torch
from fastdw.bench import timing
kept = timing.keep_heap()
def faults():
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(1 << 23).add_(1)  # 32 MiB allocated, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a
faults()
print(kept, min(faults() for _ in range(6)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("glibc_default", [False, True])
def test_keep_heap_stops_page_faults_on_reallocation(glibc_default) -> None:
    # A 32 MiB tensor is 8192 pages: with glibc's defaults each new allocation of it page-faults
    # on every page; with the heap kept a new allocation reuses the pages already mapped. (The
    # minimum of six: here an allocation now and then still faults on all its pages, without any
    # system call of the process; glibc's defaults faulted on every one of them.)
    env = dict(os.environ, FASTDW_BENCH_GLIBC_MALLOC="1" if glibc_default else "0")
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    assert kept == str(not glibc_default)
    if glibc_default:
        assert int(faults) > 4000
    else:
        assert int(faults) < 100


def test_interleaved_runs_every_round_in_a_new_order() -> None:
    # every callable once per round, in seeded random orders (no callable always after the same one)
    seen: list[str] = []
    fns = {k: (lambda k=k: seen.append(k)) for k in "abcd"}
    ms = timing.interleaved(fns, reps=20, warmup=0)
    assert set(ms) == set("abcd")
    rounds = [tuple(seen[i:i + 4]) for i in range(0, len(seen), 4)]
    assert len(rounds) == 20 and all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 5 and {r[0] for r in rounds} == set("abcd")
    seen.clear()
    timing.interleaved(fns, reps=20, warmup=0)
    assert [tuple(seen[i:i + 4]) for i in range(0, len(seen), 4)] == rounds  # seeded: the same orders


def test_saved_bytes_counts_each_storage_once() -> None:
    """a * a saves a twice (as self and as other): memory held once."""
    a = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    _, held = models.saved_bytes(lambda: (a * a).sum())
    assert held == 8000


def test_saved_bytes_of_a_training_layer() -> None:
    """A training fastdw relu6 layer on CPU holds its input and its own output (the tensor it
    returns, which the next layer saves anyway), besides the parameters and batch statistics."""
    import fastdw

    if not fastdw.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    layer = fastdw.nn.DWConvBNAct(16).train()
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, held = models.saved_bytes(lambda: layer(x))
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert held == x.numel() * 4 + out.numel() * 4 + params + 2 * 16 * 4  # + batch mean and variance
