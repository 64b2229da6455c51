"""fastdw.ops._dispatch: the CPU kernel is called directly only where that cannot change anything."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdw
from fastdw.ops._dispatch import call, can_skip_autograd

pytestmark = pytest.mark.skipif(not fastdw.backends()["cpu"], reason="compiled extension not loaded")


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_plain_tensors_skip_autograd_only_without_grad():
    x = torch.randn(2, 6, 3, 3)
    w = torch.randn(6, 1, 3, 3, requires_grad=True)
    assert can_skip_autograd((x,))
    assert can_skip_autograd((x, None))
    assert not can_skip_autograd((x, w))  # w needs a gradient
    with torch.no_grad():
        assert can_skip_autograd((x, w))
    with torch.inference_mode():
        assert can_skip_autograd((torch.randn(2, 6, 3, 3),))
    assert can_skip_autograd((x.contiguous(memory_format=torch.channels_last)[:, :4], None))


def test_anything_unusual_takes_the_normal_path():
    x = torch.randn(2, 6, 3, 3)
    assert not can_skip_autograd((torch.empty(2, 6, 3, 3, device="meta"),))
    assert not can_skip_autograd((x, x.to_sparse()))
    with _Passthrough():
        assert not can_skip_autograd((x,))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not can_skip_autograd((mode.from_tensor(x),))
    with torch.profiler.profile():
        assert not can_skip_autograd((x,))
    seen = []
    torch.func.vmap(lambda t: seen.append(can_skip_autograd((t,))) or t)(x)
    assert seen == [False]
    seen.clear()
    torch.func.grad(lambda t: seen.append(can_skip_autograd((t,))) or t.sum())(x)
    assert seen == [False]


@pytest.mark.parametrize("channels_last", [False, True])
def test_call_equals_the_dispatched_op(channels_last):
    x = torch.randn(2, 12, 7, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 1, 3, 3, dtype=torch.float64)
    stats = (torch.randn(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64) + 0.5)
    affine = (torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64))
    args = (x, w, None, *affine, *stats, False, 1e-5, [1, 1], [1, 1], [1, 1], "hardswish", 1)
    op = torch.ops.fastdw.dwconv_bn_act.default
    with torch.no_grad():
        assert can_skip_autograd(args[:7])
        fast, slow = call(op, args, 7), op(*args)
    for a, b in zip(fast, slow, strict=True):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    shuffle = torch.ops.fastdw.channel_shuffle.default
    expected = torch.nn.functional.channel_shuffle(x, 3)
    torch.testing.assert_close(call(shuffle, (x, 3), 1), expected, rtol=0, atol=0)


def test_profiler_still_sees_the_op():
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fastdw.ops.channel_shuffle(x, 2)
    assert any("fastdw::channel_shuffle" in e.name for e in prof.events())
