"""python -m fastdw.selftest: passes on the working backends here and fails loudly on a wrong kernel."""

from __future__ import annotations

import pytest
import torch

import fastdw
from fastdw import selftest

needs_cpu = pytest.mark.skipif(not fastdw.backends()["cpu"], reason="compiled extension not loaded")


@needs_cpu
def test_selftest_passes_on_cpu_backend(capsys):
    assert selftest.main(["--backends", "cpu", "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    for op in ("dwconv_bn_act", "se_scale", "channel_shuffle", "concat_shuffle"):
        assert op in out
    assert "FAIL" not in out
    assert "train NHWC" in out and "eval NCHW" in out


@needs_cpu
def test_selftest_reports_a_wrong_kernel(monkeypatch, capsys):
    real = fastdw.ops.channel_shuffle

    def off_by_a_little(x, groups):
        out = real(x, groups)
        return out + 1e-3 * torch.rand_like(out) if fastdw.get_backend() == "cpu" else out

    monkeypatch.setattr(fastdw.ops, "channel_shuffle", off_by_a_little)
    assert selftest.main(["--backends", "cpu", "--dtypes", "float32", "--ops", "channel_shuffle"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "2 FAILED" in out


@needs_cpu
def test_selftest_reports_a_raising_kernel(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastdw.ops, "se_scale", broken)
    assert selftest.main(["--backends", "cpu", "--dtypes", "float64", "--ops", "se_scale"]) == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out


@pytest.mark.skipif(not fastdw.backends()["triton"], reason="triton unusable: no CUDA, no TRITON_INTERPRET")
def test_selftest_runs_the_triton_kernels(capsys):
    args = ["--backends", "triton", "--dtypes", "float64", "--ops", "se_scale", "concat_shuffle"]
    assert selftest.main(args) == 0
    out = capsys.readouterr().out
    assert out.count(" triton ") >= 6 and "FAIL" not in out
