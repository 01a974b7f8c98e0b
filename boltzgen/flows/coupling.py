"""Coupling layers over mixed-domain vectors: rational-quadratic spline and affine (Real NVP).

Spline coupling: Durkan et al., "Neural Spline Flows" (2019); circular dims as in Rezende et al.
(2020) and Midgley et al., "Flow Annealed Importance Sampling Bootstrap" (ICLR 2023).
Affine coupling: Dinh et al., "Density estimation using Real NVP" (ICLR 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzgen.flows.base import Circular, Domain, Transform, Unbounded
from boltzgen.flows.nets import ResidualNet, circular_features
from boltzgen.flows.splines import DomainSpline, lane_major_params

__all__ = ["AffineCoupling", "SplineCoupling", "alternating_mask", "random_mask"]


def alternating_mask(dim: int, even: bool = True) -> Tensor:
    """Bool mask ``(dim,)`` selecting every other dimension (starting at 0 if ``even``)."""
    m = torch.arange(dim) % 2 == 0
    return m if even else ~m


def random_mask(dim: int, seed: int = 0) -> Tensor:
    """Bool mask ``(dim,)`` selecting a random half (``dim // 2``) of the dimensions."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(dim, dtype=torch.bool)
    m[torch.randperm(dim, generator=g)[: dim // 2]] = True
    return m


def _indices(mask: Tensor) -> tuple[list[int], list[int]]:
    mask = torch.as_tensor(mask, dtype=torch.bool)
    return mask.nonzero().flatten().tolist(), (~mask).nonzero().flatten().tolist()


class SplineCoupling(Transform):
    """Rational-quadratic spline coupling layer for a vector of mixed domains.

    The dimensions where ``mask`` is true are transformed element-wise by a spline on their own
    domain (see `DomainSpline`), with parameters produced by a `ResidualNet` from the other
    ("identity") dimensions, circular ones embedded as ``(cos, sin)``. Optionally the identity
    dimensions get an unconditional spline too (as normflows/nflows do); the conditioner then
    reads them on the data side.

    Args:
        domains: One domain per dimension (length D).
        mask: Bool ``(D,)``, true for the transformed dimensions.
        n_bins: Spline bins.
        hidden: Conditioner width.
        n_res_blocks: Conditioner residual blocks.
        dropout: Conditioner dropout.
        context_features: Width of the optional context.
        tail_bound: Spline interval [-B, B] of unbounded dimensions.
        identity_spline: Also transform the identity dimensions with an unconditional spline.
        identity_init: Start as the identity map.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        mask: Tensor,
        n_bins: int = 8,
        hidden: int = 256,
        n_res_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        tail_bound: float = 5.0,
        identity_spline: bool = False,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        t_idx, id_idx = _indices(mask)
        if not t_idx:
            raise ValueError("mask selects no dimension to transform")
        self.dim = len(domains)
        self.identity_spline = identity_spline and bool(id_idx)
        self.spline_t = DomainSpline([domains[i] for i in t_idx], n_bins, tail_bound)
        if self.identity_spline:
            self.spline_id = DomainSpline([domains[i] for i in id_idx], n_bins, tail_bound)
        self.n_t = len(t_idx)
        self.register_buffer("t_idx", torch.tensor(t_idx, dtype=torch.long))
        self.register_buffer("id_idx", torch.tensor(id_idx, dtype=torch.long))
        self.register_buffer("inv_perm", torch.argsort(torch.tensor(t_idx + id_idx)))
        self.id_circular = [isinstance(domains[i], Circular) for i in id_idx]
        # Not in the state dict (checkpoints keep their keys): the split of the input in one
        # gather, and the positions of the conditioner's linear and circular inputs.
        self.register_buffer("perm", torch.tensor(t_idx + id_idx), persistent=False)
        lin_pos = [i for i, c in enumerate(self.id_circular) if not c]
        circ_pos = [i for i, c in enumerate(self.id_circular) if c]
        self.register_buffer("id_lin_pos", torch.tensor(lin_pos, dtype=torch.long), False)
        self.register_buffer("id_circ_pos", torch.tensor(circ_pos, dtype=torch.long), False)
        n_in = len(id_idx) + sum(self.id_circular)
        n_p = self.spline_t.n_params
        self.net = ResidualNet(
            n_in, self.n_t * n_p, hidden, n_res_blocks, dropout, context_features, identity_init
        )
        if self.identity_spline:
            init = torch.zeros(len(id_idx), n_p)
            if not identity_init:
                init.normal_(0.0, 0.1)
            self.id_params = nn.Parameter(init)

    def _params(self, x_id: Tensor, context: Tensor | None) -> Tensor:
        # circular_features(x_id, self.id_circular) with precomputed indices
        h = x_id
        if self.id_circ_pos.numel():
            ang = x_id.index_select(1, self.id_circ_pos)
            parts = [torch.cos(ang), torch.sin(ang)]
            if self.id_lin_pos.numel():
                parts.insert(0, x_id.index_select(1, self.id_lin_pos))
            h = torch.cat(parts, 1)
        if self.spline_t.prefers_lane_major(x_id):
            # written (n_t * (3K + 1), batch) by the last layer: the kernels' layout
            return lane_major_params(self.net(h, context, transposed=True), self.n_t)
        return self.net(h, context).view(x_id.shape[0], self.n_t, -1)

    def _split(self, v: Tensor) -> tuple[Tensor, Tensor]:
        return v.index_select(1, self.perm).split([self.n_t, v.shape[1] - self.n_t], 1)

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=1).index_select(1, self.inv_perm)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        z_t, z_id = self._split(z)
        if self.identity_spline:
            # Unconditional spline of the identity dims first: the conditioner reads outputs.
            p_id = self.id_params.to(z.dtype).unsqueeze(0)
            x_id, ld_id = self.spline_id.forward_and_log_det(z_id, p_id)
        else:
            x_id = z_id
        x_t, ld = self.spline_t.forward_and_log_det(z_t, self._params(x_id, context))
        ld = ld.sum(1)
        if self.identity_spline:
            ld = ld + ld_id.sum(1)
        return self._join(x_t, x_id), ld

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x_t, x_id = self._split(x)
        if self.identity_spline:
            p_id = self.id_params.to(x.dtype).unsqueeze(0)
            z_id, ld_id = self.spline_id.inverse_and_log_det(x_id, p_id)
        else:
            z_id = x_id
        z_t, ld = self.spline_t.inverse_and_log_det(x_t, self._params(x_id, context))
        ld = ld.sum(1)
        if self.identity_spline:
            ld = ld + ld_id.sum(1)
        return self._join(z_t, z_id), ld


class AffineCoupling(Transform):
    """Affine (Real NVP) coupling on the unbounded dimensions selected by ``mask``.

    ``x_t = z_t * exp(s) + t`` with ``(s, t)`` from a `ResidualNet` of the identity dims
    (circular ones embedded as ``(cos, sin)``); ``s = scale_bound * tanh(raw / scale_bound)``
    keeps scales finite. Masked dimensions that are not `Unbounded` are left unchanged (an
    affine map would leave their domain).

    Args:
        domains: One domain per dimension (length D).
        mask: Bool ``(D,)``, true for dimensions to transform (non-unbounded ones are ignored).
        hidden, n_res_blocks, dropout, context_features: Conditioner settings.
        scale_bound: Bound on ``|log scale|``.
        identity_init: Start as the identity map.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        mask: Tensor,
        hidden: int = 256,
        n_res_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        scale_bound: float = 5.0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool).clone()
        unb = torch.tensor([isinstance(d, Unbounded) for d in domains])
        t_idx, _ = _indices(mask & unb)
        _, id_idx = _indices(mask)
        if not t_idx:
            raise ValueError("mask selects no unbounded dimension to transform")
        rest = sorted(set(range(len(domains))) - set(t_idx))
        self.n_t = len(t_idx)
        self.scale_bound = scale_bound
        self.register_buffer("t_idx", torch.tensor(t_idx, dtype=torch.long))
        self.register_buffer("c_idx", torch.tensor(id_idx, dtype=torch.long))
        self.register_buffer("rest_idx", torch.tensor(rest, dtype=torch.long))
        self.register_buffer("inv_perm", torch.argsort(torch.tensor(t_idx + rest)))
        self.id_circular = [isinstance(domains[i], Circular) for i in id_idx]
        n_in = len(id_idx) + sum(self.id_circular)
        self.net = ResidualNet(
            n_in, 2 * self.n_t, hidden, n_res_blocks, dropout, context_features, identity_init
        )

    def _st(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        h = circular_features(x[:, self.c_idx], self.id_circular)
        raw_s, t = self.net(h, context).chunk(2, dim=1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return s, t

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        s, t = self._st(z, context)
        x_t = z[:, self.t_idx] * torch.exp(s) + t
        out = torch.cat([x_t, z[:, self.rest_idx]], dim=1).index_select(1, self.inv_perm)
        return out, s.sum(1)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        s, t = self._st(x, context)
        z_t = (x[:, self.t_idx] - t) * torch.exp(-s)
        out = torch.cat([z_t, x[:, self.rest_idx]], dim=1).index_select(1, self.inv_perm)
        return out, -s.sum(1)
