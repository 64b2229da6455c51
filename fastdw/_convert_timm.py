"""Fused twins of timm's efficientnet blocks for ``fastdw.convert`` (imported only when timm is).

timm's ``DepthwiseSeparableConv`` and ``InvertedResidual`` hold the depthwise conv as ``conv_dw`` and
its BatchNorm + activation as one ``BatchNormAct2d`` (``bn1`` and ``bn2`` respectively). The twins
are subclasses with the same children whose forward runs that pair as one fused
``DWConvBNAct`` (kept out of the module tree, so the ``state_dict`` is unchanged) and is otherwise
timm's forward. ``fastdw_fused_dw`` says why a block cannot be fused.
"""

from __future__ import annotations

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

from fastdw.nn import DWConvBNAct
from fastdw.nn.fused_sequential import is_depthwise


def _fused_dw(block: nn.Module, bn_name: str):
    """The cached ``DWConvBNAct`` over ``block.conv_dw`` and ``block.<bn_name>``, or why there is none.

    Rebuilt when either child is replaced.
    """
    conv, bn = block.conv_dw, getattr(block, bn_name)
    cached = block.__dict__.get("_fastdw_dw")
    if cached is not None and cached[0] is conv and cached[1] is bn:
        return cached[2]
    if not hasattr(bn, "act") or not hasattr(bn, "drop"):
        fused = f"{bn_name} is a {type(bn).__name__}, not timm's BatchNormAct2d"
    elif not isinstance(bn.drop, nn.Identity):
        fused = f"{bn_name} has a drop layer ({type(bn.drop).__name__}) between BatchNorm and activation"
    elif type(bn).forward is not _batchnorm_act_forward():
        fused = f"{bn_name} ({type(bn).__name__}) is not timm's BatchNormAct2d"
    elif not is_depthwise(conv):
        fused = f"conv_dw ({type(conv).__name__}) is not a depthwise nn.Conv2d"
    else:
        try:  # BatchNormAct2d is a BatchNorm2d: the fused op reads its parameters and settings
            fused = DWConvBNAct.from_modules(conv, bn, bn.act)
        except (TypeError, ValueError) as e:
            fused = str(e)
    block.__dict__["_fastdw_dw"] = (conv, bn, fused)  # not a child: the state_dict is unchanged
    return fused


def _batchnorm_act_forward():
    from timm.layers.norm_act import BatchNormAct2d

    return BatchNormAct2d.forward


class _FusedBlock:
    _bn_name = ""
    fastdw_base: type[nn.Module]

    def fastdw_fused_dw(self):
        return _fused_dw(self, self._bn_name)

    def _dw(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_dw(self, self._bn_name)
        if isinstance(fused, str):
            return getattr(self, self._bn_name)(self.conv_dw(x))
        return fused(x)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # nn.Module's
        state.pop("_fastdw_dw", None)  # rebuilt on first use, over the copied children
        return state


class FusedDepthwiseSeparableConv(_FusedBlock, DepthwiseSeparableConv):
    """timm ``DepthwiseSeparableConv`` with ``conv_dw`` -> ``bn1`` fused."""

    _bn_name = "bn1"
    fastdw_base = DepthwiseSeparableConv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self._dw(x)
        x = self.se(self.aa(x))
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class FusedInvertedResidual(_FusedBlock, InvertedResidual):
    """timm ``InvertedResidual`` with ``conv_dw`` -> ``bn2`` fused."""

    _bn_name = "bn2"
    fastdw_base = InvertedResidual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.bn1(self.conv_pw(x))
        x = self._dw(x)
        x = self.se(self.aa(x))
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x
