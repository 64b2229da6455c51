"""fastdw: fused depthwise conv + BatchNorm + activation (and friends) for lightweight CNNs."""

from fastdw import (
    nn,  # noqa: E402
    ops,  # noqa: E402  (registers fake kernels and autograd)
)
from fastdw._backend import backends, get_backend, set_backend, use_backend

__all__ = ["backends", "get_backend", "set_backend", "use_backend", "ops", "nn"]
__version__ = "0.1.0"
