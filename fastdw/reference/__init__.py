"""Pure-PyTorch compositions of every fastdw op: the fallback of last resort and the test oracle."""

from fastdw.reference.channel_shuffle import channel_shuffle, concat_shuffle
from fastdw.reference.dwconv_bn_act import activation_fn, dwconv_bn_act
from fastdw.reference.se_scale import se_activation_fn, se_gate_fn, se_scale

__all__ = [
    "activation_fn",
    "channel_shuffle",
    "concat_shuffle",
    "dwconv_bn_act",
    "se_activation_fn",
    "se_gate_fn",
    "se_scale",
]
