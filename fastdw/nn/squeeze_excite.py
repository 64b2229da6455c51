"""``SqueezeExcite``: torchvision's / timm's Squeeze-and-Excitation, computed by one fused op."""

from __future__ import annotations

import torch
from torch import nn

from fastdw import ops
from fastdw._validate import SE_ACTIVATIONS, SE_GATES
from fastdw.ops import _dispatch


def _known_se_classes() -> dict[type, str]:
    """The SE modules whose forward we reproduce, by kind; imported lazily, each optional."""
    known: dict[type, str] = {}
    try:
        from torchvision.ops.misc import SqueezeExcitation

        known[SqueezeExcitation] = "torchvision"
    except Exception:  # torchvision missing or broken: nothing to convert from it
        pass
    try:
        from timm.models._efficientnet_blocks import SqueezeExcite as TimmSqueezeExcite

        known[TimmSqueezeExcite] = "timm"
    except Exception:
        pass
    try:
        from timm.layers.squeeze_excite import SEModule

        known[SEModule] = "timm_se_module"
    except Exception:
        pass
    return known


def _is_timm(module: nn.Module, *names: str) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in names


def se_activation_name(act: nn.Module) -> str:
    """fastdw's name for an SE inner activation module (ReLU, SiLU / timm Swish)."""
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.SiLU or _is_timm(act, "Swish", "SwishMe"):
        return "silu"
    raise ValueError(f"SE activation {type(act).__name__} has no fused equivalent; supported: "
                     f"ReLU, SiLU (timm Swish)")


def se_gate_name(gate: nn.Module) -> str:
    """fastdw's name for an SE gate module (Sigmoid, Hardsigmoid and timm's equivalents)."""
    if type(gate) is nn.Sigmoid or _is_timm(gate, "Sigmoid"):
        return "sigmoid"
    if type(gate) is nn.Hardsigmoid or _is_timm(gate, "HardSigmoid", "HardSigmoidMe"):
        return "hardsigmoid"
    raise ValueError(f"SE gate {type(gate).__name__} has no fused equivalent; supported: "
                     f"Sigmoid, Hardsigmoid (and timm's Sigmoid, HardSigmoid)")


def _check_fc(conv, name: str, in_ch: int | None = None, out_ch: int | None = None) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    padding = (0, 0) if conv.padding in ("same", "valid") else tuple(conv.padding)  # same = 0 for 1x1
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or padding != (0, 0):
        raise ValueError(f"{name} must be a 1x1 conv with groups=1 and no padding, got {conv}")
    if in_ch is not None and conv.in_channels != in_ch:
        raise ValueError(f"{name} has {conv.in_channels} input channels, expected {in_ch}")
    if out_ch is not None and conv.out_channels != out_ch:
        raise ValueError(f"{name} has {conv.out_channels} output channels, expected {out_ch}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation, ``x * gate(fc2(act(fc1(mean_hw(x)))))``, as one fused op.

    ``fc1`` ([S, C, 1, 1], bias) and ``fc2`` ([C, S, 1, 1], bias) are ``nn.Conv2d`` children, so
    the ``state_dict`` keys are torchvision's ``SqueezeExcitation`` keys (``fc1.*``, ``fc2.*``).
    ``from_module`` wraps torchvision's ``SqueezeExcitation``, timm's ``SqueezeExcite``
    (children ``conv_reduce``/``conv_expand``, kept under those names) and timm's ``SEModule``,
    sharing their parameters. Activations: relu, silu; gates: hardsigmoid, sigmoid.
    """

    def __init__(self, channels: int, squeeze_channels: int, activation: str = "relu",
                 gate: str = "hardsigmoid") -> None:
        super().__init__()
        if activation not in SE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {SE_ACTIVATIONS}, got {activation!r}")
        if gate not in SE_GATES:
            raise ValueError(f"gate must be one of {SE_GATES}, got {gate!r}")
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation
        self.gate = gate
        self._fc_names = ("fc1", "fc2")

    @classmethod
    def from_module(cls, se: nn.Module) -> SqueezeExcite:
        """Wrap a torchvision ``SqueezeExcitation`` or timm ``SqueezeExcite``/``SEModule``.

        Parameters are shared, not copied; the child names of ``se`` are kept, so the fused
        module's ``state_dict`` has exactly the keys of ``se``. Variants with no fused equivalent
        (a norm layer or max-pool inside, other activations) raise ValueError.
        """
        kind = None
        for base, name in _known_se_classes().items():
            # A subclass that overrides forward computes something else: refuse it.
            if isinstance(se, base) and type(se).forward is base.forward:
                kind = name
                break
        if kind is None:
            raise TypeError(f"cannot convert {type(se).__name__}: expected torchvision's "
                            f"SqueezeExcitation or timm's SqueezeExcite / SEModule")
        if kind == "torchvision":
            names, act, gate = ("fc1", "fc2"), se.activation, se.scale_activation
            pool = se.avgpool
            if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
                raise ValueError(f"avgpool must be AdaptiveAvgPool2d(1), got {pool}")
        elif kind == "timm":
            names, act, gate = ("conv_reduce", "conv_expand"), se.act1, se.gate
        else:
            names, act, gate = ("fc1", "fc2"), se.act, se.gate
            if not isinstance(se.bn, nn.Identity):
                raise ValueError(f"SEModule with a norm layer ({type(se.bn).__name__}) between the FCs is "
                                 f"not supported")
            if se.add_maxpool:
                raise ValueError("SEModule with add_maxpool=True is not supported")
        fc1, fc2 = getattr(se, names[0]), getattr(se, names[1])
        _check_fc(fc1, names[0])
        _check_fc(fc2, names[1], in_ch=fc1.out_channels, out_ch=fc1.in_channels)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        setattr(self, names[0], fc1)
        setattr(self, names[1], fc2)
        self.activation = se_activation_name(act)
        self.gate = se_gate_name(gate)
        self._fc_names = names
        return self

    @property
    def reduce(self) -> nn.Conv2d:
        """The first (squeeze) 1x1 conv, whatever its name."""
        return getattr(self, self._fc_names[0])

    @property
    def expand(self) -> nn.Conv2d:
        """The second (excite) 1x1 conv, whatever its name."""
        return getattr(self, self._fc_names[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules
        fc1, fc2 = mods[self._fc_names[0]], mods[self._fc_names[1]]
        if type(x) is torch.Tensor:
            # Straight to the C++ op, which checks every argument: going through ops.se_scale costs
            # ~8 us more a call (1x16x4x4: 8.3 vs 16.7 us, 1 thread). Where the op rejects an
            # argument, ops.se_scale runs and raises its named error.
            p1, p2 = fc1._parameters, fc2._parameters
            args = (x, p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias"), self.activation, self.gate)
            out = _dispatch.call_compiled("se_scale", args)
            if out is not None:
                return out[0]
        return ops.se_scale(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=self.activation,
                            gate=self.gate)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate!r}"
