"""fastdw::bn_running_update: BatchNorm2d's running-statistics update after a training-mode
dwconv_bn_act, one C++ op (csrc/bn_running_update.cpp), against the same update done in float64."""

from __future__ import annotations

import pytest
import torch

import fastdw

pytestmark = pytest.mark.skipif(not fastdw._backend.extension_loaded(), reason="extension not built")


def _op(*args):
    return torch.ops.fastdw.bn_running_update.default(*args)


def _expected(rm, rv, mean, var, factor, count):
    """BatchNorm2d's rule in float64: move by factor towards the mean and the unbiased variance."""
    rm, rv, mean, var = (t.double() for t in (rm, rv, mean, var))
    if count <= 1:
        return rm, rv
    return (1 - factor) * rm + factor * mean, (1 - factor) * rv + factor * var * count / (count - 1)


def _stats(c, dtype, gen):
    def rand(lo, hi):
        return (torch.rand(c, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    return rand(-2, 2), rand(0.5, 3), rand(-1, 1), rand(0.1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "c,factor,count", [(1, 0.1, 2), (7, 0.1, 49), (96, 0.7, 3136), (33, 1.0, 10), (5, 0.25, 1)]
)
def test_matches_float64_rule(dtype, c, factor, count):
    gen = torch.Generator().manual_seed(c + count)
    rm, rv, mean, var = _stats(c, dtype, gen)
    exp_m, exp_v = _expected(rm, rv, mean, var, factor, count)
    nbt = torch.tensor(3)
    v_m, v_v = rm._version, rv._version
    _op(rm, rv, nbt, mean, var, factor, count)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rm.double(), exp_m, **tol)
    torch.testing.assert_close(rv.double(), exp_v, **tol)
    assert int(nbt) == 4
    if count > 1:  # in-place updates are visible to autograd's version counters
        assert rm._version > v_m and rv._version > v_v


def test_agrees_with_batchnorm2d_over_steps():
    """Several steps against nn.BatchNorm2d's own update (momentum=None: cumulative average)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, momentum=None)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for step in range(4):
        x = torch.randn(2 + step, 8, 5, 3) * (1 + step) + step
        bn(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        _op(rm, rv, nbt, mean, var, 1.0 / (step + 1), x.numel() // 8)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(nbt) == int(bn.num_batches_tracked)


def test_general_path_strided_and_mixed_dtypes():
    """Statistics that are not dense or not of one dtype take the ATen path, with the same result."""
    gen = torch.Generator().manual_seed(1)
    rm, rv, mean, var = _stats(12, torch.float64, gen)
    exp_m, exp_v = _expected(rm, rv, mean, var, 0.3, 20)
    big_m, big_v = torch.zeros(24, dtype=torch.float64), torch.zeros(24, dtype=torch.float64)
    big_m[::2], big_v[::2] = rm, rv
    _op(big_m[::2], big_v[::2], None, mean.float(), var.float(), 0.3, 20)  # strided views, float stats
    torch.testing.assert_close(big_m[::2], exp_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(big_v[::2], exp_v, rtol=1e-6, atol=1e-6)
    assert big_m[1::2].eq(0).all() and big_v[1::2].eq(0).all()  # the elements between are untouched


def test_size_mismatch_is_a_value_error():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="same number of elements"):
        _op(rm, rv, None, torch.zeros(5), torch.ones(4), 0.1, 8)
    with pytest.raises(ValueError, match="count must be >= 0"):
        _op(rm, rv, None, torch.zeros(4), torch.ones(4), 0.1, -1)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    rm, rv, mean, var = _stats(6, torch.float32, gen)
    args = (rm, rv, torch.tensor(0), mean, var, 0.1, 12)
    torch.library.opcheck(torch.ops.fastdw.bn_running_update.default, args)
