"""Monotonic rational-quadratic splines over bounded, unbounded and circular domains.

The maths follows Durkan et al., "Neural Spline Flows" (NeurIPS 2019), with the circular
variant of Rezende et al., "Normalizing Flows on Tori and Spheres" (ICML 2020): a spline on
[-pi, pi] whose derivatives at both ends are equal is a smooth bijection of the circle.

Three layers of functionality, each usable alone:

1. `rqs_forward` / `rqs_inverse`: evaluate a spline from explicit knots ``(x_k, y_k)`` and knot
   derivatives ``d_k`` (all ``(..., K + 1)``), returning the value and ``log|dy/dx|``.
2. `rqs_knots`: the parametrisation, unconstrained ``(..., 3K + 1)`` -> knots, with softmax widths
   and heights, softplus derivatives and minimum bin sizes; per-dimension domain rules fix the
   end derivatives (1 for unbounded dims, equal for circular dims). Zero parameters give the
   identity.
3. `DomainSpline`: per-dimension domain bookkeeping for a ``(batch, D)`` vector in which each
   dimension is unbounded (spline on [-B, B], identity outside), bounded ([a, b] -> [a, b]) or
   circular ([-pi, pi) -> [-pi, pi)). All dimensions are evaluated in one batched call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boltzgen.flows.base import Bounded, Circular, Domain, Unbounded, wrap_circular

__all__ = [
    "DomainSpline",
    "rqs_forward",
    "rqs_inverse",
    "rqs_knots",
]


def _clamp(v: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Clamp to per-dimension bounds with a pass-through gradient (cheap backward)."""
    vd = v.detach()
    return vd.clamp(low, high) + (v - vd)  # v - vd is exactly 0: the value is the clamp


def _bin_params(v: Tensor, xk: Tensor, yk: Tensor, dk: Tensor, on_y: bool) -> tuple[Tensor, ...]:
    """Gather the bin of each ``v`` (searched in ``yk`` if ``on_y`` else ``xk``)."""
    knots = yk if on_y else xk
    n_bins = knots.shape[-1] - 1
    # Number of interior knots <= v; for small K this beats torch.searchsorted.
    idx = (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)
    idx2 = torch.cat([idx, idx + 1], dim=-1)
    shape = (*v.shape, n_bins + 1)
    x0, x1 = xk.expand(shape).gather(-1, idx2).unbind(-1)
    y0, y1 = yk.expand(shape).gather(-1, idx2).unbind(-1)
    d0, d1 = dk.expand(shape).gather(-1, idx2).unbind(-1)
    return x0, x1, y0, y1, d0, d1


def rqs_forward(x: Tensor, xk: Tensor, yk: Tensor, dk: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate a monotonic rational-quadratic spline.

    Args:
        x: Inputs, shape ``(...)``, inside ``[xk[..., 0], xk[..., -1]]`` (values outside are
            evaluated with the first / last bin's formula; clamp beforehand).
        xk: Knot abscissae, strictly increasing, shape ``(..., K + 1)``.
        yk: Knot ordinates, strictly increasing, shape ``(..., K + 1)``.
        dk: Positive knot derivatives, shape ``(..., K + 1)``.

    Returns:
        ``(y, log|dy/dx|)``, both shaped like ``x``.
    """
    x0, x1, y0, y1, d0, d1 = _bin_params(x, xk, yk, dk, on_y=False)
    w = x1 - x0
    h = y1 - y0
    s = h / w
    t = ((x - x0) / w).clamp(0.0, 1.0)
    t2 = t * t
    t1t = t - t2
    den = s + (d0 + d1 - 2.0 * s) * t1t
    y = y0 + h * (s * t2 + d0 * t1t) / den
    num = d1 * t2 + 2.0 * s * t1t + d0 * (1.0 - t) ** 2
    log_det = torch.log(s * s * num / (den * den))
    return y, log_det


def rqs_inverse(y: Tensor, xk: Tensor, yk: Tensor, dk: Tensor) -> tuple[Tensor, Tensor]:
    """Invert a monotonic rational-quadratic spline.

    Args:
        y: Outputs, shape ``(...)``, inside ``[yk[..., 0], yk[..., -1]]``.
        xk, yk, dk: Knots and derivatives as in `rqs_forward`.

    Returns:
        ``(x, log|dx/dy|)``, both shaped like ``y``.
    """
    x0, x1, y0, y1, d0, d1 = _bin_params(y, xk, yk, dk, on_y=True)
    w = x1 - x0
    h = y1 - y0
    s = h / w
    dy = y - y0
    c2 = d0 + d1 - 2.0 * s
    dyc2 = dy * c2
    a = h * (s - d0) + dyc2
    b = h * d0 - dyc2
    sdy = s * dy
    disc = (b * b + 4.0 * a * sdy).clamp(min=0.0)
    t = (2.0 * sdy) / (b + torch.sqrt(disc))  # root of a t^2 + b t - s dy = 0 in [0, 1]
    t = t.clamp(0.0, 1.0)
    x = x0 + t * w
    t2 = t * t
    t1t = t - t2
    den = s + c2 * t1t
    num = d1 * t2 + 2.0 * s * t1t + d0 * (1.0 - t) ** 2
    log_det = torch.log(den * den / (s * s * num))
    return x, log_det


def rqs_knots(
    params: Tensor,
    low: Tensor,
    high: Tensor,
    unit_ends: Tensor | None = None,
    periodic: Tensor | None = None,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Turn unconstrained spline parameters into knots on ``[low, high]^2``.

    Args:
        params: ``(..., D, 3K + 1)``: K width logits, K height logits, K + 1 derivative
            pre-activations. All zeros give the identity map.
        low, high: Interval of each dimension, shape ``(D,)``; the spline maps it onto itself.
        unit_ends: Bool ``(D,)``; where true the end derivatives are 1 (linear identity tails).
        periodic: Bool ``(D,)``; where true the last derivative equals the first (circle).
        min_bin_width, min_bin_height: Minimal bin size as a fraction of the interval.
        min_derivative: Lower bound of the knot derivatives.

    Returns:
        ``(xk, yk, dk)``, each ``(..., D, K + 1)``.
    """
    n_bins = (params.shape[-1] - 1) // 3
    if min_bin_width * n_bins >= 1.0 or min_bin_height * n_bins >= 1.0:
        raise ValueError("minimal bin size too large for the number of bins")
    dt, dev = params.dtype, params.device
    # Widths and heights together: (..., D, 2, K); softmax and cumulative sum in one pass,
    # normalised by the last cumulative sum so that the end knot is exact.
    wh = params[..., : 2 * n_bins].unflatten(-1, (2, n_bins))
    min_size = torch.tensor([[min_bin_width], [min_bin_height]], dtype=dt, device=dev)
    offset = min_size * torch.arange(n_bins + 1, dtype=dt, device=dev)  # (2, K + 1)
    e = torch.exp(wh - wh.detach().amax(-1, keepdim=True))
    cs = F.pad(e.cumsum(-1), (1, 0))
    # knots = low + span * (offset + (1 - K min_size) * cs / cs[-1]), as one fused addcmul.
    span = (high - low)[:, None, None]
    base = low[:, None, None] + span * offset  # (D, 2, K + 1)
    scale = span * (1.0 - min_size * n_bins) / cs[..., -1:]
    xk, yk = torch.addcmul(base, scale, cs).unbind(-2)

    shift = math.log(math.expm1(1.0 - min_derivative))  # softplus(shift) + min_d = 1
    dk = min_derivative + F.softplus(params[..., 2 * n_bins :] + shift)
    n_dim = params.shape[-2]
    if periodic is not None:
        last = torch.zeros(n_dim, n_bins + 1, dtype=torch.bool, device=dev)
        last[:, -1] = periodic
        dk = torch.where(last, dk[..., :1], dk)
    if unit_ends is not None:
        ends = torch.zeros(n_dim, n_bins + 1, dtype=torch.bool, device=dev)
        ends[:, 0] = unit_ends
        ends[:, -1] = unit_ends
        dk = torch.where(ends, 1.0, dk)
    return xk, yk, dk


class DomainSpline(nn.Module):
    """Element-wise spline over a vector of mixed domains, evaluated in one batched call.

    Dimension ``i`` is transformed on its domain: `Unbounded` -> spline on [-B, B] with
    identity outside (end derivatives 1); `Bounded(a, b)` -> spline on [a, b] (inputs beyond
    the bounds are clamped to them); `Circular` -> spline on [-pi, pi] with equal end
    derivatives, inputs and outputs wrapped to [-pi, pi).

    Args:
        domains: One domain per transformed dimension (length D).
        n_bins: Number of spline bins K.
        tail_bound: B for unbounded dimensions.
        min_bin_width, min_bin_height, min_derivative: See `rqs_knots`.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        n_bins: int = 8,
        tail_bound: float = 5.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        low, high, unb, circ = [], [], [], []
        for d in domains:
            if isinstance(d, Unbounded):
                low.append(-tail_bound), high.append(tail_bound), unb.append(True)
                circ.append(False)
            elif isinstance(d, Bounded):
                low.append(d.low), high.append(d.high), unb.append(False), circ.append(False)
            elif isinstance(d, Circular):
                low.append(-math.pi), high.append(math.pi), unb.append(False), circ.append(True)
            else:
                raise TypeError(f"unknown domain {d!r}")
        self.n_bins = n_bins
        self.dim = len(domains)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        # Bounds are exact in every dtype (float32 pi must not leak into float64 use), so they
        # are kept as Python floats and materialised per (dtype, device) on first use.
        self._low, self._high = low, high
        self._bounds_cache: dict = {}
        self.register_buffer("unbounded", torch.tensor(unb, dtype=torch.bool))
        self.register_buffer("circular", torch.tensor(circ, dtype=torch.bool))
        self.any_unbounded = any(unb)
        self.any_bounded = not all(u or c for u, c in zip(unb, circ))
        self.any_circular = any(circ)

    @property
    def n_params(self) -> int:
        """Number of unconstrained parameters per dimension, 3K + 1."""
        return 3 * self.n_bins + 1

    def bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(low, high)`` of the spline intervals, ``(D,)`` each, in ``like``'s dtype/device."""
        key = (like.dtype, like.device)
        if key not in self._bounds_cache:
            self._bounds_cache[key] = (
                torch.tensor(self._low, dtype=like.dtype, device=like.device),
                torch.tensor(self._high, dtype=like.dtype, device=like.device),
            )
        return self._bounds_cache[key]

    def knots(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Knots for parameters ``(..., D, 3K + 1)``; see `rqs_knots`."""
        low, high = self.bounds(params)
        return rqs_knots(
            params,
            low,
            high,
            self.unbounded if self.any_unbounded else None,
            self.circular if self.any_circular else None,
            self.min_bin_width,
            self.min_bin_height,
            self.min_derivative,
        )

    def _prepare(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.any_circular:
            v = wrap_circular(v, self.circular)
        vc = _clamp(v, *self.bounds(v))
        outside = (vc != v) & self.unbounded if self.any_unbounded else None
        return v, vc, outside

    def _finish(self, v: Tensor, out: Tensor, ld: Tensor, outside: Tensor | None) -> tuple:
        if self.any_bounded:  # round-off in the knots must not leave the interval
            out = _clamp(out, *self.bounds(v))
        if outside is not None:
            out = torch.where(outside, v, out)
            ld = ld.masked_fill(outside, 0.0)
        if self.any_circular:
            out = wrap_circular(out, self.circular)
        return out, ld

    def forward_and_log_det(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Forward map of ``x`` ``(batch, D)`` with ``params`` ``(batch or 1, D, 3K + 1)``.

        Returns ``(y, log|dy/dx|)`` with the log-det per element, ``(batch, D)``.
        """
        xk, yk, dk = self.knots(params)
        x, xc, outside = self._prepare(x)
        y, ld = rqs_forward(xc, xk, yk, dk)
        return self._finish(x, y, ld, outside)

    def inverse_and_log_det(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse map; returns ``(x, log|dx/dy|)`` per element, ``(batch, D)``."""
        xk, yk, dk = self.knots(params)
        y, yc, outside = self._prepare(y)
        x, ld = rqs_inverse(yc, xk, yk, dk)
        return self._finish(y, x, ld, outside)
