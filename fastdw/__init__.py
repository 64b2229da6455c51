"""fastdw: fused depthwise conv + BatchNorm + activation (and friends) for lightweight CNNs."""

from fastdw import models, nn, ops  # ops registers the fake kernels and autograd
from fastdw._backend import backends, get_backend, set_backend, use_backend
from fastdw._convert import ConversionReport, convert

__all__ = ["ConversionReport", "backends", "convert", "get_backend", "models", "nn", "ops", "set_backend",
           "use_backend"]
__version__ = "0.1.0"
