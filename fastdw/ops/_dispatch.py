"""Calling a fastdw op on CPU without the Python autograd layer when no gradient is wanted.

``torch.library.register_autograd`` puts a Python kernel on the op's Autograd dispatch key, and
every call passes through it, even under ``torch.no_grad()``: about 2-8 us per call (measured:
``channel_shuffle`` on a [1, 8, 4, 4] tensor, 4.7 us through ``torch.ops`` against 1.5 us
redispatched to the CPU kernel), a large share of a batch-1 depthwise layer. ``call`` goes straight
to the CPU kernel (``OpOverload.redispatch``) when that is provably the same thing: plain dense CPU
tensors (no subclass, fake, functorch or Python-key tensors), no dispatch mode, vmap or grad
transform active, no tensor needing a gradient, not under torch.compile tracing and not profiling
(so the op still shows in profiles). Anything else takes the normal ``op(*args)`` path.
"""

from __future__ import annotations

import torch

from fastdw import _backend

_K = torch._C.DispatchKey
_CPU = torch._C.DispatchKeySet(_K.CPU)
# The thread-local "included" key set outside any mode: BackendSelect (+ ADInplaceOrView outside
# inference mode). Modes, vmap and grad transforms add keys here.
_BS = torch._C.DispatchKeySet(_K.BackendSelect)
_PLAIN_TLS = frozenset({_BS.raw_repr(), _BS.add(_K.ADInplaceOrView).raw_repr()})
# Keys of a plain dense CPU tensor: normal, and created under inference mode.
_INFERENCE_CPU = torch._C.DispatchKeySet(_K.CPU).add(_K.AutocastCPU)
_PLAIN_CPU = frozenset({_INFERENCE_CPU.raw_repr(),
                        _INFERENCE_CPU.add(_K.ADInplaceOrView).add(_K.AutogradCPU).raw_repr()})

_tls_include = torch._C._dispatch_tls_local_include_set
_tensor_keys = torch._C._dispatch_keys
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_profiler_on = torch._C._autograd._profiler_enabled


def can_skip_autograd(tensors) -> bool:
    """True where calling the CPU kernel directly gives exactly what the dispatcher would give.

    ``tensors``: every tensor argument of the call (None allowed). ~0.3 us per tensor plus ~0.4 us.
    """
    if _is_compiling() or _tls_include().raw_repr() not in _PLAIN_TLS or _profiler_on():
        return False
    grad = _grad_enabled()
    for t in tensors:
        if t is not None and (_tensor_keys(t).raw_repr() not in _PLAIN_CPU or (grad and t.requires_grad)):
            return False
    return True


def call(op: torch._ops.OpOverload, args: tuple, n_tensors: int):
    """``op(*args)``, skipping the autograd layer where nothing can differ (see the module doc).

    The first ``n_tensors`` arguments are the op's tensor arguments (each a tensor or None); the
    rest must not be tensors.
    """
    if can_skip_autograd(args[:n_tensors]):
        return op.redispatch(_CPU, *args)
    return op(*args)


# What a fastdw C++ op raises for an argument it rejects (TORCH_CHECK_VALUE / _TYPE / TORCH_CHECK, index).
_REJECTED = (ValueError, TypeError, RuntimeError, IndexError)


def call_compiled(name: str, args: tuple, n_tensors: int):
    """``call(torch.ops.fastdw.<name>.default, args, n_tensors)`` for the modules' fast paths, which
    skip the Python checks of ``fastdw.ops``: the result where the backend for ``args[0]`` is a
    compiled one (cpu / cuda; only then does the op exist) and the op accepts the arguments, else
    None. The C++ op checks every argument before it computes,
    so after a None nothing was modified and the caller runs the checked ``fastdw.ops`` path, which
    raises its named error."""
    x = args[0]
    backend = _backend.resolve(x.device, x.dtype)
    if backend != "cpu" and backend != "cuda":
        return None
    try:
        return call(getattr(torch.ops.fastdw, name).default, args, n_tensors)
    except _REJECTED:
        return None
