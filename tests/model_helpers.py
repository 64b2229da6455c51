"""Helpers for the whole-model tests: realistic BatchNorm statistics, twin comparisons."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def calibrate(model: nn.Module, shape: tuple[int, ...], batches: int = 3, seed: int = 0) -> nn.Module:
    """A few training-mode batches of random data, so running statistics (and activations in eval
    mode) have a realistic scale; leaves the model in eval mode."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    return model.eval()


def rand_input(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
               seed: int = 1) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_same_state(a: nn.Module | dict, b: nn.Module | dict, *, exact: bool = True, tol: float = 0.0,
                      what: str = "") -> None:
    """Same keys in the same order, same shapes and dtypes; values equal (or within ``tol``, relative
    to each tensor's largest magnitude)."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    assert list(sa) == list(sb), f"{what}: state_dict keys differ"
    for k in sa:
        x, y = sa[k], sb[k]
        assert (x.shape, x.dtype) == (y.shape, y.dtype), f"{what}: {k}: {x.shape, x.dtype, y.shape, y.dtype}"
        if exact or not x.dtype.is_floating_point:
            assert torch.equal(x, y), f"{what}: {k} differs"
        else:
            scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=f"{what}: {k}")


def flat_outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_outputs_close(got, expected, tol: float, what: str = "") -> None:
    for i, (g, e) in enumerate(zip(flat_outputs(got), flat_outputs(expected), strict=True)):
        assert g.shape == e.shape, f"{what} output {i}: {tuple(g.shape)} vs {tuple(e.shape)}"
        g, e = g.detach(), e.detach()
        scale = float(e.abs().max())
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * max(scale, 1e-30), msg=f"{what} output {i}")


def loss_of(out) -> torch.Tensor:
    """A loss that weighs every output element differently (so no gradient is trivially symmetric)."""
    total = 0.0
    for t in flat_outputs(out):
        w = torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype).reshape(t.shape)
        total = total + (t * w).sum() + 0.5 * t.square().mean()
    return total


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, scale: float, what: str,
                  norm: bool) -> None:
    """Elementwise (rtol = atol / scale = tol), or with ``norm`` the whole tensor: ||a - e|| <= tol *
    max(||e||, 1e-2 * scale * sqrt(numel)) (tensors that are ~0 in exact arithmetic hold only noise)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not norm:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=what)
        return
    err = float((actual - expected).norm())
    ref = max(float(expected.norm()), 1e-2 * scale * expected.numel() ** 0.5)
    assert err <= tol * ref, f"{what}: relative error {err / ref:.2e} > {tol:.0e}"


def assert_same_training_step(model: nn.Module, reference: nn.Module, x: torch.Tensor, tol: float,
                              what: str = "",
                              reference_context: Callable[[], object] = contextlib.nullcontext,
                              norm: bool = False) -> None:
    """One training step of deep copies of both (same dropout masks): same loss, same gradient of every
    parameter (tolerance relative to the largest gradient of the model: gradients that are exactly zero
    in exact arithmetic, such as a BatchNorm bias feeding another BatchNorm, carry only rounding noise),
    same input gradient, same running statistics afterwards. ``reference`` runs inside
    ``reference_context()``. Each model gets ``x`` in its own dtype, so a float64 reference can judge a
    float32 model; ``norm=True`` compares whole tensors (see ``_assert_close``), the right measure then."""
    model, reference = copy.deepcopy(model).train(), copy.deepcopy(reference).train()
    xs = [x.detach().to(next(m.parameters()).dtype).clone(memory_format=torch.preserve_format)
          for m in (model, reference)]
    xs = [xi.requires_grad_() for xi in xs]
    losses = []
    contexts = (contextlib.nullcontext, reference_context)
    for m, xi, context in zip((model, reference), xs, contexts, strict=True):
        torch.manual_seed(1234)  # dropout / stochastic depth draw the same masks
        with context():
            loss = loss_of(m(xi))
            loss.backward()
        losses.append(loss)
    _assert_close(losses[0], losses[1], tol, 1.0, f"{what}: loss", norm=False)
    gx, rx = xs[0].grad, xs[1].grad
    _assert_close(gx, rx, tol, float(rx.abs().max()), f"{what}: input grad", norm)
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert list(params) == list(ref_params), f"{what}: parameter names differ"
    gscale = max(float(p.grad.abs().max()) for p in ref_params.values() if p.grad is not None)
    for k, p in ref_params.items():
        q = params[k]
        assert (p.grad is None) == (q.grad is None), f"{what}: grad of {k} missing on one side"
        if p.grad is not None:
            _assert_close(q.grad, p.grad, tol, gscale, f"{what}: grad {k}", norm)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(ref_state), f"{what}: state_dict keys differ"
    for k, v in ref_state.items():
        if v.dtype.is_floating_point:
            scale = max(1.0, float(v.abs().max()))
            _assert_close(state[k], v, tol, scale, f"{what}: {k} after the step", norm)
        else:
            assert torch.equal(state[k], v), f"{what}: {k} after the step"
