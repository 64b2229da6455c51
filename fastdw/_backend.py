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


def _cuda_kernels() -> bool:
    """The CUDA C++ kernels are compiled into fastdw._C (FASTDW_CUDA=1 builds)."""
    return _ext_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("fastdw::dwconv_bn_act", "CUDA")


# ---- the Triton backend: imported on first use or report, never by `import fastdw` -----------------

_triton_error: str | None = None
_triton_module = None
_triton_hooks: list = []


def on_triton_load(fn):
    """Decorator: run fn once, right after fastdw.triton is imported (fastdw.ops registers the fake
    kernels and autograd of the fastdw::triton_* ops this way, so the kernels never import upward)."""
    _triton_hooks.append(fn)
    if _triton_module is not None:
        fn()
    return fn


def _load_triton():
    """fastdw.triton, imported once (None, with the reason in _triton_error, if that fails)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            import fastdw.triton as module
        except Exception as e:  # triton missing, or too old / too new for these kernels
            _triton_error = f"{type(e).__name__}: {e}"
            return None
        _triton_module = module
        for hook in _triton_hooks:
            hook()
    return _triton_module


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable() -> bool:
    """Triton imports and can run somewhere: on a CUDA GPU, or on CPU under TRITON_INTERPRET=1."""
    if not (torch.cuda.is_available() or _interpret_requested()):
        return False  # checked first: no `import triton` where it could not run anyway
    return _load_triton() is not None


def backends() -> dict[str, bool]:
    """What is built and usable here."""
    return {
        "cpu": _ext_loaded,
        "cuda": bool(_cuda_kernels() and torch.cuda.is_available()),
        "triton": _triton_usable(),
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
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPE_NAMES = "float16, bfloat16, float32 and float64"


def _check_triton(device: torch.device, dtype: torch.dtype) -> None:
    """Raises unless the forced 'triton' backend can run on tensors of this device and dtype."""
    if device.type == "cpu":
        if not _interpret_requested():
            raise RuntimeError(
                "fastdw: backend 'triton' runs on CPU tensors only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (or use CUDA tensors)"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"fastdw: backend 'triton' needs CUDA tensors, got a tensor on {device}")
    if _load_triton() is None:
        raise RuntimeError(f"fastdw: backend 'triton' is not available: {_triton_error}")
    if device.type == "cpu" and not _triton_module.INTERPRETED:
        raise RuntimeError(
            "fastdw: backend 'triton' on CPU tensors: fastdw.triton was imported before TRITON_INTERPRET=1 "
            "was set, so its kernels are compiled for a GPU; set it before the first import"
        )
    if dtype not in GPU_DTYPES:
        raise TypeError(f"fastdw: backend 'triton' supports {_GPU_DTYPE_NAMES}, got {dtype}")


def cpu_kernels_chosen() -> bool:
    """True where float32 / float64 CPU tensors go to the compiled CPU kernels: the backend is
    'auto' or 'cpu' and the extension is loaded."""
    name = _state.backend
    return (name == "auto" or name == "cpu") and _ext_loaded


def on_cpu_kernels(x: torch.Tensor) -> bool:
    """True where ``resolve(x.device, x.dtype)`` is 'cpu': the common case, checked in ~0.2 us
    (``resolve`` takes ~0.4 us, a share of a 5 us op)."""
    return cpu_kernels_chosen() and x.is_cpu and x.dtype in CPU_DTYPES


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on tensors of this device and dtype.

    A forced backend that cannot run here raises, so a test or benchmark never silently measures
    the wrong code. ``auto`` falls back to ``reference`` where no kernel exists; it never picks
    ``triton`` for CPU tensors (the interpreter is a test vehicle, not a backend to run models on).
    """
    name = _state.backend
    if name == "auto":
        if device.type == "cpu" and _ext_loaded and dtype in CPU_DTYPES:
            return "cpu"
        if device.type == "cuda" and dtype in GPU_DTYPES:
            if _cuda_kernels():
                return "cuda"
            if _triton_usable():
                return "triton"
        return "reference"
    if name == "reference":
        return name
    if name == "cpu":
        missing = None if _ext_loaded else _ext_error
        _check_compiled(name, missing, device, dtype, CPU_DTYPES, "float32 and float64")
    elif name == "cuda":
        missing = None if _cuda_kernels() else _ext_error if not _ext_loaded else (
            "fastdw._C was built without CUDA kernels (build with FASTDW_CUDA=1)")
        _check_compiled(name, missing, device, dtype, GPU_DTYPES, _GPU_DTYPE_NAMES)
    else:
        _check_triton(device, dtype)
    return name


def _check_compiled(name: str, missing: str | None, device: torch.device, dtype: torch.dtype, dtypes,
                    dtype_names: str) -> None:
    """Raises unless the C++ backend ``name`` ('cpu' or 'cuda') is built (``missing`` says why not)
    and runs on tensors of this device and dtype."""
    if missing is not None:
        raise RuntimeError(f"fastdw: backend '{name}' is not available: {missing}")
    if device.type != name:
        raise RuntimeError(f"fastdw: backend '{name}' needs {name.upper()} tensors, got a tensor on {device}")
    if dtype not in dtypes:
        raise TypeError(f"fastdw: backend '{name}' supports {dtype_names}, got {dtype}")
