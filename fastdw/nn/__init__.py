"""Drop-in modules: same parameters under the same names as the modules they replace."""

from fastdw.nn.dwconv_bn_act import DWConvBNAct

__all__ = ["DWConvBNAct"]
