"""``DWConvBNAct``: a Conv2dNormActivation-compatible Sequential whose forward is one fused op."""

from __future__ import annotations

import torch
from torch import nn

from fastdw import ops
from fastdw._validate import ACTIVATIONS
from fastdw.ops import _dispatch
from fastdw.ops.dwconv_bn_act import running_factor, update_running_stats

_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def activation_name(act: nn.Module | None) -> str:
    """The fastdw activation name of a module, or ValueError if it has no fused equivalent."""
    if act is None or type(act) is nn.Identity:
        return "none"
    if type(act) is nn.ReLU6 or (type(act) is nn.Hardtanh and act.min_val == 0.0 and act.max_val == 6.0):
        return "relu6"
    for name, cls in _ACT_MODULES.items():
        if type(act) is cls:
            return name
    raise ValueError(f"activation {type(act).__name__} has no fused equivalent; supported: "
                     "ReLU, ReLU6, Hardtanh(0, 6), Hardswish, SiLU, Identity")


class DWConvBNAct(nn.Sequential):
    """Depthwise ``Conv2d`` -> ``BatchNorm2d`` -> activation, computed by one fused op.

    Children are the original modules (``0`` conv, ``1`` BatchNorm, then the activation), so the
    ``state_dict`` keys are those of torchvision's ``Conv2dNormActivation``. ``train()``/``eval()``
    select batch or running statistics exactly as for ``nn.BatchNorm2d``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, activation: str = "relu6", bn: bool = True, bias: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1,
                 input_shuffle_groups: int | None = None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if padding is None:
            padding = (kernel_size // 2) * dilation
        layers: list[nn.Module] = [nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation,
                                             groups=channels, bias=bias)]
        if bn:
            layers.append(nn.BatchNorm2d(channels, eps=eps, momentum=momentum))
        if activation != "none":
            layers.append(_ACT_MODULES[activation]())
        super().__init__(*layers)
        self.activation = activation
        self.input_shuffle_groups = input_shuffle_groups

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                     act: nn.Module | None = None, *, input_shuffle_groups: int | None = None) -> DWConvBNAct:
        """Wrap existing modules; parameters and buffers are shared, not copied.

        ``input_shuffle_groups=g``: the block computes ``conv(channel_shuffle(x, g))`` (then BN and
        activation) reading its input through the shuffle, as in ShuffleNetV1 units."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        c = conv.in_channels
        if conv.groups != c or conv.out_channels != c:
            raise ValueError(f"conv is not depthwise: in={c}, out={conv.out_channels}, groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        _conv_padding(conv)
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
            if bn.num_features != c:
                raise ValueError(f"bn has {bn.num_features} features but conv has {c} channels")
        name = activation_name(act)
        self = cls.__new__(cls)
        layers = [m for m in (conv, bn, act) if m is not None]
        nn.Sequential.__init__(self, *layers)
        self.activation = name
        self.input_shuffle_groups = input_shuffle_groups
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules  # children "0", "1", "2" (Sequential indexing costs ~2 us per lookup)
        conv = mods["0"]
        bn = mods.get("1")
        if not isinstance(bn, nn.BatchNorm2d):
            bn = None
        elif type(x) is torch.Tensor:
            out = self._compiled(x, conv, bn)
            if out is not None:
                return out
        if bn is None:
            return ops.dwconv_bn_act(x, conv.weight, conv.bias, stride=conv.stride,
                                     padding=_conv_padding(conv), dilation=conv.dilation,
                                     activation=self.activation,
                                     input_shuffle_groups=self.input_shuffle_groups)
        training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_running = not bn.training or bn.track_running_stats
        return ops.dwconv_bn_act(
            x, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if use_running else None, bn.running_var if use_running else None,
            training=training, momentum=bn.momentum, eps=bn.eps, stride=conv.stride,
            padding=_conv_padding(conv), dilation=conv.dilation, activation=self.activation,
            num_batches_tracked=bn.num_batches_tracked if (bn.training and bn.track_running_stats) else None,
            input_shuffle_groups=self.input_shuffle_groups,
        )

    def _compiled(self, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor | None:
        """Eval and training on the compiled (cpu / cuda) backend: the module's own arguments go
        straight to the C++ op, which checks them all (shapes, dtypes, devices, geometry); the
        Python checks of ``ops.dwconv_bn_act`` cost ~9 us per call, half a batch-1 layer at 7x7.
        In training, BatchNorm2d's running-statistics update follows. None where the general path
        must run: another backend, eval without running statistics, a string padding, a cumulative
        average without its count, or an argument the op rejects (the general path then raises its
        own, named error; a rejected call computed and updated nothing, so running it again is
        safe)."""
        cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
        padding, eps, training = conv.padding, bn.eps, bn.training
        if type(padding) is not tuple or not (type(eps) is float and eps > 0):
            return None
        running = not training or bn.track_running_stats
        mean, var = (bb.get("running_mean"), bb.get("running_var")) if running else (None, None)
        tracked = bb.get("num_batches_tracked")
        if training:
            if mean is not None and bn.momentum is None and tracked is None:
                return None
        elif mean is None or var is None:
            return None
        args = (x, cp["weight"], cp.get("bias"), bp.get("weight"), bp.get("bias"), mean, var, training, eps,
                conv.stride, padding, conv.dilation, self.activation, self.input_shuffle_groups or 1)
        res = _dispatch.call_compiled("dwconv_bn_act", args)
        if res is None:
            return None
        out, batch_mean, batch_var = res
        if training and mean is not None:
            count = out.shape[0] * out.shape[2] * out.shape[3]
            factor = running_factor(bn.momentum, tracked)
            update_running_stats(mean, var, tracked, factor, batch_mean, batch_var, count)
        return out

    def extra_repr(self) -> str:
        extra = f", input_shuffle_groups={self.input_shuffle_groups}" if self.input_shuffle_groups else ""
        return f"activation={self.activation!r}{extra}"


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
            raise ValueError("padding='same' with an even effective kernel size is asymmetric; not supported")
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return tuple(conv.padding)
