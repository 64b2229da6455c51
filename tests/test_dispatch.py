"""fastdw.ops._dispatch.call_compiled and the C++ autograd kernels behind the compiled ops."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_ext

import fastdw
from fastdw.ops._dispatch import call_compiled

pytestmark = pytest.mark.skipif(not fastdw.backends()["cpu"], reason="compiled extension not loaded")


def test_call_compiled_equals_the_op_and_returns_none_on_rejection():
    x = torch.randn(2, 12, 7, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 1, 3, 3, dtype=torch.float64)
    stats = (torch.randn(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64) + 0.5)
    args = (x, w, None, None, None, *stats, False, 1e-5, [1, 1], [1, 1], [1, 1], "hardswish", 1)
    got = call_compiled("dwconv_bn_act", args)
    for a, b in zip(got, torch.ops.fastdw.dwconv_bn_act.default(*args), strict=True):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert call_compiled("dwconv_bn_act", (x[0], *args[1:])) is None  # 3-D input: the op rejects it
    assert call_compiled("dwconv_bn_act", (x, w.float(), *args[2:])) is None  # dtype mismatch
    with fastdw.use_backend("reference"):
        assert call_compiled("dwconv_bn_act", args) is None  # not a compiled backend


def test_profiler_still_sees_the_op():
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fastdw.ops.channel_shuffle(x, 2)
    assert any("fastdw::channel_shuffle" in e.name for e in prof.events())


# ---- the C++ autograd kernels (csrc/autograd.cpp): gradients for exactly the tensors that need them


def _grads_of(fn, tensors, gy):
    out = fn(*tensors)
    out = out[0] if isinstance(out, tuple) else out
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, wanted, gy)
    return out, got


@requires_ext
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("need", [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0),
                                  (0, 0, 0, 0, 1), (0, 1, 0, 1, 1), (1, 0, 1, 0, 1)],
                         ids=lambda n: "".join(map(str, n)))
def test_dwconv_cpp_autograd_partial_requires_grad(need, training, with_bias):
    """Autograd numbers its input edges over the tensors present: with the conv bias absent, the BN
    parameters' gradients must still land on the BN parameters, for every subset needing one."""
    g = torch.Generator().manual_seed(0)
    c = 6
    base = [torch.randn(2, c, 5, 5, generator=g, dtype=torch.float64),
            torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(c, generator=g, dtype=torch.float64) if with_bias else None,
            torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(c, generator=g, dtype=torch.float64)]
    if not with_bias and need[2]:
        pytest.skip("no bias to differentiate")
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    gy = torch.randn(2, c, 5, 5, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("cpu", "reference"):
        ts = [None if t is None else t.clone().requires_grad_(bool(n))
              for t, n in zip(base, need, strict=True)]

        def fn(*t):
            stats = (None, None) if training else (rm.clone(), rv.clone())
            return fastdw.ops.dwconv_bn_act(*t, *stats, training=training, activation="silu")

        with fastdw.use_backend(backend):
            results[backend] = _grads_of(fn, ts, gy)
    (out, got), (ref_out, ref) = results["cpu"], results["reference"]
    torch.testing.assert_close(out, ref_out)
    assert len(got) == len(ref) == sum(need)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


@requires_ext
@pytest.mark.parametrize("need", [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 0, 1, 0), (0, 0, 0, 0, 1),
                                  (1, 0, 0, 1, 1)], ids=lambda n: "".join(map(str, n)))
def test_se_cpp_autograd_partial_requires_grad(need):
    """se_scale without fc1's bias: the fc2 gradients still land on fc2."""
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(4, 8, 1, 1, generator=g, dtype=torch.float64), None,
            torch.randn(8, 4, 1, 1, generator=g, dtype=torch.float64),
            torch.randn(8, generator=g, dtype=torch.float64)]
    gy = torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("cpu", "reference"):
        ts = [None if t is None else t.clone().requires_grad_(bool(n))
              for t, n in zip(base, need, strict=True)]
        with fastdw.use_backend(backend):
            results[backend] = _grads_of(
                lambda *t: fastdw.ops.se_scale(*t, activation="relu", gate="sigmoid"), ts, gy)
    (out, got), (ref_out, ref) = results["cpu"], results["reference"]
    torch.testing.assert_close(out, ref_out)
    assert len(got) == len(ref) == sum(need)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
