"""``fastdw.convert``: swap fastdw's fused modules into an existing torchvision or timm model.

Every swap keeps the ``state_dict`` exactly (same keys in the same order, same tensors): a fused
module either has the children of what it replaces (``DWConvBNAct`` for a depthwise
``Conv2dNormActivation``, ``SqueezeExcite`` keeping the SE's child names) or is a new instance of a
subclass sharing all the children of the old one and changing only ``forward``
(``FusedSequential`` for flat Sequentials, the timm blocks, ShuffleNetV2's unit). Patterns:

* depthwise ``Conv2d -> BatchNorm2d (-> activation)``: a whole ``nn.Sequential`` /
  ``Conv2dNormActivation`` of those becomes a ``DWConvBNAct``; a longer flat ``nn.Sequential``
  holding such a run (MNASNet, ShuffleNetV2 branches) becomes a ``FusedSequential``; timm's
  ``DepthwiseSeparableConv`` (``conv_dw`` + ``bn1``) and ``InvertedResidual`` (``conv_dw`` + ``bn2``,
  a ``BatchNormAct2d`` holding the activation) get a forward running that pair fused;
* Squeeze-and-Excitation: torchvision ``SqueezeExcitation``, timm ``SqueezeExcite`` / ``SEModule``;
* channel shuffle: torchvision ShuffleNetV2's ``InvertedResidual`` (cat + shuffle as one
  ``concat_shuffle``) and ``nn.ChannelShuffle``.

Anything else is left as it is; the report lists the depthwise convs and SE blocks it could not
fuse, with the reason.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, overload

from torch import nn

from fastdw.nn import ChannelShuffle, DWConvBNAct, FusedSequential, SqueezeExcite
from fastdw.nn.fused_sequential import fuse_dwconv_bn_act, match_dwconv_bn_act
from fastdw.nn.squeeze_excite import _known_se_classes


@dataclass
class ConversionReport:
    """What ``convert`` swapped (pattern -> module paths) and skipped ((path, reason) pairs)."""

    swapped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """How many of each pattern were swapped."""
        return {k: len(v) for k, v in self.swapped.items()}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "nothing"
        lines = [f"fastdw.convert: swapped {counts}; skipped {len(self.skipped)}"]
        lines += [f"  skipped {path or '<root>'}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _rebind(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A new ``cls`` instance with the state of ``module`` (same children, parameters, buffers and
    attributes, shared): a different forward over the same ``state_dict``."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def _is_depthwise_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _plain_sequential(m: nn.Module) -> bool:
    """A plain ``nn.Sequential`` or torchvision's ``Conv2dNormActivation`` (Sequential's forward)."""
    if type(m) is nn.Sequential:
        return True
    try:
        from torchvision.ops.misc import Conv2dNormActivation, ConvNormActivation
    except Exception:
        return False
    return type(m) in (Conv2dNormActivation, ConvNormActivation) and type(m).forward is nn.Sequential.forward


_UNRECOGNISED = ("not in a recognised pattern (a depthwise Conv2d followed by BatchNorm2d in an "
                 "nn.Sequential, or a known timm block)")


class _Converter:
    def __init__(self, fold_bn: bool) -> None:
        self.fold_bn = fold_bn
        self.report = ConversionReport()
        self.fused_convs: set[int] = set()
        self.reasons: dict[int, str] = {}
        self.se_classes = tuple(_known_se_classes())
        self.special = self._special_blocks()

    @staticmethod
    def _special_blocks() -> dict[type, tuple[str, type]]:
        """Exact block classes with a fused twin: class -> (pattern, fused subclass)."""
        special: dict[type, tuple[str, type]] = {}
        try:
            from fastdw._convert_torchvision import ShuffleInvertedResidual

            special[ShuffleInvertedResidual.fastdw_base] = ("concat_shuffle", ShuffleInvertedResidual)
        except Exception:  # torchvision missing or changed: nothing of it to convert
            pass
        try:
            from fastdw._convert_timm import FusedDepthwiseSeparableConv, FusedInvertedResidual

            for fused in (FusedDepthwiseSeparableConv, FusedInvertedResidual):
                special[fused.fastdw_base] = ("dwconv_bn_act", fused)
        except Exception:
            pass
        return special

    def swapped(self, pattern: str, path: str) -> None:
        self.report.swapped[pattern].append(path)

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        new = self.replace(module, path)
        self.fused_convs.update(id(conv) for conv in _fused_convs(new))
        if not isinstance(new, (DWConvBNAct, SqueezeExcite)):
            for name, child in list(new._modules.items()):
                if child is not None:
                    replacement = self.convert(child, f"{path}.{name}" if path else name)
                    if replacement is not child:
                        new._modules[name] = replacement
        return new

    def replace(self, m: nn.Module, path: str) -> nn.Module:
        """The fused replacement of ``m`` itself (children are handled by ``convert``), or ``m``."""
        if isinstance(m, self.se_classes):
            try:
                fused = SqueezeExcite.from_module(m)
            except (TypeError, ValueError) as e:
                self.report.skipped.append((path, f"{type(m).__name__}: {e}"))
                return m
            self.swapped("squeeze_excite", path)
            return fused
        if type(m) is nn.ChannelShuffle:
            self.swapped("channel_shuffle", path)
            return ChannelShuffle.from_module(m)
        if type(m) in self.special:
            return self.special_block(m, path)
        if _plain_sequential(m):
            return self.sequential(m, path)
        return m

    def special_block(self, m: nn.Module, path: str) -> nn.Module:
        pattern, cls = self.special[type(m)]
        new = _rebind(cls, m)
        if pattern == "dwconv_bn_act":
            fused = new.fastdw_fused_dw()
            conv = getattr(m, "conv_dw", None)
            if isinstance(fused, str):
                self.reasons[id(conv)] = fused
                return m
            self.fused_convs.add(id(conv))
        self.swapped(pattern, path)
        return new

    def sequential(self, seq: nn.Sequential, path: str) -> nn.Module:
        children = list(seq._modules.values())
        if 2 <= len(children) <= 3:  # the whole Sequential is the triplet (Conv2dNormActivation)
            whole = fuse_dwconv_bn_act(*children)
            if isinstance(whole, DWConvBNAct):
                for k, v in seq.__dict__.items():  # e.g. Conv2dNormActivation.out_channels
                    if not k.startswith("_") and k not in whole.__dict__:
                        whole.__dict__[k] = v
                whole.train(seq.training)
                self.fused_convs.add(id(children[0]))
                self.swapped("dwconv_bn_act", path)
                return whole
            if _is_depthwise_like(children[0]):
                self.reasons[id(children[0])] = whole
        runs = []
        for i, child in enumerate(children):
            if _is_depthwise_like(child):
                match = match_dwconv_bn_act(children, i)
                if match is None:
                    nxt = children[i + 1] if i + 1 < len(children) else None
                    reason = fuse_dwconv_bn_act(child, nxt) if nxt is not None else "no BatchNorm2d after it"
                    self.reasons.setdefault(id(child), reason)
                else:
                    runs.append(i)
        if not runs and not (self.fold_bn and _has_conv_bn(children)):
            return seq
        new = _rebind(FusedSequential, seq)  # keeps attributes such as Conv2dNormActivation.out_channels
        new.fold_bn = self.fold_bn
        if not runs:
            self.swapped("conv_bn_fold", path)
        names = list(seq._modules)
        for i in runs:
            self.fused_convs.add(id(children[i]))
            self.swapped("dwconv_bn_act", f"{path}.{names[i]}" if path else names[i])
        return new

    def finish(self, model: nn.Module) -> ConversionReport:
        for path, m in model.named_modules(remove_duplicate=False):
            if _is_depthwise_like(m) and id(m) not in self.fused_convs:
                reason = self.reasons.get(id(m), _UNRECOGNISED)
                self.report.skipped.append((path, reason))
        return self.report


def _fused_convs(m: nn.Module) -> list[nn.Module]:
    """The depthwise convs an (already) fused module runs fused."""
    if isinstance(m, DWConvBNAct):
        return [m[0]]
    if isinstance(m, FusedSequential):
        owners = [getattr(step, "__self__", None) for _, step in m._steps()]
        return [owner[0] for owner in owners if isinstance(owner, DWConvBNAct)]
    if hasattr(m, "fastdw_fused_dw"):
        fused = m.fastdw_fused_dw()
        return [fused[0]] if isinstance(fused, DWConvBNAct) else []
    return []


def _has_conv_bn(children: list[nn.Module]) -> bool:
    pairs = zip(children[:-1], children[1:], strict=True)
    return any(type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d for a, b in pairs)


@overload
def convert(model: nn.Module, inplace: bool = ..., *, report: Literal[False] = ...,
            fold_bn: bool = ...) -> nn.Module: ...


@overload
def convert(model: nn.Module, inplace: bool = ..., *, report: Literal[True],
            fold_bn: bool = ...) -> tuple[nn.Module, ConversionReport]: ...


def convert(model: nn.Module, inplace: bool = False, *, report: bool = False,
            fold_bn: bool = False) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Swap fastdw's fused modules into ``model`` and return it (a deep copy unless ``inplace``).

    The ``state_dict`` is unchanged (keys, order, values), so checkpoints load before and after;
    outputs agree with the original up to float rounding, in training (batch statistics, running-stat
    updates, gradients) and eval mode. Recognised: depthwise conv + BatchNorm (+ activation) in
    Sequentials and timm's efficientnet blocks, torchvision's and timm's SE blocks, ShuffleNetV2's
    concat + shuffle, ``nn.ChannelShuffle``; everything else is left untouched.

    ``fold_bn=True`` also runs, in eval mode, every other conv -> BatchNorm2d (-> activation) of a
    plain ``nn.Sequential`` or ``Conv2dNormActivation`` with the BN folded into the conv.
    ``report=True`` returns ``(model, ConversionReport)``: what was swapped where, and what was
    skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(fold_bn)
    model = converter.convert(model, "")
    summary = converter.finish(model)
    return (model, summary) if report else model
