"""Drop-in modules: same parameters under the same names as the modules they replace."""

from fastdw.nn.channel_shuffle import ChannelShuffle
from fastdw.nn.dwconv_bn_act import DWConvBNAct
from fastdw.nn.fused_sequential import FusedSequential
from fastdw.nn.squeeze_excite import SqueezeExcite

__all__ = ["ChannelShuffle", "DWConvBNAct", "FusedSequential", "SqueezeExcite"]
