"""Masked autoregressive layers (MADE conditioners): rational-quadratic spline and affine (MAF).

Papamakarios et al., "Masked Autoregressive Flow for Density Estimation" (NeurIPS 2017);
Durkan et al., "Neural Spline Flows" (2019). The density direction (`inverse_and_log_det`) is
one network pass; the sampling direction (`forward_and_log_det`) takes D passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from boltzgen.flows.base import Domain, Transform, Unbounded
from boltzgen.flows.nets import MADE
from boltzgen.flows.splines import DomainSpline

__all__ = ["MaskedAffineAutoregressive", "MaskedSplineAutoregressive"]


class MaskedSplineAutoregressive(Transform):
    """Autoregressive rational-quadratic spline over a mixed-domain vector.

    Dimension ``i`` is transformed by a spline on its own domain (see `DomainSpline`) whose
    parameters depend on dimensions ``< i`` (in the given order) through a `MADE`.

    Args:
        domains: One domain per dimension (length D).
        n_bins: Spline bins.
        hidden: MADE width.
        n_res_blocks: MADE residual blocks.
        dropout: MADE dropout.
        context_features: Width of the optional context.
        tail_bound: Spline interval [-B, B] of unbounded dimensions.
        identity_init: Start as the identity map.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        n_bins: int = 8,
        hidden: int = 256,
        n_res_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        tail_bound: float = 5.0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        self.dim = len(domains)
        self.spline = DomainSpline(domains, n_bins, tail_bound)
        self.made = MADE(
            domains,
            self.spline.n_params,
            hidden,
            n_res_blocks,
            dropout,
            context_features,
            identity_init,
        )

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        z, ld = self.spline.inverse_and_log_det(x, self.made(x, context))
        return z, ld.sum(1)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x = z
        for _ in range(self.dim):
            # After pass i, dims 0..i are exact (dim i depends only on dims < i).
            x, ld = self.spline.forward_and_log_det(z, self.made(x, context))
        return x, ld.sum(1)


class MaskedAffineAutoregressive(Transform):
    """Masked affine autoregressive layer (MAF) on the unbounded dimensions.

    ``x_i = z_i * exp(s_i) + t_i`` with ``(s_i, t_i)`` from a `MADE` of dims ``< i``; all dims
    (circular ones as ``(cos, sin)``) condition, non-`Unbounded` dims are left unchanged.
    ``s = scale_bound * tanh(raw / scale_bound)``.

    Args:
        domains: One domain per dimension (length D).
        hidden, n_res_blocks, dropout, context_features: MADE settings.
        scale_bound: Bound on ``|log scale|``.
        identity_init: Start as the identity map.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        hidden: int = 256,
        n_res_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        scale_bound: float = 5.0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        self.dim = len(domains)
        unb = [isinstance(d, Unbounded) for d in domains]
        if not any(unb):
            raise ValueError("no unbounded dimension to transform")
        self.register_buffer("unbounded", torch.tensor(unb))
        self.scale_bound = scale_bound
        self.made = MADE(domains, 2, hidden, n_res_blocks, dropout, context_features, identity_init)

    def _st(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raw = self.made(x, context)
        s = self.scale_bound * torch.tanh(raw[..., 0] / self.scale_bound)
        s = s.masked_fill(~self.unbounded, 0.0)
        t = raw[..., 1].masked_fill(~self.unbounded, 0.0)
        return s, t

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        s, t = self._st(x, context)
        return (x - t) * torch.exp(-s), -s.sum(1)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x = z
        for _ in range(self.dim):
            s, t = self._st(x, context)
            x = z * torch.exp(s) + t
        return x, s.sum(1)
