"""Shared fixtures and helpers for the fastdw tests."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn

# Without a GPU the `triton` backend runs its kernels through Triton's interpreter on CPU tensors.
# This must be set before triton is imported (fastdw imports it only when the backend is used).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU kernels stream channels_last eval outputs of at least this many bytes; the default
# depends on the machine's L3 size (stream_min_bytes in csrc/cpu/dwconv_bn_act_impl.h). A fixed
# 8 MiB makes test_large_tensors take the streaming path on every machine. Read at the first call.
os.environ.setdefault("FASTDW_STREAM_MIN_BYTES", str(8 << 20))

import fastdw  # noqa: E402

ALL_CAPABILITIES = ("default", "avx2", "avx512")
ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def _supported_capabilities() -> list[str]:
    if not fastdw._backend.extension_loaded():
        return []
    from fastdw import _C

    original = _C.cpu_capability()
    supported = []
    try:
        for cap in ALL_CAPABILITIES:
            try:
                _C.set_cpu_capability(cap)
            except ValueError:
                continue
            supported.append(cap)
    finally:
        _C.set_cpu_capability(original)
    return supported


SUPPORTED_CAPABILITIES = _supported_capabilities()

requires_ext = pytest.mark.skipif(
    not fastdw._backend.extension_loaded(), reason="fastdw._C (the compiled extension) is not built"
)

requires_triton = pytest.mark.skipif(
    not fastdw.backends()["triton"],
    reason="the triton backend is not usable here (triton missing, no GPU and TRITON_INTERPRET unset)",
)


@pytest.fixture(autouse=True)
def _seed_and_backend(request):
    """A fixed, per-test seed and the backend reset to 'auto' around every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    previous = fastdw.get_backend()
    fastdw.set_backend("auto")
    yield
    fastdw.set_backend(previous)


@pytest.fixture(params=["cpu", "reference"])
def backend(request):
    """Runs the test on the C++ CPU kernels and on the reference (a module may override this
    fixture, as the triton test modules do, to run the same tests on another backend)."""
    if request.param == "cpu" and not fastdw.backends()["cpu"]:
        pytest.skip("fastdw._C not built")
    with fastdw.use_backend(request.param):
        yield request.param


@pytest.fixture(params=SUPPORTED_CAPABILITIES or [None])
def cpu_capability(request):
    """Runs the test once per instruction set this CPU supports; restores the original one after."""
    if request.param is None:
        pytest.skip("fastdw._C is not built")
    from fastdw import _C

    original = _C.cpu_capability()
    _C.set_cpu_capability(request.param)
    assert _C.cpu_capability() == request.param
    try:
        yield request.param
    finally:
        _C.set_cpu_capability(original)


# ---- random inputs --------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn_weight: torch.Tensor | None
    bn_bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def params(self) -> dict[str, torch.Tensor]:
        """The tensors that get gradients (input and parameters), by name, skipping absent ones."""
        names = ("x", "weight", "bias", "bn_weight", "bn_bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def stats(self) -> dict[str, torch.Tensor]:
        names = ("running_mean", "running_var", "num_batches_tracked")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def clone(self, dtype: torch.dtype | None = None, requires_grad: bool = True) -> Inputs:
        """Independent copies (fresh leaves); floating tensors cast to dtype if given."""

        def cp(t, grad):
            if t is None:
                return None
            t = t.detach()
            if dtype is not None and t.dtype.is_floating_point:
                t = t.to(dtype)
            t = t.clone(memory_format=torch.preserve_format)
            return t.requires_grad_(grad and requires_grad)

        return Inputs(
            cp(self.x, self.x.requires_grad),
            cp(self.weight, True),
            cp(self.bias, True),
            cp(self.bn_weight, True),
            cp(self.bn_bias, True),
            cp(self.running_mean, False),
            cp(self.running_var, False),
            cp(self.num_batches_tracked, False),
        )


def make_inputs(
    n: int = 2,
    c: int = 4,
    h: int = 7,
    w: int = 7,
    kernel=3,
    *,
    dtype: torch.dtype = torch.float64,
    channels_last: bool = False,
    bias: bool = True,
    affine: bool = True,
    stats: bool = True,
    requires_grad: bool = True,
) -> Inputs:
    """Random (never zero, never trivial) inputs for dwconv_bn_act.

    Running statistics are random too (var in [0.5, 1.5]) so that eval mode is a real test.
    """
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(dtype)

    x = rnd(n, c, h, w, offset=0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    weight = rnd(c, 1, kh, kw, scale=0.5).requires_grad_(requires_grad)
    b = rnd(c, scale=0.5).requires_grad_(requires_grad) if bias else None
    g = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(requires_grad) if affine else None
    beta = rnd(c, scale=0.5).requires_grad_(requires_grad) if affine else None
    rm = rnd(c, scale=0.5) if stats else None
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype) if stats else None
    nbt = torch.tensor(0, dtype=torch.long) if stats else None
    return Inputs(x, weight, b, g, beta, rm, rv, nbt)


# ---- comparisons ----------------------------------------------------------------------------------

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_close(actual, expected, dtype=None, *, what: str = "", tol: float | None = None) -> None:
    """Tight comparison: relative, plus an absolute floor scaled by the magnitude of the expected tensor.

    The floor matters for quantities that are mathematically ~0 (e.g. the conv-bias gradient in
    training-mode BatchNorm), where only rounding noise is left.
    """
    assert actual is not None and expected is not None, what
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if tol is None:
        tol = TOLERANCES.get(dtype or expected.dtype, 1e-4)
    if expected.dtype.is_floating_point:
        scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
        torch.testing.assert_close(
            actual.detach(), expected.detach(), rtol=tol, atol=tol * scale, msg=what or None
        )
    else:
        torch.testing.assert_close(actual, expected, msg=what or None)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if (t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        else torch.contiguous_format
    )


def assert_same_memory_format(out: torch.Tensor, x: torch.Tensor) -> None:
    """The output is dense in the input's memory format (as torch.nn.functional.conv2d keeps it)."""
    fmt = memory_format_of(x)
    assert out.is_contiguous(memory_format=fmt), (
        f"input is {fmt} (strides {x.stride()}) but the output has strides {out.stride()}"
    )
