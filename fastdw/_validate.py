"""The one place where fastdw checks its inputs, so every backend raises the same clear errors.

Errors name the argument. Everything is checked before any kernel runs or any buffer is touched,
so a failed call never leaves parameters or running statistics half-updated.

The C++ ops check the same things (csrc/common/checks.h). ``DWConvBNAct`` in eval mode and
``SqueezeExcite`` call them directly on the cpu / cuda backends, without these checks: a call the
op rejects is repeated through ``fastdw.ops``, so the error raised is still the one from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ACTIVATIONS = ("relu", "relu6", "hardswish", "silu", "none")


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> a pair of Python ints."""
    tv = type(value)
    if tv is int:
        return (value, value)
    if (tv is tuple or tv is list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return (value[0], value[1])
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def floating_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def same_device_dtype(ref: torch.Tensor, t: torch.Tensor | None, name: str, *, dtype: bool = True) -> None:
    if t is None:
        return
    floating_tensor(t, name)
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device} but the input is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input has dtype {ref.dtype}")


def per_channel(ref: torch.Tensor, t: torch.Tensor | None, name: str, channels: int) -> None:
    """A per-channel vector (BN parameter or statistic): 1-D of length C, same device."""
    if t is None:
        return
    if isinstance(t, torch.Tensor) and t.device == ref.device and t.dtype.is_floating_point \
            and t.dim() == 1 and t.shape[0] == channels:
        return  # the common case, checked cheaply (this runs on every call)
    same_device_dtype(ref, t, name, dtype=False)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}], got {list(t.shape)}")


def activation(name) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def conv_geometry(x, weight, stride, padding, dilation):
    """Checks of a depthwise conv; returns ((sh, sw), (ph, pw), (dh, dw), (Ho, Wo))."""
    floating_tensor(x, "input")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    same_device_dtype(x, weight, "weight")
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(
            f"weight must have shape [C, 1, kh, kw] with C = {c} input channels, got {list(weight.shape)}"
        )
    kh, kw = weight.shape[2], weight.shape[3]
    if kh < 1 or kw < 1:
        raise ValueError(f"weight must have a kernel size of at least 1, got {list(weight.shape)}")
    s = pair(stride, "stride")
    d = pair(dilation, "dilation")
    p = ((kh // 2) * d[0], (kw // 2) * d[1]) if padding is None else pair(padding, "padding")
    if min(s) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(d) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if min(p) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    h, w = x.shape[2], x.shape[3]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input spatial size {h}x{w} is too small for kernel {kh}x{kw} with dilation {d} and "
            f"padding {p}: the output would be {ho}x{wo}"
        )
    return s, p, d, (ho, wo)


# --- Squeeze-and-Excitation and channel shuffle ------------------------------------------------

SE_ACTIVATIONS = ("relu", "silu")
SE_GATES = ("hardsigmoid", "sigmoid")


def se_activation(name) -> str:
    if not isinstance(name, str) or name not in SE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {SE_ACTIVATIONS}, got {name!r}")
    return name


def se_gate(name) -> str:
    if not isinstance(name, str) or name not in SE_GATES:
        raise ValueError(f"gate must be one of {SE_GATES}, got {name!r}")
    return name


def batched_channels(x, name: str = "input") -> int:
    """A floating-point tensor [N, C, *] with at least 3 dimensions; returns C."""
    floating_tensor(x, name)
    if x.dim() < 3:
        raise ValueError(f"{name} must have at least 3 dimensions [N, C, *], got {x.dim()}-D "
                         f"with shape {list(x.shape)}")
    return x.shape[1]


def groups_dividing(groups, channels: int) -> int:
    """``groups`` of a channel shuffle: an int >= 1 that divides the channel count."""
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if channels % groups:
        raise ValueError(f"groups ({groups}) must divide the number of channels ({channels})")
    return groups


def fc_weight(ref: torch.Tensor, w, name: str, rows: int | None, cols: int) -> int:
    """A 1x1 conv weight [rows, cols, 1, 1] (or a Linear weight [rows, cols]); returns rows."""
    if w is None:
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    same_device_dtype(ref, w, name)
    r = w.shape[0] if w.dim() in (2, 4) else -1
    ok = w.dim() in (2, 4) and (rows is None or r == rows) and w.shape[1] == cols and w.shape[2:].numel() == 1
    if not ok:
        want = f"[{'S' if rows is None else rows}, {cols}, 1, 1]"
        raise ValueError(f"{name} must have shape {want}, got {list(w.shape)}")
    return r


def vector(ref: torch.Tensor, t, name: str, length: int) -> None:
    """An optional 1-D tensor of the input's device and dtype."""
    if t is None:
        return
    same_device_dtype(ref, t, name)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(t.shape)}")
