"""Mixing and element-wise layers: permutations, LU-linear, circular shift, ActNorm.

LU-linear: Kingma & Dhariwal, "Glow" (2018) / Durkan et al. (2019). ActNorm: Glow.
Circular shift: as in the FAB alanine-dipeptide flows (Midgley et al., ICLR 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzgen.flows.base import Circular, Domain, Transform, Unbounded, wrap_angle

__all__ = [
    "ActNorm",
    "CircularShift",
    "LULinear",
    "Permutation",
    "random_permutation",
]


class Permutation(Transform):
    """Fixed permutation: ``out[:, i] = in[:, perm[i]]`` in the forward direction.

    Domains move with their dimensions: after the layer, dimension ``i`` has the domain
    ``domains[perm[i]]`` (see `permute_domains`).
    """

    def __init__(self, perm: Sequence[int] | Tensor) -> None:
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if not torch.equal(torch.sort(perm).values, torch.arange(len(perm))):
            raise ValueError("not a permutation")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def permute_domains(self, domains: Sequence[Domain]) -> list[Domain]:
        """Domains of the output given those of the input."""
        return [domains[i] for i in self.perm.tolist()]

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return z.index_select(1, self.perm), z.new_zeros(z.shape[0])

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return x.index_select(1, self.inv_perm), x.new_zeros(x.shape[0])


def random_permutation(dim: int, seed: int = 0) -> Permutation:
    """A `Permutation` of ``dim`` dimensions drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return Permutation(torch.randperm(dim, generator=g))


class LULinear(Transform):
    """Invertible linear map ``x_u = W z_u + b`` of the unbounded dims, ``W = L U``.

    ``L`` is unit lower triangular, ``U`` upper triangular with a positive,
    ``exp``-parametrised diagonal (combine with a `Permutation` for a full PLU).
    Other dims pass through. Initialised to the identity unless ``random_init``.

    Args:
        domains: One domain per dimension.
        random_init: Start from a random (non-identity) LU matrix, seeded by ``seed``.
        seed: Seed for ``random_init``.
    """

    def __init__(self, domains: Sequence[Domain], random_init: bool = False, seed: int = 0) -> None:
        super().__init__()
        idx = [i for i, d in enumerate(domains) if isinstance(d, Unbounded)]
        if not idx:
            raise ValueError("no unbounded dimension to mix")
        n = len(idx)
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long))
        g = torch.Generator().manual_seed(seed)
        self.lower = nn.Parameter(torch.zeros(n, n))
        self.upper = nn.Parameter(torch.zeros(n, n))
        self.raw_diag = nn.Parameter(torch.zeros(n))
        self.bias = nn.Parameter(torch.zeros(n))
        if random_init:
            with torch.no_grad():
                self.lower.copy_(0.3 * torch.randn(n, n, generator=g))
                self.upper.copy_(0.3 * torch.randn(n, n, generator=g))
                self.raw_diag.add_(0.3 * torch.randn(n, generator=g))
                self.bias.copy_(0.3 * torch.randn(n, generator=g))
        self.register_buffer("tril_mask", torch.tril(torch.ones(n, n), -1))

    def _lu(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=dtype, device=self.lower.device)
        m = self.tril_mask.to(dtype)
        diag = torch.exp(self.raw_diag.to(dtype))
        low = self.lower.to(dtype) * m + eye
        up = self.upper.to(dtype) * m.T + torch.diag(diag)
        return low, up, diag

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        low, up, _ = self._lu(z.dtype)
        zu = z[:, self.idx]
        xu = (zu @ up.T) @ low.T + self.bias.to(z.dtype)
        x = z.index_copy(1, self.idx, xu)
        return x, self.raw_diag.to(z.dtype).sum().expand(z.shape[0])

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        low, up, _ = self._lu(x.dtype)
        r = (x[:, self.idx] - self.bias.to(x.dtype)).T
        y = torch.linalg.solve_triangular(low, r, upper=False, unitriangular=True)
        zu = torch.linalg.solve_triangular(up, y, upper=True).T
        z = x.index_copy(1, self.idx, zu)
        return z, (-self.raw_diag.to(x.dtype).sum()).expand(x.shape[0])


class CircularShift(Transform):
    """Add a constant shift to the circular dims and wrap to [-pi, pi); log-det 0.

    Args:
        domains: One domain per dimension.
        shift: Shift in radians (scalar or one per circular dim); ``None`` draws one
            uniformly in [-pi, pi) per circular dim with ``seed``.
        seed: Seed for the random shift.
        trainable: Learn the shift.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        shift: float | Sequence[float] | None = None,
        seed: int = 0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        idx = [i for i, d in enumerate(domains) if isinstance(d, Circular)]
        if not idx:
            raise ValueError("no circular dimension to shift")
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long))
        if shift is None:
            g = torch.Generator().manual_seed(seed)
            s = (torch.rand(len(idx), generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        else:
            s = torch.as_tensor(shift, dtype=torch.float64).expand(len(idx)).clone()
        if trainable:
            self.shift = nn.Parameter(s.float())
        else:
            self.register_buffer("shift", s.float())

    def _move(self, v: Tensor, sign: float) -> Tensor:
        angles = v.index_select(1, self.idx)
        shift = self.shift.to(v.dtype)
        moved = wrap_angle(angles + shift if sign > 0 else angles - shift)
        return v.index_copy(1, self.idx, moved)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._move(z, 1.0), z.new_zeros(z.shape[0])

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._move(x, -1.0), x.new_zeros(x.shape[0])


class ActNorm(Transform):
    """Per-dimension affine ``x = z * exp(log_scale) + loc`` on the unbounded dims.

    Data-dependent initialisation: the first `inverse_and_log_det` call in training mode sets
    ``loc`` and ``log_scale`` so that the latent of that batch has zero mean and unit variance.
    Bounded and circular dims pass through (an affine map would leave their domain).

    Args:
        domains: One domain per dimension.
    """

    def __init__(self, domains: Sequence[Domain]) -> None:
        super().__init__()
        idx = [i for i, d in enumerate(domains) if isinstance(d, Unbounded)]
        if not idx:
            raise ValueError("no unbounded dimension to normalise")
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long))
        self.loc = nn.Parameter(torch.zeros(len(idx)))
        self.log_scale = nn.Parameter(torch.zeros(len(idx)))
        self.register_buffer("initialized", torch.tensor(False))

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        ls = self.log_scale.to(z.dtype)
        xu = z[:, self.idx] * torch.exp(ls) + self.loc.to(z.dtype)
        return z.index_copy(1, self.idx, xu), ls.sum().expand(z.shape[0])

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        xu = x[:, self.idx]
        if self.training and not bool(self.initialized) and x.shape[0] > 1:
            with torch.no_grad():
                self.loc.copy_(xu.mean(0))
                self.log_scale.copy_(torch.log(xu.std(0) + 1e-6))
                self.initialized.fill_(True)
        ls = self.log_scale.to(x.dtype)
        zu = (xu - self.loc.to(x.dtype)) * torch.exp(-ls)
        return x.index_copy(1, self.idx, zu), (-ls.sum()).expand(x.shape[0])
