"""Pure-PyTorch compositions of every fastdw op: the fallback of last resort and the test oracle."""

from fastdw.reference.dwconv_bn_act import activation_fn, dwconv_bn_act

__all__ = ["activation_fn", "dwconv_bn_act"]
