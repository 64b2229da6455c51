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


_ops: dict[str, torch._ops.OpOverload] = {}  # looked up once each (~0.3 us a call otherwise)


def call_compiled(name: str, args: tuple):
    """``torch.ops.fastdw.<name>.default(*args)`` where the backend for ``args[0]`` (a tensor) is a
    compiled one (cpu / cuda; only then does the op exist) and the op accepts the arguments, else
    None. The C++ op checks every argument before it computes, so after a None nothing was modified
    and the caller runs the checked ``fastdw.ops`` path, which raises its named error."""
    x = args[0]
    # CPU tensors on the cpu kernels checked first and cheaply (~0.2 us; resolve takes ~0.4 us).
    if not _backend.on_cpu_kernels(x):
        try:
            if _backend.resolve(x.device, x.dtype) != "cuda":
                return None
        except REJECTED:  # a forced backend that cannot run here: the checked path says why
            return None
    op = _ops.get(name)
    if op is None:
        op = _ops[name] = getattr(torch.ops.fastdw, name).default
    try:
        return op(*args)
    except REJECTED:
        return None
