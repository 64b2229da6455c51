"""Backend choice: fastdw.backends(), set_backend / use_backend, and the fallback without _C."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from conftest import assert_close, make_inputs, requires_triton

import fastdw
from fastdw.ops import dwconv_bn_act

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backends_keys():
    b = fastdw.backends()
    assert set(b) == {"cpu", "cuda", "triton", "reference"}
    assert all(isinstance(v, bool) for v in b.values())
    assert b["reference"] is True
    assert b["cpu"] is fastdw._backend.extension_loaded()
    if not torch.cuda.is_available():
        assert b["cuda"] is False


def test_set_backend_and_restore():
    for name in ("auto", "cpu", "cuda", "triton", "reference"):
        fastdw.set_backend(name)
        assert fastdw.get_backend() == name
    fastdw.set_backend("auto")
    assert fastdw.get_backend() == "auto"


def test_use_backend_restores_nested_and_on_error():
    fastdw.set_backend("cpu")
    with fastdw.use_backend("reference"):
        assert fastdw.get_backend() == "reference"
        with fastdw.use_backend("auto"):
            assert fastdw.get_backend() == "auto"
        assert fastdw.get_backend() == "reference"
    assert fastdw.get_backend() == "cpu"
    with pytest.raises(KeyError), fastdw.use_backend("reference"):
        assert fastdw.get_backend() == "reference"
        raise KeyError("boom")
    assert fastdw.get_backend() == "cpu"
    with pytest.raises(ValueError, match="unknown backend"), fastdw.use_backend("nope"):
        pass
    assert fastdw.get_backend() == "cpu"


def test_backend_is_per_thread():
    seen = {}
    with fastdw.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", fastdw.get_backend()))
        t.start()
        t.join()
        assert fastdw.get_backend() == "reference"
    assert seen["other"] == "auto"


def _calls(monkeypatch):
    """Records which implementation runs: the reference composition or the C++ op."""
    calls = []
    mod = sys.modules["fastdw.ops.dwconv_bn_act"]  # the attribute fastdw.ops.dwconv_bn_act is the function
    real_ref = mod._ref.dwconv_bn_act

    def spy_ref(*a, **k):
        calls.append("reference")
        return real_ref(*a, **k)

    monkeypatch.setattr(mod._ref, "dwconv_bn_act", spy_ref)
    return calls


@pytest.mark.parametrize(
    "name,dtype,expected",
    [
        ("reference", torch.float64, "reference"),
        ("auto", torch.float16, "reference"),  # no C++ kernel for float16: auto falls back
        ("auto", torch.float64, "cpu"),
        ("cpu", torch.float32, "cpu"),
    ],
)
def test_backend_selects_implementation(monkeypatch, name, dtype, expected):
    if expected == "cpu" and not fastdw.backends()["cpu"]:
        pytest.skip("cpu backend not built")
    calls = _calls(monkeypatch)
    inp = make_inputs(2, 3, 5, 5, dtype=dtype, requires_grad=False)
    with fastdw.use_backend(name):
        out = dwconv_bn_act(
            inp.x, inp.weight, None, inp.bn_weight, inp.bn_bias, inp.running_mean, inp.running_var
        )
    assert calls == (["reference"] if expected == "reference" else [])
    ref = torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(inp.x.double(), inp.weight.double(), None, 1, 1, 1, 3),
        inp.running_mean.double(),
        inp.running_var.double(),
        inp.bn_weight.double(),
        inp.bn_bias.double(),
        False,
        0.1,
        1e-5,
    ).clamp(0, 6)
    assert_close(out.double(), ref, tol=1e-2 if dtype == torch.float16 else 1e-4)


def test_forced_backends_that_cannot_run_raise():
    inp = make_inputs(2, 3, 5, 5, requires_grad=False)
    if not fastdw.backends()["cuda"]:
        with fastdw.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
            dwconv_bn_act(inp.x, inp.weight)
    if not fastdw.backends()["triton"]:
        with fastdw.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
            dwconv_bn_act(inp.x, inp.weight)
    if fastdw.backends()["cpu"]:
        with fastdw.use_backend("cpu"), pytest.raises(TypeError, match="float32 and float64"):
            dwconv_bn_act(inp.x.half(), inp.weight.half())


@requires_triton
def test_triton_backend_runs_the_triton_kernels(monkeypatch):
    """Forced 'triton' really launches Triton kernels for every op (so the triton tests test
    Triton), and 'auto' never picks Triton for CPU tensors."""
    common = sys.modules["fastdw.triton._common"]
    launched = []
    real = common.wrap_triton

    def spy(kernel):
        launched.append(kernel.fn.__name__)
        return real(kernel)

    monkeypatch.setattr(common, "wrap_triton", spy)
    inp = make_inputs(2, 4, 5, 5, requires_grad=True)
    x = inp.x.detach()

    def kernels_run(backend):
        launched.clear()
        with fastdw.use_backend(backend):
            y = dwconv_bn_act(inp.x, inp.weight, None, inp.bn_weight, inp.bn_bias, training=True)
            y.sum().backward()
            se = fastdw.ops.se_scale(x, torch.randn(2, 4, 1, 1, dtype=x.dtype), None,
                                     torch.randn(4, 2, 1, 1, dtype=x.dtype), None)
            fastdw.ops.concat_shuffle(fastdw.ops.channel_shuffle(se, 2), x)
        return set(launched)

    assert {"_dw_forward_kernel", "_bn_finalize_kernel", "_dw_backward_kernel", "_dw_input_grad_kernel",
            "_se_reduce_kernel", "_se_gate_kernel", "_se_scale_kernel", "_shuffle_kernel",
            "_interleave_kernel"} <= kernels_run("triton")
    assert kernels_run("auto") == set()
    with fastdw.use_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        dwconv_bn_act(torch.empty(1, 2, 3, 3, device="meta"), torch.empty(2, 1, 3, 3, device="meta"))


_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys
    import fastdw
    assert "triton" not in sys.modules, "import fastdw must not import triton"
    print("backends", fastdw.backends())
    x, w = fastdw.nn.DWConvBNAct(4).eval()[0].weight.new_ones(1, 4, 5, 5), fastdw.nn.DWConvBNAct(4)[0].weight
    try:
        with fastdw.use_backend("triton"):
            fastdw.ops.dwconv_bn_act(x, w.detach())
    except RuntimeError as e:
        print("ERROR", e)
    """
)


def test_triton_is_imported_lazily_and_needs_the_interpreter_on_cpu():
    r = _run(_TRITON_SCRIPT)
    assert r.returncode == 0, r.stdout + r.stderr
    if not torch.cuda.is_available():
        assert "'triton': False" in r.stdout
        assert "ERROR" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


def test_meta_tensors_use_reference_shapes():
    """auto on a non-CPU device (meta) falls back to the reference composition: shapes only."""
    x = torch.empty(2, 6, 9, 8, device="meta")
    w = torch.empty(6, 1, 3, 3, device="meta")
    out = dwconv_bn_act(x, w, stride=2, activation="silu")
    assert out.device.type == "meta"
    assert out.shape == (2, 6, 5, 4)


# ---- without the compiled extension --------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    {prelude}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastdw
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "fastdw" in str(w.message)]
    messages = [str(w.message) for w in caught]
    assert len(runtime) == 1, f"expected one fastdw RuntimeWarning on import, got {{messages}}"
    print("WARNING:", runtime[0].message)
    assert fastdw._backend.extension_loaded() is False
    expected = {{"cpu": False, "cuda": False, "triton": False, "reference": True}}
    assert fastdw.backends() == expected, fastdw.backends()
    assert sys.modules.get("fastdw._C") is None

    import torch.nn.functional as F
    from fastdw.nn import DWConvBNAct
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    out = fastdw.ops.dwconv_bn_act(x, w, None, None, None, rm, rv, training=True, activation="hardswish")
    ref = F.hardswish(F.batch_norm(F.conv2d(x, w, None, 1, 1, 1, 4), rm2, rv2, None, None, True, 0.1, 1e-5))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rm, rm2, rtol=1e-12, atol=1e-12) and torch.allclose(rv, rv2, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    m = DWConvBNAct(4).double().eval()
    assert m(x.detach()).shape == (2, 4, 7, 6)
    try:
        with fastdw.use_backend("cpu"):
            fastdw.ops.dwconv_bn_act(x, w)
    except RuntimeError as e:
        assert "not available" in str(e), e
    else:
        raise AssertionError("backend 'cpu' must raise without the extension")
    print("OK")
    """
)


def _run(script: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env = {
        k: v
        for k, v in full_env.items()
        if k not in ("FASTDW_BACKEND", "FASTDW_DISABLE_EXTENSION", "TRITON_INTERPRET") or k in env
    }
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_disabled_extension_falls_back_to_reference_with_warning():
    """FASTDW_DISABLE_EXTENSION=1: import works, warns once (RuntimeWarning), computes via reference."""
    r = _run(_SCRIPT.format(prelude=""), FASTDW_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    assert "FASTDW_DISABLE_EXTENSION" in r.stdout  # the warning says why


def test_unloadable_extension_falls_back_to_reference_with_warning():
    """fastdw._C missing or broken: the same fallback, and the warning carries the import error."""
    prelude = "sys.modules['fastdw._C'] = None  # makes `from fastdw import _C` raise ImportError"
    r = _run(_SCRIPT.format(prelude=prelude))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    assert re.search(r"(ModuleNotFound|Import)Error", r.stdout) and "make build" in r.stdout


@pytest.mark.parametrize("env,expected", [({}, "auto"), ({"FASTDW_BACKEND": "reference"}, "reference")])
def test_default_backend_and_environment_variable(env, expected):
    r = _run("import fastdw; print(fastdw.get_backend())", **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected
