"""``FusedSequential``: an ``nn.Sequential`` whose conv -> BatchNorm -> activation runs are fused.

Flat Sequentials such as torchvision's MNASNet layers or ShuffleNetV2 branches hold a depthwise
conv, its BatchNorm and its activation as three siblings among others; wrapping them in a
``DWConvBNAct`` would add a level to the ``state_dict`` keys. ``FusedSequential`` keeps every child
where it is and only changes ``forward``, so checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdw.nn.dwconv_bn_act import DWConvBNAct, activation_name

_INPLACE_ACTS = {
    "relu": torch.relu_,
    "relu6": lambda y: F.hardtanh_(y, 0.0, 6.0),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "silu": lambda y: F.silu(y, inplace=True),
}
_ACTS = {"relu": torch.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}


def _act_name(module: nn.Module) -> str | None:
    """The fused name of an activation module, or None if it is not one fastdw fuses."""
    try:
        name = activation_name(module)
    except ValueError:
        return None
    return None if name == "none" and type(module) is not nn.Identity else name


def is_depthwise(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` with one filter per channel (groups == in == out channels)."""
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.groups > 1)


def fuse_dwconv_bn_act(conv: nn.Module, bn: nn.Module,
                       act: nn.Module | None = None) -> DWConvBNAct | str:
    """A ``DWConvBNAct`` sharing ``conv``, ``bn`` and ``act``, or the reason they cannot be fused."""
    if not is_depthwise(conv):
        return f"{type(conv).__name__} is not a depthwise nn.Conv2d"
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__name__} after the depthwise conv is not a plain nn.BatchNorm2d"
    try:
        return DWConvBNAct.from_modules(conv, bn, act)
    except (TypeError, ValueError) as e:
        return str(e)


def match_dwconv_bn_act(children: Sequence[nn.Module], i: int) -> tuple[DWConvBNAct, int] | None:
    """If ``children[i:]`` starts with depthwise Conv2d -> BatchNorm2d (-> activation), the fused
    module sharing them and how many children it covers (2 or 3)."""
    if i + 1 >= len(children) or not is_depthwise(children[i]):
        return None
    act = children[i + 2] if i + 2 < len(children) else None
    if act is not None and _act_name(act) is not None:
        fused = fuse_dwconv_bn_act(children[i], children[i + 1], act)
        if isinstance(fused, DWConvBNAct):
            return fused, 3
    fused = fuse_dwconv_bn_act(children[i], children[i + 1])
    return (fused, 2) if isinstance(fused, DWConvBNAct) else None


# oneDNN's fused conv + bias + activation (the op torch.compile's CPU backend calls): one pass over
# the output instead of three (conv, BN, activation) in eager PyTorch. Used without autograd for
# float32 channels_last inputs only, where it beats conv2d + in-place activation; probed once.
_ONEDNN_ATTRS = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), "hardswish": ("hardswish", []),
                 "silu": ("swish", []), "none": ("none", [])}
_onednn_ok: bool | None = None


def _onednn_usable() -> bool:
    global _onednn_ok
    if _onednn_ok is None:
        try:
            x = torch.ones(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)
            w = torch.ones(2, 2, 1, 1).contiguous(memory_format=torch.channels_last)
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, torch.zeros(2), [0, 0], [1, 1], [1, 1], 1,
                                                        "relu", [], "")
            _onednn_ok = bool(torch.equal(y, torch.full_like(y, 2.0)))
        except Exception:  # not built with oneDNN, or the private op changed: plain conv2d then
            _onednn_ok = False
    return _onednn_ok


def _channels_last_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as a dense channels_last tensor if it is laid out channels-innermost (channels_last, or
    a channel slice of it, as ShuffleNetV2's split halves); None for NCHW and ambiguous layouts."""
    if x.dim() != 4 or x.stride(1) != 1 or x.shape[1] == 1 or x.shape[2] * x.shape[3] == 1:
        return None
    return x.contiguous(memory_format=torch.channels_last)


class _FoldedConvBN:
    """Conv2d -> BatchNorm2d (-> activation) with, in eval mode, the BatchNorm folded into the conv.

    Not a module (the parent owns the children); in training mode, or when the statistics cannot
    be folded, it runs the children one after the other. Without autograd the folded weight and
    bias (and oneDNN's packed weight) are cached until a parameter or statistic changes (tensor
    version counters); with autograd they are recomputed, differentiably, on every call.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None, act_name: str) -> None:
        self.conv, self.bn, self.act, self.act_name = conv, bn, act, act_name
        self._attr = _ONEDNN_ATTRS[act_name]
        self._key: tuple | None = None
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._packed: torch.Tensor | None = None
        self._pointwise = False
        self._args: tuple = ()

    def _tensors(self) -> list[torch.Tensor | None]:
        # the modules' dicts directly: nn.Module.__getattr__ costs ~0.4 us per lookup, every call
        cp, bp, bb = self.conv._parameters, self.bn._parameters, self.bn._buffers
        return [cp["weight"], cp.get("bias"), bp.get("weight"), bp.get("bias"), bb.get("running_mean"),
                bb.get("running_var")]

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        w = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        b = shift * scale
        if bn.bias is not None:
            b = b + bn.bias
        return w, b.to(conv.weight.dtype)

    def _cached_fold(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        w, cb, g, beta, mean, var = self._tensors()
        try:  # identities and version counters of everything the fold reads
            key = (id(w), w._version, id(mean), mean._version, id(var), var._version,
                   None if cb is None else (id(cb), cb._version), None if g is None else (id(g), g._version),
                   None if beta is None else (id(beta), beta._version))
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        if key != self._key or self._folded is None:
            self._folded, self._packed, self._key = self._fold(), None, key
        return self._folded

    def _onednn(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """conv + bias + activation in one oneDNN op, or None where it does not apply.

        A 1x1 conv (stride 1, no padding, one group) on a channels_last tensor is a matrix product
        of the [N*H*W, C_in] view: oneDNN's linear with the same fused activation, ~8 us less
        fixed cost per call than its conv (measured at 16 -> 32 channels, 4x4, and 160 -> 960, 7x7)."""
        if not (x.dtype == torch.float32 and x.device.type == "cpu" and _onednn_usable()):
            return None
        x = _channels_last_view(x)
        if x is None:
            return None
        conv = self.conv
        if self._packed is None:
            if not isinstance(conv.padding, tuple):  # "same" / "valid"
                return None
            self._args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            self._pointwise = (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
                               and conv.groups == 1)
            if self._pointwise:
                m = x.shape[0] * x.shape[2] * x.shape[3]  # a size hint: any other works too
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.reshape(w.shape[0], -1), m)
            else:
                w = w.contiguous(memory_format=torch.channels_last)
                self._packed = torch.ops.mkldnn._reorder_convolution_weight(w, *self._args, list(x.shape))
        if self._pointwise:
            n, c, h, wd = x.shape
            rows = x.permute(0, 2, 3, 1).view(n * h * wd, c)
            y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, b, *self._attr, "")
            return y.view(n, h, wd, -1).permute(0, 3, 1, 2)
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed, b, *self._args, *self._attr, "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        bb = bn._buffers
        if bn.training or bb.get("running_mean") is None or bb.get("running_var") is None:
            x = bn(conv(x))
            return x if self.act is None else self.act(x)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            t is not None and t.requires_grad for t in self._tensors()))
        folded = None if grad else self._cached_fold()
        if folded is not None:
            y = self._onednn(x, *folded)
            if y is not None:
                return y
        w, b = folded if folded is not None else self._fold()
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        if self.act_name == "none":
            return y
        return (_ACTS if grad else _INPLACE_ACTS)[self.act_name](y)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and type(bn) is nn.BatchNorm2d
            and bn.num_features == conv.out_channels)


def plan(children: Sequence[nn.Module], fold_bn: bool = True) -> list[tuple[int, Callable]]:
    """``(index of the first child covered, callable)`` pairs that ``FusedSequential`` runs in turn."""
    steps: list[tuple[int, Callable]] = []
    i = 0
    while i < len(children):
        match = match_dwconv_bn_act(children, i)
        if match is not None:
            steps.append((i, match[0].forward))  # hidden module: no hooks of its own to run
            i += match[1]
            continue
        if fold_bn and i + 1 < len(children) and _foldable(children[i], children[i + 1]):
            act = children[i + 2] if i + 2 < len(children) else None
            name = _act_name(act) if act is not None else None
            folded = _FoldedConvBN(children[i], children[i + 1], act if name else None, name or "none")
            steps.append((i, folded))
            i += 3 if name else 2
            continue
        steps.append((i, children[i]))
        i += 1
    return steps


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` that runs its conv -> BatchNorm2d -> activation runs fused.

    The children are the same modules at the same indices, so the ``state_dict`` (keys, order,
    values) is exactly that of the plain ``nn.Sequential``. Only ``forward`` differs:

    * a depthwise ``Conv2d`` -> ``BatchNorm2d`` (-> ReLU / ReLU6 / Hardswish / SiLU / Identity)
      runs as one ``fastdw.nn.DWConvBNAct`` sharing those children, in training and eval mode;
    * with ``fold_bn=True``, in eval mode, any other ``Conv2d`` -> ``BatchNorm2d`` (-> activation)
      runs as one conv with the BatchNorm folded into its weight and bias, then the activation in
      place (training mode runs the children as they are).

    Outputs equal the plain Sequential's up to float rounding. Forward hooks of the fused
    children do not fire. The plan is rebuilt when a child is replaced.
    """

    def __init__(self, *args: nn.Module, fold_bn: bool = True) -> None:
        super().__init__(*args)
        self.fold_bn = fold_bn

    def _steps(self) -> list[tuple[int, Callable]]:
        key = (*map(id, self._modules.values()), self.fold_bn)
        cached = self.__dict__.get("_fastdw_plan")
        if cached is None or cached[0] != key:
            cached = (key, plan(list(self._modules.values()), self.fold_bn))
            self.__dict__["_fastdw_plan"] = cached  # not a child: keeps the state_dict unchanged
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self._steps():
            x = step(x)
        return x

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run children ``start:`` on ``x`` (fused as in ``forward``), e.g. after running child
        ``start - 1`` by hand to keep its output. ``start`` must not split a fused run."""
        steps = self._steps()
        if start not in {i for i, _ in steps} | {len(self)}:
            raise ValueError(f"child {start} is inside a fused run; cannot start there")
        for i, step in steps:
            if i >= start:
                x = step(x)
        return x

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_fastdw_plan", None)  # rebuilt on first use, over the copied children
        return state

    def extra_repr(self) -> str:
        return "" if self.fold_bn else "fold_bn=False"
