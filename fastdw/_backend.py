"""Loading the compiled extension and choosing a backend per call.

Backends: ``cpu`` (C++ kernels in fastdw._C), ``cuda`` (CUDA C++), ``triton`` and ``reference``
(pure PyTorch, the fallback of last resort and the oracle in tests). ``auto`` picks the best one
available for the tensor's device.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_ext_error: str | None = None
_ext_loaded = False


def _load_extension() -> None:
    global _ext_loaded, _ext_error
    try:
        if os.environ.get("FASTDW_DISABLE_EXTENSION") == "1":
            raise ImportError("disabled by FASTDW_DISABLE_EXTENSION=1")
        from fastdw import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrars)

        _ext_loaded = True
    except Exception as e:  # missing, built for another torch, or unloadable: fall back, never fail
        _ext_error = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"fastdw: the compiled extension fastdw._C could not be loaded ({_ext_error}); "
            "using the pure-PyTorch 'reference' backend. Build it with `make build`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load_extension()


def extension_loaded() -> bool:
    return _ext_loaded


def extension_error() -> str | None:
    return _ext_error


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, bool]:
    """What is built and usable here."""
    cuda_built = _ext_loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastdw::dwconv_bn_act", "CUDA"
    )
    return {
        "cpu": _ext_loaded,
        "cuda": bool(cuda_built and torch.cuda.is_available()),
        "triton": False,  # no Triton kernels yet
        "reference": True,
    }


class _State(threading.local):
    def __init__(self) -> None:
        self.backend = os.environ.get("FASTDW_BACKEND", "auto")


_state = _State()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"fastdw: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for this thread: 'auto', 'cpu', 'cuda', 'triton' or 'reference'."""
    _state.backend = _check_name(name)


def get_backend() -> str:
    return _state.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with fastdw.use_backend("reference"): ...`` forces a backend inside the block."""
    previous = _state.backend
    _state.backend = _check_name(name)
    try:
        yield
    finally:
        _state.backend = previous


CPU_DTYPES = (torch.float32, torch.float64)


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on tensors of this device and dtype.

    A forced backend that cannot run here raises, so a test or benchmark never silently measures
    the wrong code. ``auto`` falls back to ``reference`` where no kernel exists.
    """
    name = _state.backend
    if name == "auto":
        if device.type == "cpu" and _ext_loaded and dtype in CPU_DTYPES:
            return "cpu"
        return "reference"
    if name == "reference":
        return name
    if name == "cpu":
        if not _ext_loaded:
            raise RuntimeError(f"fastdw: backend 'cpu' is not available: {_ext_error}")
        if device.type != "cpu":
            raise RuntimeError(f"fastdw: backend 'cpu' needs CPU tensors, got a tensor on {device}")
        if dtype not in CPU_DTYPES:
            raise TypeError(f"fastdw: backend 'cpu' supports float32 and float64, got {dtype}")
        return name
    raise RuntimeError(f"fastdw: backend {name!r} is not built in this version of fastdw")
