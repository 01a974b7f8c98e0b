"""Base distributions for flows over mixed unbounded, bounded and circular coordinates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzgen.flows.base import Bounded, Circular, Domain, Unbounded, wrap_angle

__all__ = [
    "BaseDistribution",
    "DiagonalGaussian",
    "ProductBase",
    "Uniform",
    "UniformCircle",
    "VonMises",
]

_LOG_2PI = math.log(2.0 * math.pi)


class BaseDistribution(nn.Module):
    """A distribution on ``(batch, D)`` vectors with `sample` and `log_prob`.

    Subclasses implement `log_prob` and `_sample` (a draw without gradient wrt parameters
    unless reparametrised); `sample` returns the draw and its log density.
    """

    dim: int

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log density of ``x`` ``(batch, D)``, shape ``(batch,)``."""
        raise NotImplementedError

    def _sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples; return ``(x (n, D), log_p (n,))``."""
        x = self._sample(n)
        return x, self.log_prob(x, context)


class DiagonalGaussian(BaseDistribution):
    """Normal distribution with diagonal covariance (reparametrised samples).

    Args:
        dim: Dimension D.
        loc: Mean, scalar or ``(D,)``.
        scale: Standard deviation, scalar or ``(D,)``.
        trainable: Learn ``loc`` and ``log(scale)``.
    """

    def __init__(
        self,
        dim: int,
        loc: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        loc = torch.as_tensor(loc, dtype=torch.float32).expand(dim).clone()
        log_scale = torch.log(torch.as_tensor(scale, dtype=torch.float32)).expand(dim).clone()
        if trainable:
            self.loc = nn.Parameter(loc)
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", log_scale)

    def _sample(self, n: int) -> Tensor:
        eps = torch.randn(n, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(self.log_scale) * eps

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        ls = self.log_scale.to(x.dtype)
        u = (x - self.loc.to(x.dtype)) * torch.exp(-ls)
        return -0.5 * (u * u).sum(1) - ls.sum() - 0.5 * self.dim * _LOG_2PI


class Uniform(BaseDistribution):
    """Uniform distribution on a box ``[low_i, high_i)``; log density ``-inf`` outside.

    Args:
        low, high: Bounds, each ``(D,)``.
    """

    def __init__(self, low: Sequence[float] | Tensor, high: Sequence[float] | Tensor) -> None:
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32).flatten()
        high = torch.as_tensor(high, dtype=torch.float32).flatten()
        if not bool((high > low).all()):
            raise ValueError("need high > low")
        self.dim = low.numel()
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def _sample(self, n: int) -> Tensor:
        u = torch.rand(n, self.dim, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        low, high = self.low.to(x.dtype), self.high.to(x.dtype)
        lp = -torch.log(high - low).sum()
        inside = ((x >= low) & (x <= high)).all(1)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


class UniformCircle(Uniform):
    """Uniform distribution on the torus [-pi, pi)^D."""

    def __init__(self, dim: int) -> None:
        super().__init__([-math.pi] * dim, [math.pi] * dim)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        return x.new_full((x.shape[0],), -self.dim * _LOG_2PI)


def _log_i0(k: Tensor) -> Tensor:
    return torch.log(torch.special.i0e(k)) + k


class VonMises(BaseDistribution):
    """Product of von Mises distributions on [-pi, pi)^D.

    Args:
        dim: Dimension D.
        loc: Mean angle(s), scalar or ``(D,)``.
        concentration: kappa, scalar or ``(D,)``.
        trainable: Learn ``loc`` and ``log(kappa)``.
    """

    def __init__(
        self,
        dim: int,
        loc: float | Tensor = 0.0,
        concentration: float | Tensor = 1.0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        loc = torch.as_tensor(loc, dtype=torch.float32).expand(dim).clone()
        lk = torch.log(torch.as_tensor(concentration, dtype=torch.float32)).expand(dim).clone()
        if trainable:
            self.loc = nn.Parameter(loc)
            self.log_kappa = nn.Parameter(lk)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_kappa", lk)

    def _sample(self, n: int) -> Tensor:
        with torch.no_grad():
            d = torch.distributions.VonMises(self.loc.double(), torch.exp(self.log_kappa.double()))
            x = d.sample((n,))
        return wrap_angle(x).to(self.loc.dtype)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        k = torch.exp(self.log_kappa.to(x.dtype))
        lp = k * torch.cos(x - self.loc.to(x.dtype)) - _LOG_2PI - _log_i0(k)
        return lp.sum(1)


class ProductBase(BaseDistribution):
    """Independent base matching a ``domains`` description, sampled in one batched call.

    `Unbounded` -> N(0, scale^2); `Bounded(a, b)` -> uniform on [a, b]; `Circular` -> uniform
    on [-pi, pi) (or von Mises(0, ``circular_concentration``) if that is given). `log_prob`
    does not check bounds (flows keep their outputs inside their domains).

    Args:
        domains: One domain per dimension.
        scale: Standard deviation of the unbounded dims.
        circular_concentration: If given, von Mises concentration of the circular dims.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        scale: float = 1.0,
        circular_concentration: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = len(domains)
        low, high, kind = [], [], []
        for d in domains:
            if isinstance(d, Unbounded):
                low.append(0.0), high.append(0.0), kind.append(0)
            elif isinstance(d, Bounded):
                low.append(d.low), high.append(d.high), kind.append(1)
            elif isinstance(d, Circular):
                low.append(-math.pi), high.append(math.pi), kind.append(2)
            else:
                raise TypeError(f"unknown domain {d!r}")
        kind_t = torch.tensor(kind)
        self.register_buffer("low", torch.tensor(low))
        self.register_buffer("high", torch.tensor(high))
        self.register_buffer("gauss", kind_t == 0)
        self.register_buffer("vm", (kind_t == 2) & (circular_concentration is not None))
        self.scale = scale
        self.kappa = circular_concentration
        n_circ = int((kind_t == 2).sum())
        width = torch.where(kind_t == 0, 1.0, torch.tensor(high) - torch.tensor(low))
        const = float(-torch.log(width[kind_t > 0]).sum()) if kind_t.gt(0).any() else 0.0
        n_g = int((kind_t == 0).sum())
        const -= n_g * (0.5 * _LOG_2PI + math.log(scale))
        if circular_concentration is not None and n_circ:
            k = torch.tensor(float(circular_concentration), dtype=torch.float64)
            const -= n_circ * float(_log_i0(k))  # von Mises replaces 1 / (2 pi)
        self.const = const

    def _sample(self, n: int) -> Tensor:
        dev, dt = self.low.device, self.low.dtype
        u = torch.rand(n, self.dim, dtype=dt, device=dev)
        x = torch.where(
            self.gauss, torch.randn_like(u) * self.scale, self.low + (self.high - self.low) * u
        )
        if self.kappa is not None and bool(self.vm.any()):
            idx = self.vm.nonzero().flatten()
            d = torch.distributions.VonMises(
                torch.zeros(len(idx), dtype=torch.float64, device=dev),
                torch.full((len(idx),), float(self.kappa), dtype=torch.float64, device=dev),
            )
            v = wrap_angle(d.sample((n,)))
            x = x.index_copy(1, idx, v.to(dt))
        return x

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        g = torch.where(self.gauss, x / self.scale, torch.zeros_like(x))
        lp = -0.5 * (g * g).sum(1) + self.const
        if self.kappa is not None and bool(self.vm.any()):
            lp = lp + (self.kappa * torch.cos(x) * self.vm).sum(1)
        return lp
