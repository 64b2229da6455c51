"""Public functional ops. Each picks a backend per call (see fastdw.use_backend)."""

from fastdw.ops.dwconv_bn_act import dwconv_bn_act

__all__ = ["dwconv_bn_act"]
