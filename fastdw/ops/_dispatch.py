"""The modules' fast path to a compiled fastdw op, skipping the Python checks of ``fastdw.ops``.

The compiled ops carry their autograd in C++ (csrc/autograd.cpp), so calling
``torch.ops.fastdw.<op>`` costs ~1-2 us on top of the kernel, grad or no grad. What is left to
save at batch 1 are the Python argument checks (~5-10 us per call): the C++ op checks every
argument itself (csrc/common/checks.h) before it computes anything.
"""

from __future__ import annotations

import torch

from fastdw import _backend

# What a fastdw C++ op raises for an argument it rejects (TORCH_CHECK_VALUE / _TYPE / TORCH_CHECK, index).
REJECTED = (ValueError, TypeError, RuntimeError, IndexError)


def call_compiled(name: str, args: tuple):
    """``torch.ops.fastdw.<name>.default(*args)`` where the backend for ``args[0]`` is a compiled one
    (cpu / cuda; only then does the op exist) and the op accepts the arguments, else None. The C++
    op checks every argument before it computes, so after a None nothing was modified and the
    caller runs the checked ``fastdw.ops`` path, which raises its named error."""
    x = args[0]
    backend = _backend.resolve(x.device, x.dtype)
    if backend != "cpu" and backend != "cuda":
        return None
    try:
        return getattr(torch.ops.fastdw, name).default(*args)
    except REJECTED:
        return None
