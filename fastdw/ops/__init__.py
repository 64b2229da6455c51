"""Public functional ops. Each picks a backend per call (see fastdw.use_backend)."""

from fastdw.ops.channel_shuffle import (
    channel_shuffle,
    concat_shuffle,
    shuffle_conv_weight,
    shuffle_permutation,
)
from fastdw.ops.dwconv_bn_act import dwconv_bn_act
from fastdw.ops.se_scale import se_scale

__all__ = [
    "channel_shuffle",
    "concat_shuffle",
    "dwconv_bn_act",
    "se_scale",
    "shuffle_conv_weight",
    "shuffle_permutation",
]
