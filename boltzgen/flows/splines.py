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

import ctypes
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boltzgen import native
from boltzgen.flows.base import Bounded, Circular, Domain, Unbounded, wrap_circular

__all__ = [
    "DomainSpline",
    "is_lane_major",
    "lane_major_params",
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

    def _consts(self, like: Tensor) -> dict:
        """Constants of the fused evaluation, built once per (dtype, device)."""
        key = ("fused", like.dtype, like.device)
        c = self._bounds_cache.get(key)
        if c is None:
            c = _fused_consts(self, like)
            self._bounds_cache[key] = c
        return c

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

    def reference_forward_and_log_det(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """`forward_and_log_det` composed of plain autograd operations (full knots by
        `rqs_knots`, then `rqs_forward`): the definition the fused evaluation reproduces, and
        the path of its higher-order derivatives."""
        xk, yk, dk = self.knots(params)
        x, xc, outside = self._prepare(x)
        y, ld = rqs_forward(xc, xk, yk, dk)
        return self._finish(x, y, ld, outside)

    def reference_inverse_and_log_det(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """`inverse_and_log_det` composed of plain autograd operations (see
        `reference_forward_and_log_det`)."""
        xk, yk, dk = self.knots(params)
        y, yc, outside = self._prepare(y)
        x, ld = rqs_inverse(yc, xk, yk, dk)
        return self._finish(y, x, ld, outside)

    def prefers_lane_major(self, v: Tensor) -> bool:
        """Whether per-sample parameters for inputs like ``v`` ``(batch, D)`` are best made
        lane-major (`lane_major_params`): true where the compiled kernels evaluate the spline,
        which then read them without a transpose (any layout gives the same result)."""
        return (
            v.dim() == 2
            and v.shape[0] > 1
            and not torch.compiler.is_compiling()
            and _native_applies_to(self, v)
        )

    def forward_and_log_det(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Forward map of ``x`` ``(batch, D)`` with ``params`` ``(batch or 1, D, 3K + 1)``.

        Returns ``(y, log|dy/dx|)`` with the log-det per element, ``(batch, D)``.
        Eager calls run the fused evaluation; under `torch.compile` the reference composition
        is traced (the compiler fuses it).
        """
        if torch.compiler.is_compiling():
            return self.reference_forward_and_log_det(x, params)
        if _native_applies(self, x, params):
            return _NativeSpline.apply(x, params, self, False)
        return _FusedSpline.apply(x, params, self, False)

    def inverse_and_log_det(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse map; returns ``(x, log|dx/dy|)`` per element, ``(batch, D)``."""
        if torch.compiler.is_compiling():
            return self.reference_inverse_and_log_det(y, params)
        if _native_applies(self, y, params):
            return _NativeSpline.apply(y, params, self, True)
        return _FusedSpline.apply(y, params, self, True)


# ----------------------------------------------------------------------------- fused evaluation
#
# `DomainSpline` evaluates through `_FusedSpline`: the forward pass computes exactly the
# reference formulas (`rqs_knots`, `rqs_forward` / `rqs_inverse`, the domain rules) without
# recording a graph, with the bin of each element fetched by one `take` from a flat table of
# knots and raw derivatives; the backward pass is the analytic gradient in a few dozen fused
# tensor operations. Higher derivatives (create_graph=True, e.g. SNF layers that train
# through gradients of log q) differentiate the reference composition instead, so they are
# exact to any order.


def _fused_consts(sp: DomainSpline, like: Tensor) -> dict:
    """Per (dtype, device) constants of `_FusedSpline`: knot templates, index offsets, masks,
    and 0-dim scalars (a Python number in an operation costs a conversion of its own)."""
    dt, dev = like.dtype, like.device
    k, n, dim = sp.n_bins, sp.n_bins + 1, sp.dim
    low, high = sp.bounds(like)
    # knots = base + (fac / cs_K) * cs, cs the zero-padded cumulative sums (as in rqs_knots)
    min_size = torch.tensor([[sp.min_bin_width], [sp.min_bin_height]], dtype=dt, device=dev)
    offset = min_size * torch.arange(n, dtype=dt, device=dev)
    span = (high - low)[:, None, None]
    circ = sp.circular.to(dev)
    unb = sp.unbounded.to(dev)
    last = torch.zeros(dim, n, dtype=torch.bool, device=dev)
    last[:, -1] = circ  # a circular dim's last derivative is its first
    ends = torch.zeros(dim, n, dtype=torch.bool, device=dev)
    ends[:, 0] = unb  # unbounded dims: unit end derivatives
    ends[:, -1] = unb
    # gradient of the derivative table: nothing reaches fixed ends, a circular dim's last
    # derivative feeds its first
    keep = (~(last | ends)).to(dt)
    first = torch.zeros(dim, n, dtype=dt, device=dev)
    first[:, 0] = circ.to(dt)
    # Flat positions of the bin's (x0, x1, y0, y1, d0, d1) in the (D, 3 (K + 1)) table
    # [x knots | y knots | derivatives] of one parameter set, minus the bin index: (6, 1, D).
    o = torch.arange(dim, device=dev) * 3 * n
    offs = torch.stack([o, o + 1, o + n, o + n + 1, o + 2 * n, o + 2 * n + 1])[:, None, :]
    scalar = dict(dtype=dt, device=dev)
    return {
        "low": low,
        "high": high,
        "base": low[:, None, None] + span * offset,  # (D, 2, K + 1)
        "fac": span * (1.0 - min_size * k),  # (D, 2, 1)
        "zero_col": torch.zeros(1, 1, 1, 1, **scalar),
        "circ": circ,
        "unb": unb,
        "last": last,
        "ends": ends,
        "keep": keep,
        "first": first,
        "offs": offs,
        "zero": torch.zeros((), **scalar),
        "one": torch.ones((), **scalar),
        "two": torch.full((), 2.0, **scalar),
        "pi": torch.full((), math.pi, **scalar),
        "two_pi": torch.full((), 2.0 * math.pi, **scalar),
        "shift": torch.full((), math.log(math.expm1(1.0 - sp.min_derivative)), **scalar),
        "min_d": torch.full((), sp.min_derivative, **scalar),
        "batch_offs": {},  # batch size -> offs + offsets of per-sample parameter sets
    }


def _wrap(v: Tensor, c: dict) -> Tensor:
    """`wrap_circular` with the constants of `_fused_consts`."""
    r = torch.remainder(v + c["pi"], c["two_pi"]) - c["pi"]
    r = torch.where(r >= c["pi"], r - c["two_pi"], r)  # round-off can give exactly pi
    return torch.where(c["circ"], r, v)


class _FusedSpline(torch.autograd.Function):
    """``DomainSpline`` forward or inverse with an analytic first derivative."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, v: Tensor, params: Tensor, sp: DomainSpline, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        c = sp._consts(v)
        k, n, dim = sp.n_bins, sp.n_bins + 1, sp.dim
        if sp.min_bin_width * k >= 1.0 or sp.min_bin_height * k >= 1.0:
            raise ValueError("minimal bin size too large for the number of bins")
        zero, one, two = c["zero"], c["one"], c["two"]
        # domain rules on the input (as DomainSpline._prepare)
        v_in = v
        if sp.any_circular:
            v = _wrap(v, c)
        vc = v.clamp(c["low"], c["high"])
        outside = None
        if sp.any_unbounded:
            outside = vc != v  # circular inputs are inside after wrapping
            if sp.any_bounded:
                outside = outside & c["unb"]
        # knots (as rqs_knots)
        n_sets = params.shape[0]
        wh = params[..., : 2 * k].view(n_sets, dim, 2, k)
        e = torch.exp(wh - wh.amax(-1, keepdim=True))
        cs = torch.cat([c["zero_col"].expand(n_sets, dim, 2, 1), e.cumsum(-1)], -1)
        cs_last = cs[..., k:]
        scale = c["fac"] / cs_last
        knots = torch.addcmul(c["base"], scale, cs)  # (P, D, 2, K + 1)
        d_in = params[..., 2 * k :] + c["shift"]
        dk = F.softplus(d_in) + c["min_d"]
        if sp.any_circular:
            dk = torch.where(c["last"], dk[..., :1], dk)
        if sp.any_unbounded:
            dk = torch.where(c["ends"], one, dk)
        src = torch.cat([knots.view(n_sets, dim, 2 * n), dk], -1)  # (P, D, 3 (K + 1))
        # the bin of each element; its knots and derivatives in one take
        start = n + 1 if inverse else 1
        inner = knots.view(n_sets, dim, 2 * n)[..., start : start + k - 1]
        idx = (vc.unsqueeze(-1) >= inner).sum(-1)  # (B, D)
        offs = c["offs"]
        if n_sets > 1:
            offs = c["batch_offs"].get(n_sets)
            if offs is None:
                b_off = torch.arange(n_sets, device=v.device) * (dim * 3 * n)
                offs = c["offs"] + b_off[None, :, None]
                c["batch_offs"][n_sets] = offs
        flat = idx + offs  # (6, B, D)
        x0, x1, y0, y1, d0, d1 = src.take(flat).unbind(0)
        # the rational-quadratic spline (as rqs_forward / rqs_inverse)
        w = x1 - x0
        h = y1 - y0
        s = h / w
        c2 = (d0 + d1) - two * s
        if not inverse:
            t_raw = (vc - x0) / w
            t = t_raw.clamp(zero, one)
            t2 = t * t
            t1t = t - t2
            den = torch.addcmul(s, c2, t1t)
            a = torch.addcmul(s * t2, d0, t1t)
            out = torch.addcdiv(y0, h * a, den)
            omt = one - t
            omt2 = omt * omt
            num = torch.addcmul(torch.addcmul(d1 * t2, s, t1t, value=2.0), d0, omt2)
            sd = s / den
            deriv = sd * sd * num  # dy/dx
            ld = torch.log(deriv)
        else:
            dy = vc - y0
            dyc2 = dy * c2
            qa = torch.addcmul(dyc2, h, s - d0)
            qb = h * d0 - dyc2
            sdy = s * dy
            disc = torch.addcmul(qb * qb, qa, sdy, value=4.0).clamp_min(zero)
            t_raw = (two * sdy) / (qb + torch.sqrt(disc))
            t = t_raw.clamp(zero, one)
            out = torch.addcmul(x0, t, w)
            t2 = t * t
            t1t = t - t2
            den = torch.addcmul(s, c2, t1t)
            omt = one - t
            omt2 = omt * omt
            num = torch.addcmul(torch.addcmul(d1 * t2, s, t1t, value=2.0), d0, omt2)
            ds = den / s
            ld = torch.log(ds * ds / num)
            a = deriv = None
        # domain rules on the output (as DomainSpline._finish)
        if sp.any_bounded:
            out = out.clamp(c["low"], c["high"])
        if outside is not None:
            out = torch.where(outside, v, out)
            ld = torch.where(outside, zero, ld)
        if sp.any_circular:
            out = _wrap(out, c)
        ctx.sp, ctx.inverse, ctx.n_sets = sp, inverse, n_sets
        ctx.save_for_backward(
            v_in, params, t, t_raw, t2, t1t, omt, omt2, s, w, h, d0, d1, c2, den, num, a,
            deriv, d_in, outside, flat, e, cs, cs_last, scale,
        )  # fmt: skip
        return out, ld

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, g_ld: Tensor) -> tuple:  # noqa: D102
        (v, params, t, t_raw, t2, t1t, omt, omt2, s, w, h, d0, d1, c2, den, num, a, deriv,
         d_in, outside, flat, e, cs, cs_last, scale) = ctx.saved_tensors  # fmt: skip
        sp, inverse = ctx.sp, ctx.inverse
        if torch.is_grad_enabled():  # create_graph: differentiate the reference composition
            return _reference_backward(sp, inverse, v, params, g_out, g_ld, ctx.needs_input_grad)
        c = sp._consts(v)
        zero, one = c["zero"], c["one"]
        if outside is not None:
            g_pass = torch.where(outside, g_out, zero)
            g_out = torch.where(outside, zero, g_out)
            g_ld = torch.where(outside, zero, g_ld)
        inside = t == t_raw  # the clamp of t passes no gradient
        e2 = omt - t  # 1 - 2 t
        iden = den.reciprocal()
        inum = num.reciprocal()
        # d log|dy/dx| / dt of the forward spline
        l_t = torch.addcmul(s * e2, d1, t)
        l_t = torch.addcmul(l_t, d0, omt, value=-1.0) * inum
        l_t = torch.addcmul(l_t, c2 * e2, iden, value=-1.0) * c["two"]
        if not inverse:
            alpha, beta = g_out, g_ld
            g_t = torch.addcmul(g_out * (w * deriv), g_ld, l_t)
            g_v = torch.where(inside, g_t, zero) / w
            g_x0 = -g_v
            g_w = g_x0 * t
        else:  # implicit function: t solves y = y0 + h R(t); the log-det is -log|dy/dx|
            a = torch.addcmul(s * t2, d0, t1t)
            beta = -g_ld
            sd = s * iden
            f_t = sd * sd * num * w  # dy/dt at the solution
            g_t = torch.addcmul(g_out * w, g_ld, l_t, value=-1.0)
            g_v = torch.where(inside, g_t, zero) / f_t
            alpha = -g_v
            g_x0 = g_out
            g_w = g_out * t
        r = a * iden
        ap = alpha * h * iden
        p = beta * inum
        m = torch.addcmul(ap * r, beta, iden, value=2.0)
        g_d1 = torch.addcmul(t2 * p, t1t, m, value=-1.0)
        g_d0 = torch.addcmul(omt2 * p, t1t, ap - m)
        g_s = torch.addcmul(ap * t2, torch.add(one, t1t, alpha=-2.0), m, value=-1.0)
        g_s = torch.addcmul(torch.add(g_s, beta / s, alpha=2.0), t1t, p, value=2.0)
        gsw = g_s / w
        g_h = torch.addcmul(gsw, alpha, r)
        g_w = torch.addcmul(g_w, gsw, s, value=-1.0)
        if outside is not None:
            g_v = torch.where(outside, g_pass, g_v)
        g_params = None
        if ctx.needs_input_grad[1]:
            k, n, n_sets, dim = sp.n_bins, sp.n_bins + 1, ctx.n_sets, sp.dim
            g6 = torch.cat([g_x0 - g_w, g_w, alpha - g_h, g_h, g_d0, g_d1])
            g_tab = g6.new_zeros(n_sets * dim * 3 * n)
            g_tab.index_add_(0, flat.view(-1), g6.view(-1))
            g_tab = g_tab.view(n_sets, dim, 3 * n)
            # knots = base + scale cs, scale = fac / cs_K, cs_j = sum_{i < j} e_i
            g_kn = g_tab[..., : 2 * n].view(n_sets, dim, 2, n)
            g_last = (g_kn * cs).sum(-1, keepdim=True) * scale / cs_last
            acc = (g_kn * scale).cumsum(-1)
            g_e = (acc[..., k:] - g_last) - acc[..., :k]
            g_d = g_tab[..., 2 * n :]
            g_d = torch.addcmul(g_d * c["keep"], g_d[..., k:], c["first"])
            g_params = torch.cat(
                [(g_e * e).view(n_sets, dim, 2 * k), g_d * torch.sigmoid(d_in)], -1
            )
        return (g_v if ctx.needs_input_grad[0] else None), g_params, None, None


def _reference_backward(
    sp: DomainSpline,
    inverse: bool,
    v: Tensor,
    params: Tensor,
    g_out: Tensor,
    g_ld: Tensor,
    needs: Sequence[bool],
) -> tuple:
    """Gradients through the reference composition, themselves differentiable."""
    fn = sp.reference_inverse_and_log_det if inverse else sp.reference_forward_and_log_det
    inputs = [x for x, need in zip((v, params), needs[:2]) if need]
    with torch.enable_grad():
        out, ld = fn(v, params)
        grads = torch.autograd.grad((out, ld), inputs, (g_out, g_ld), create_graph=True)
    it = iter(grads)
    return (next(it) if needs[0] else None), (next(it) if needs[1] else None), None, None


# ----------------------------------------------------------------------------- compiled kernels
#
# On a CPU `DomainSpline` runs the C kernels of `boltzgen.native` where they are built:
# the same maths as `_FusedSpline` (forward: the reference formulas; backward: its analytic
# gradient) in one pass per dimension, the backward recomputing the knots from the saved
# inputs. Higher derivatives differentiate the reference composition, as for `_FusedSpline`.


def _native_applies_to(sp: DomainSpline, v: Tensor) -> bool:
    """Whether the kernels evaluate ``sp`` at inputs like ``v`` (given fitting parameters)."""
    return (
        v.device.type == "cpu"
        and native.dtype_supported(v.dtype)
        and v.dim() == 2
        and v.shape[0] > 0
        and sp.n_bins <= native.MAX_BINS
        and sp.min_bin_width * sp.n_bins < 1.0
        and sp.min_bin_height * sp.n_bins < 1.0
        and native.has_storage(v)
        and native.enabled("spline")
    )


def _native_applies(sp: DomainSpline, v: Tensor, params: Tensor) -> bool:
    return (
        params.dtype == v.dtype
        and params.dim() == 3
        and params.shape[0] in (1, v.shape[0])
        and _native_applies_to(sp, v)
    )


def _native_consts(sp: DomainSpline, dtype: torch.dtype) -> tuple:
    key = ("native", dtype)
    c = sp._bounds_cache.get(key)
    if c is None:
        kind = torch.zeros(sp.dim, dtype=torch.int8)
        kind[sp.circular.cpu()] = 2
        kind[~(sp.circular.cpu() | sp.unbounded.cpu())] = 1
        low = torch.tensor(sp._low, dtype=dtype)
        high = torch.tensor(sp._high, dtype=dtype)
        shift = math.log(math.expm1(1.0 - sp.min_derivative))
        scalars = (sp.min_bin_width, sp.min_bin_height, sp.min_derivative, shift, math.pi,
                   2.0 * math.pi)  # fmt: skip
        c = (kind, low, high, scalars)
        sp._bounds_cache[key] = c
    return c


def is_lane_major(params: Tensor) -> bool:
    """Whether per-sample spline parameters ``(B, D, 3K + 1)`` are laid out ``(D, 3K + 1, B)``
    in memory (B > 1): the layout the compiled kernels read without a transpose, and what
    `lane_major_params` makes."""
    b, d, n = params.shape
    return b > 1 and params.stride() == (1, n * b, b)


def lane_major_params(out_t: Tensor, dim: int) -> Tensor:
    """Per-sample spline parameters ``(B, D, 3K + 1)`` from a conditioner output written
    transposed, ``(D * (3K + 1), B)`` (a view where that is contiguous, as a matrix product
    writes it)."""
    return out_t.contiguous().view(dim, -1, out_t.shape[1]).permute(2, 0, 1)


def _native_params(params: Tensor) -> Tensor:
    """``params`` in a layout the kernels read: as it is if contiguous or lane-major."""
    return params if is_lane_major(params) else params.contiguous()


def _native_head(sp: DomainSpline, v: Tensor, params: Tensor, inverse: bool) -> list:
    """The leading arguments shared by the forward and backward kernels (``v`` contiguous,
    ``params`` from `_native_params`)."""
    kind, low, high, scalars = _native_consts(sp, v.dtype)
    return [
        v.shape[0], v.shape[1], sp.n_bins, params.shape[0], int(inverse),
        int(is_lane_major(params)), v.data_ptr(), params.data_ptr(), low.data_ptr(),
        high.data_ptr(), kind.data_ptr(), *scalars,
    ]  # fmt: skip


def _native_forward(
    lib: ctypes.CDLL, sp: DomainSpline, v: Tensor, params: Tensor, inverse: bool
) -> tuple:
    out, ld = torch.empty_like(v), torch.empty_like(v)
    fn = native.kernel(lib, "rqs_fwd", v.dtype)
    any_bounded = int(sp.any_bounded)
    if fn(*_native_head(sp, v, params, inverse), any_bounded, out.data_ptr(), ld.data_ptr()):
        raise RuntimeError("spline kernel refused its arguments")
    return out, ld


class _NativeSpline(torch.autograd.Function):
    """``DomainSpline`` forward or inverse through the compiled kernels."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, v: Tensor, params: Tensor, sp: DomainSpline, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        out, ld = _native_forward(
            native.library(), sp, v.contiguous(), _native_params(params), inverse
        )
        ctx.sp, ctx.inverse = sp, inverse
        # the inputs themselves (not contiguous copies, which carry no graph): a double
        # backward differentiates through them
        ctx.save_for_backward(v, params)
        return out, ld

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, g_ld: Tensor) -> tuple:  # noqa: D102
        v, params = ctx.saved_tensors
        sp, inverse, needs = ctx.sp, ctx.inverse, ctx.needs_input_grad
        if torch.is_grad_enabled() or not (native.has_storage(g_out) and native.has_storage(g_ld)):
            # create_graph or vmapped gradients: differentiate the reference composition
            return _reference_backward(sp, inverse, v, params, g_out, g_ld, needs)
        g_v, g_p = _native_backward(
            native.library(), sp, v.contiguous(), _native_params(params), inverse, g_out, g_ld,
            needs,
        )  # fmt: skip
        return g_v, g_p, None, None


def _native_backward(
    lib: ctypes.CDLL,
    sp: DomainSpline,
    v: Tensor,
    params: Tensor,
    inverse: bool,
    g_out: Tensor,
    g_ld: Tensor,
    needs: Sequence[bool] = (True, True),
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients (of ``v``, of ``params``, each unless not ``needs``) of the compiled spline
    for upstream gradients of its output and per-element log-det; contiguous ``v``, ``params``
    contiguous or lane-major (the gradient then lane-major too)."""
    g_out, g_ld = g_out.contiguous(), g_ld.contiguous()
    g_v = torch.empty_like(v) if needs[0] else None
    g_p = None
    if needs[1]:
        if params.shape[0] == 1:
            g_p = torch.zeros_like(params)
        elif is_lane_major(params):
            b, d, n = params.shape
            g_p = lane_major_params(params.new_empty(d * n, b), d)
        else:
            g_p = torch.empty_like(params, memory_format=torch.contiguous_format)
    fn = native.kernel(lib, "rqs_bwd", v.dtype)
    rc = fn(
        *_native_head(sp, v, params, inverse),
        g_out.data_ptr(), g_ld.data_ptr(),
        None if g_v is None else g_v.data_ptr(), None if g_p is None else g_p.data_ptr(),
    )  # fmt: skip
    if rc:
        raise RuntimeError("spline kernel refused its arguments")
    return g_v, g_p


def _native_self_check(lib: ctypes.CDLL) -> float:
    """Largest difference (values, log-dets and gradients, float64, relative to the largest
    entry) between freshly built kernels and the torch evaluation on a fixed mixed-domain
    spline; `boltzgen.native` keeps the torch evaluation if it misses by more than 1e-9."""
    domains = [Unbounded(), Bounded(-1.0, 2.0), Circular(), Unbounded(), Circular()]
    sp = DomainSpline(domains, n_bins=5)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(37, 5, generator=g, dtype=torch.float64) * 3.0
    v[:, 1] = torch.rand(37, generator=g, dtype=torch.float64) * 2.9 - 0.95
    compared = []
    for layout in ("rows", "lanes", "shared"):
        params = torch.randn(1 if layout == "shared" else 37, 5, 16, generator=g,
                             dtype=torch.float64)  # fmt: skip
        if layout == "lanes":  # the same numbers laid out (D, 3K + 1, B)
            params = lane_major_params(params.permute(1, 2, 0).reshape(5 * 16, 37), 5)
        for inverse in (False, True):
            ref = sp.reference_inverse_and_log_det if inverse else sp.reference_forward_and_log_det
            vv, pp = v.clone().requires_grad_(True), params.clone().requires_grad_(True)
            out, ld = ref(vv, pp)
            g_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view_as(out)
            g_ld = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).view_as(out)
            grads = torch.autograd.grad((out, ld), (vv, pp), (g_out, g_ld))
            n_out, n_ld = _native_forward(lib, sp, v, params, inverse)
            n_gv = torch.empty_like(v)
            n_gp = torch.zeros_like(params)  # the same layout as params
            lib.rqs_bwd_f64(
                *_native_head(sp, v, params, inverse),
                g_out.data_ptr(), g_ld.data_ptr(), n_gv.data_ptr(), n_gp.data_ptr(),
            )  # fmt: skip
            compared += [(n_out, out), (n_ld, ld), (n_gv, grads[0]), (n_gp, grads[1])]
    return native.relative_error(compared)
