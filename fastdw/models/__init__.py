"""Bundled networks built from fastdw modules.

Where torchvision has the model (``mobilenet_v2``, ``mobilenet_v3_large``/``_small``,
``shufflenet_v2_*``, ``squeezenet1_*``) the module tree and ``state_dict`` are torchvision's, so
``model.load_state_dict(torchvision_model.state_dict())`` works and the outputs agree. Every factory
takes ``num_classes`` and ``weights`` (a local checkpoint path or a state_dict; nothing downloads).
"""

from fastdw.models.mobilenet_v1 import MobileNetV1, mobilenet_v1
from fastdw.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from fastdw.models.mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from fastdw.models.shufflenet_v1 import ShuffleNetV1, shufflenet_v1
from fastdw.models.shufflenet_v2 import (
    ShuffleNetV2,
    shufflenet_v2_x0_5,
    shufflenet_v2_x1_0,
    shufflenet_v2_x1_5,
    shufflenet_v2_x2_0,
)
from fastdw.models.squeezenet import SqueezeNet, squeezenet1_0, squeezenet1_1
from fastdw.models.ssdlite import SSDLite, priors, ssdlite_mobilenet_v2
from fastdw.models.xception import Xception, xception

__all__ = [
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3",
    "SSDLite",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "SqueezeNet",
    "Xception",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "priors",
    "shufflenet_v1",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "ssdlite_mobilenet_v2",
    "xception",
]
