"""channel_shuffle / concat_shuffle on the `triton` backend (the interpreter without a GPU).

The behaviour tests of test_channel_shuffle.py that take the ``backend`` fixture are imported here
and run again with this module's fixture, which selects `triton`: the same expectations (exact
equality with torch.nn.functional.channel_shuffle, gradients, layouts, strided views, other ranks,
bad input), no copied test bodies.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_triton
from test_channel_shuffle import (  # noqa: F401  (collected again here, with the fixture below)
    FORMATS,
    _concat_shuffle_ref,
    _x,
    check_opcheck,
    test_bad_groups,
    test_bad_tensors,
    test_concat_shuffle,
    test_concat_shuffle_of_channel_slices,
    test_concat_shuffle_other_ranks,
    test_gradient_is_inverse_permutation,
    test_matches_functional_for_every_groups,
    test_module,
    test_non_dense_input,
    test_other_ranks,
)

import fastdw

pytestmark = requires_triton


@pytest.fixture
def backend():
    with fastdw.use_backend("triton"):
        yield "triton"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_layouts(backend, dtype):
    for fmt in FORMATS:
        x = _x((2, 12, 3, 5), fmt, dtype).requires_grad_()
        y = fastdw.ops.channel_shuffle(x, 3)
        assert torch.equal(y, F.channel_shuffle(x, 3))
        assert y.is_contiguous(memory_format=FORMATS[fmt])
        gy = torch.randn_like(y)
        expect = torch.autograd.grad(F.channel_shuffle(x, 3), x, gy)[0]
        assert torch.equal(torch.autograd.grad(y, x, gy)[0], expect)
        z = fastdw.ops.concat_shuffle(x, 2 * x)
        assert torch.equal(z, _concat_shuffle_ref(x, 2 * x))
        assert z.is_contiguous(memory_format=FORMATS[fmt])
        ga, gb = torch.ops.fastdw.triton_concat_shuffle_backward(z)
        assert torch.equal(ga, x) and torch.equal(gb, 2 * x)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (1, 2, 1, 1)])
def test_edge_sizes(backend, shape):
    for fmt in FORMATS:
        x = _x(shape, fmt).requires_grad_()
        y = fastdw.ops.channel_shuffle(x, 2)
        assert torch.equal(y, F.channel_shuffle(x, 2))
        y.sum().backward()
        assert torch.equal(fastdw.ops.concat_shuffle(x, x), _concat_shuffle_ref(x, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    check_opcheck(fmt, "triton_")
