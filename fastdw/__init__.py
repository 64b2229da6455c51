"""fastdw: fused depthwise conv + BatchNorm + activation (and friends) for lightweight CNNs."""

from fastdw._backend import backends, get_backend, set_backend, use_backend
from fastdw import ops  # noqa: E402  (registers fake kernels and autograd)
from fastdw import nn  # noqa: E402
from fastdw import models  # noqa: E402
from fastdw._convert import ConversionReport, convert  # noqa: E402

__all__ = ["ConversionReport", "backends", "convert", "get_backend", "models", "nn", "ops", "set_backend",
           "use_backend"]
__version__ = "0.1.0"
