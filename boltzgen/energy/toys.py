"""Analytic toy targets with exact normalisers, for testing samplers, SNFs and estimators.

Each target is an ``nn.Module`` with ``log_prob(x)`` (unnormalised log density, ``(B, D) -> (B,)``,
differentiable), an exact ``log_z`` (``log ∫ exp(log_prob)``, a Python float) and ``sample(n)``
for exact reference samples. Units are dimensionless (energies in kT).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from boltzgen.flows.base import Transform

__all__ = ["DoubleWell1D", "GaussianMixture", "gmm_2d"]


class DoubleWell1D(nn.Module):
    """One-dimensional double well ``U(x) = a x⁴ - b x² + c x``, ``log_prob = -U``.

    ``log_z`` is computed once at construction by trapezoidal quadrature of ``exp(-U)`` on a fine
    grid (the integrand is smooth and decays like ``exp(-a x⁴)``, so the rule converges
    exponentially; the result agrees with adaptive quadrature to ~1e-12). The same grid gives an
    inverse-CDF sampler.

    Args:
        a: Quartic coefficient (> 0).
        b: Quadratic coefficient (barrier height ``b² / (4a)`` for ``c = 0``).
        c: Linear tilt (makes the two wells unequal).
        n_grid: Quadrature points.
    """

    def __init__(
        self, a: float = 1.0, b: float = 4.0, c: float = 1.0, n_grid: int = 200_001
    ) -> None:
        super().__init__()
        if a <= 0:
            raise ValueError(f"a must be positive, got {a}")
        self.a, self.b, self.c = float(a), float(b), float(c)
        # |x| beyond which a x^4 dominates by > 60 kT over the other terms.
        half = 1.0 + (abs(b) / a) ** 0.5 + (abs(c) / a) ** (1 / 3) + (80.0 / a) ** 0.25
        grid = np.linspace(-half, half, n_grid)
        u = self.a * grid**4 - self.b * grid**2 + self.c * grid
        shift = u.min()
        f = np.exp(-(u - shift))
        dx = grid[1] - grid[0]
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * dx)])
        self.log_z = float(math.log(cdf[-1]) - shift)
        self._grid = grid
        self._cdf = cdf / cdf[-1]

    @property
    def dim(self) -> int:
        """Dimension (1)."""
        return 1

    def energy(self, x: Tensor) -> Tensor:
        """``U(x)`` for ``x`` ``(B, 1)``, shape ``(B,)`` (kT)."""
        x = x[..., 0]
        return self.a * x**4 - self.b * x**2 + self.c * x

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised ``-U(x)``, ``(B, 1) -> (B,)``."""
        return -self.energy(x)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Exact samples ``(n, 1)`` by inverse-CDF interpolation on the quadrature grid."""
        u = torch.rand(n, dtype=torch.float64, generator=generator).numpy()
        x = np.interp(u, self._cdf, self._grid)
        return torch.as_tensor(x, dtype=dtype).unsqueeze(-1)

    def moment(self, k: int) -> float:
        """Exact ``E[x^k]`` under the normalised density (same quadrature)."""
        g = self._grid
        u = self.a * g**4 - self.b * g**2 + self.c * g
        f = np.exp(-u - self.log_z) * g**k
        return float(np.sum(0.5 * (f[1:] + f[:-1])) * (g[1] - g[0]))


class GaussianMixture(nn.Module):
    """Mixture of Gaussians with unnormalised component weights: ``p(x) = Σ_k w_k N(x; μ_k, Σ_k)``.

    ``log_z = log Σ_k w_k`` exactly (the components are normalised, the weights are not).

    Args:
        means: ``(K, D)``.
        scales: Standard deviations ``(K, D)`` (diagonal covariances) or ``(K,)``.
        log_weights: Unnormalised log weights ``(K,)``; default all zero (``log_z = log K``).
    """

    def __init__(self, means: Tensor, scales: Tensor, log_weights: Tensor | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        scales = torch.as_tensor(scales, dtype=torch.float64)
        if scales.dim() == 1:
            scales = scales[:, None].expand(k, d)
        if log_weights is None:
            log_weights = torch.zeros(k, dtype=torch.float64)
        log_weights = torch.as_tensor(log_weights, dtype=torch.float64)
        self.register_buffer("means", means.clone())
        self.register_buffer("scales", scales.clone())
        self.register_buffer("log_weights", log_weights.clone())
        self.log_z = float(torch.logsumexp(log_weights, 0))

    @property
    def dim(self) -> int:
        """Dimension D."""
        return self.means.shape[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log density, ``(B, D) -> (B,)``."""
        mu = self.means.to(x.dtype)
        s = self.scales.to(x.dtype)
        r = (x[:, None, :] - mu) / s
        log_n = (
            -0.5 * (r * r).sum(-1) - torch.log(s).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        )
        return torch.logsumexp(log_n + self.log_weights.to(x.dtype), dim=1)

    def mode_fractions(self, x: Tensor, log_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Share of samples ``x`` ``(n, D)`` nearest to each mean, raw and reweighted.

        Returns ``(raw (K,), reweighted (K,))``; the reweighted shares use the self-normalised
        weights ``softmax(log_w)`` over the rows with finite ``log_w`` (equal weights if None).
        """
        x = x.detach().double()
        k = torch.cdist(x, self.means.to(x)).argmin(1)
        n_modes = self.means.shape[0]
        raw = torch.bincount(k, minlength=n_modes).double() / x.shape[0]
        lw = torch.zeros(x.shape[0], dtype=torch.float64) if log_w is None else log_w.double()
        ok = torch.isfinite(lw)
        w = torch.softmax(lw[ok], 0)
        reweighted = torch.zeros(n_modes, dtype=torch.float64).index_add_(0, k[ok], w)
        return raw, reweighted

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Exact samples ``(n, D)``."""
        probs = torch.softmax(self.log_weights, 0)
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[k] + self.scales[k] * eps).to(dtype)

    def mean(self) -> Tensor:
        """Exact mean ``(D,)``."""
        return torch.softmax(self.log_weights, 0) @ self.means

    def covariance(self) -> Tensor:
        """Exact covariance ``(D, D)``."""
        w = torch.softmax(self.log_weights, 0)
        m = self.mean()
        dm = self.means - m
        return torch.diag((w[:, None] * self.scales**2).sum(0)) + (
            w[:, None, None] * dm[:, :, None] * dm[:, None, :]
        ).sum(0)


def gmm_2d(
    n_modes: int = 4,
    radius: float = 3.0,
    scale: float = 0.5,
    log_weights: Tensor | None = None,
) -> GaussianMixture:
    """A 2-D mixture of ``n_modes`` isotropic Gaussians equally spaced on a circle.

    Args:
        n_modes: Number of modes K.
        radius: Distance of the modes from the origin.
        scale: Standard deviation of each mode.
        log_weights: Unnormalised log weights ``(K,)``; default ``log(1 + k)`` for mode ``k``
            (unequal modes, ``log_z = log(K (K + 1) / 2)``).
    """
    ang = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    scales = torch.full((n_modes,), float(scale), dtype=torch.float64)
    if log_weights is None:
        log_weights = torch.log(torch.arange(1, n_modes + 1, dtype=torch.float64))
    return GaussianMixture(means, scales, log_weights)


class Rescale(Transform):
    """Fixed elementwise scaling ``x = scale * y`` (sampling direction), ``log|det| = D log s``.

    Lets a flow live on ``y = x / scale`` (e.g. GMM-40's ``[-40, 40]^2`` mapped to
    ``[-1, 1]^2``) inside a `BoltzmannGenerator`, whose `FlowSpaceTarget` then carries the target
    into the flow's space.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        ld = z.new_full((z.shape[0],), z[0].numel() * math.log(self.scale))
        return z * self.scale, ld

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        ld = x.new_full((x.shape[0],), -x[0].numel() * math.log(self.scale))
        return x / self.scale, ld


def gmm40(seed: int = 0, n_modes: int = 40, loc_scale: float = 40.0) -> GaussianMixture:
    """The FAB paper's 2-D mixture: 40 unit-covariance Gaussians with equal weights.

    Means are uniform in ``[-loc_scale, loc_scale]^2``, drawn from a ``torch.Generator`` seeded
    with ``seed`` (Midgley et al., ICLR 2023, section 5.1). ``log_z = log 40``.
    """
    g = torch.Generator().manual_seed(seed)
    means = (2 * torch.rand(n_modes, 2, generator=g, dtype=torch.float64) - 1) * loc_scale
    return GaussianMixture(means, torch.ones(n_modes, dtype=torch.float64))


class ManyWell(nn.Module):
    """FAB's many-well target: ``n_wells`` independent copies of a 2-D double well.

    Each pair ``(x1, x2)`` has energy ``x1⁴ - 6 x1² - 0.5 x1 + 0.5 x2²`` (Wu, Köhler & Noé 2020;
    the 32-D problem of Midgley et al. 2023 has 16 pairs, hence ``2^16`` modes). ``log_z`` is
    ``n_wells`` times the log of the product of the two 1-D integrals: the quartic by
    `DoubleWell1D` quadrature, the Gaussian ``sqrt(2 pi)`` exactly.

    Args:
        n_wells: Number of 2-D copies (dimension ``2 n_wells``).
    """

    def __init__(self, n_wells: int = 16) -> None:
        super().__init__()
        self.n_wells = int(n_wells)
        self.well = DoubleWell1D(a=1.0, b=6.0, c=-0.5)
        self.log_z = self.n_wells * (self.well.log_z + 0.5 * math.log(2 * math.pi))

    @property
    def dim(self) -> int:
        """Dimension ``2 n_wells``."""
        return 2 * self.n_wells

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log density, ``(B, 2 n_wells) -> (B,)``."""
        x1, x2 = x[:, 0::2], x[:, 1::2]
        return -(x1**4 - 6 * x1**2 - 0.5 * x1 + 0.5 * x2**2).sum(-1)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Exact samples ``(n, 2 n_wells)``."""
        x1 = self.well.sample(n * self.n_wells, generator).reshape(n, self.n_wells)
        x2 = torch.randn(n, self.n_wells, dtype=torch.float64, generator=generator)
        return torch.stack([x1, x2], -1).reshape(n, -1).to(dtype)
