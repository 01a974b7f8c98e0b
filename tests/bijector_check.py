"""Shared bijector checks: invertibility and log-det against the autograd Jacobian.

Usage: ``check_bijector(transform, x)`` with ``x`` of shape ``(batch, D)`` (flat), ideally in
float64. Works for any object with ``forward_and_log_det`` / ``inverse_and_log_det``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_bijector"]


def _diff(a: torch.Tensor, b: torch.Tensor, periodic: Sequence[int]) -> torch.Tensor:
    d = a - b
    if periodic:
        idx = list(periodic)
        d[:, idx] = torch.remainder(d[:, idx] + math.pi, 2 * math.pi) - math.pi
    return d.abs()


def _jac_logdet(fn, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        c = None if context is None else context[i : i + 1]

        def f(v, c=c):
            return fn(v[None], c)[0][0]

        try:
            jac = torch.autograd.functional.jacobian(f, x[i], vectorize=True)
        except RuntimeError:  # an op without a batching rule: row by row
            jac = torch.autograd.functional.jacobian(f, x[i])
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def check_bijector(
    transform,
    x: torch.Tensor,
    context: torch.Tensor | None = None,
    atol: float | None = None,
    periodic: Sequence[int] = (),
    n_jacobian: int = 4,
) -> None:
    """Assert that ``transform`` is a bijection with correct log-dets, both directions.

    ``x`` ``(batch, D)`` is used as a latent for the forward map and as data for the inverse.
    Checks: shapes and dtypes; ``inverse(forward(x)) == x`` and ``forward(inverse(x)) == x``;
    ``log_det_forward(x) + log_det_inverse(forward(x)) == 0``; each log-det equals
    ``log|det J|`` of the autograd Jacobian on the first ``n_jacobian`` rows.

    Args:
        transform: The bijector.
        x: Points ``(batch, D)`` in the domain (and codomain) of the transform.
        context: Optional context ``(batch, C)``.
        atol: Tolerance; default 1e-10 (float64) / 1e-5 (float32); Jacobians use 1e3 * atol
            in float32 and 1e-8 in float64.
        periodic: Dims compared modulo 2 pi (angles that may wrap at +-pi).
        n_jacobian: Rows checked against the autograd Jacobian.
    """
    if atol is None:
        atol = 1e-10 if x.dtype == torch.float64 else 1e-5
    jac_atol = 1e-8 if x.dtype == torch.float64 else 1e-3
    y, ld_f = transform.forward_and_log_det(x, context)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ld_f.shape == (x.shape[0],) and ld_f.dtype == x.dtype
    xr, ld_i = transform.inverse_and_log_det(y, context)
    assert torch.isfinite(y).all() and torch.isfinite(ld_f).all()
    err = _diff(xr, x, periodic).max().item()
    assert err < atol, f"inverse(forward(x)) != x: max error {err:.3g}"
    err = (ld_f + ld_i).abs().max().item()
    assert err < atol * 10, f"forward and inverse log-dets do not cancel: {err:.3g}"
    z, ld_inv = transform.inverse_and_log_det(x, context)
    assert ld_inv.shape == (x.shape[0],)
    xr2, ld_f2 = transform.forward_and_log_det(z, context)
    err = _diff(xr2, x, periodic).max().item()
    assert err < atol, f"forward(inverse(x)) != x: max error {err:.3g}"
    n = min(n_jacobian, x.shape[0])
    c = None if context is None else context[:n]
    ref_f = _jac_logdet(transform.forward_and_log_det, x[:n].detach(), c)
    err = (ref_f - ld_f[:n]).abs().max().item()
    assert err < jac_atol, f"forward log-det differs from autograd: {err:.3g}"
    ref_i = _jac_logdet(transform.inverse_and_log_det, x[:n].detach(), c)
    err = (ref_i - ld_inv[:n]).abs().max().item()
    assert err < jac_atol, f"inverse log-det differs from autograd: {err:.3g}"
