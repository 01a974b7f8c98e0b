"""The transform contract shared by flow layers, coordinate transforms and stochastic layers.

Direction convention (as distrax/TFP): the *forward* direction is the sampling direction,
latent -> data (for molecules: internal coordinates -> Cartesian). Both fused calls return
``(output, log_abs_det)`` with ``log_abs_det`` of shape ``(batch,)``, the input's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzgen.errors import InputOutsideDomainError

__all__ = [
    "Bounded",
    "Circular",
    "Compose",
    "Domain",
    "InputOutsideDomainError",
    "Inverse",
    "Transform",
    "Unbounded",
    "circular_mask",
    "wrap_angle",
    "wrap_circular",
]

_TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Domain:
    """Base of per-dimension domain descriptors."""


@dataclass(frozen=True)
class Unbounded(Domain):
    """The real line."""


@dataclass(frozen=True)
class Bounded(Domain):
    """The closed interval [low, high]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Bounded domain needs low < high, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Circular(Domain):
    """The circle, represented as [-pi, pi)."""


_ANGLE_CONSTS: dict = {}


def _angle_consts(x: Tensor) -> tuple[Tensor, Tensor]:
    """0-dim ``(pi, 2 pi)`` in ``x``'s dtype and device, built once (a Python number in an
    operation costs a conversion of its own on every call)."""
    key = (x.dtype, x.device)
    c = _ANGLE_CONSTS.get(key)
    if c is None:
        c = _ANGLE_CONSTS[key] = (
            torch.full((), math.pi, dtype=x.dtype, device=x.device),
            torch.full((), _TWO_PI, dtype=x.dtype, device=x.device),
        )
    return c


def wrap_angle(x: Tensor) -> Tensor:
    """Wrap angles (radians) to [-pi, pi); any shape, identity gradient."""
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    pi, two_pi = _angle_consts(x)
    r = torch.remainder(x + pi, two_pi) - pi
    return torch.where(r >= pi, r - two_pi, r)  # round-off can give exactly pi


def wrap_circular(x: Tensor, circular: Tensor | None) -> Tensor:
    """``x`` ``(..., D)`` with the dimensions where the bool mask ``circular`` ``(D,)`` is set
    wrapped to [-pi, pi); ``circular=None`` (or all False) returns ``x`` unchanged."""
    if circular is None or not bool(circular.any()):
        return x
    return torch.where(circular, wrap_angle(x), x)


def circular_mask(domains: Sequence[Domain]) -> Tensor:
    """``(D,)`` bool mask of the `Circular` entries of ``domains``."""
    return torch.tensor([isinstance(d, Circular) for d in domains], dtype=torch.bool)


class Transform(nn.Module):
    """A bijection with tractable log-Jacobian.

    Subclasses implement `forward_and_log_det` (latent -> data) and `inverse_and_log_det`
    (data -> latent). Both take ``x`` of shape ``(batch, ...)`` and an optional ``context``.
    """

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Map latent ``z`` to data; return ``(x, log|det dx/dz|)``, log-det shape ``(batch,)``."""
        raise NotImplementedError

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Map data ``x`` to latent; return ``(z, log|det dz/dx|)``, log-det shape ``(batch,)``."""
        raise NotImplementedError

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        return self.forward_and_log_det(z, context)[0]

    def inverse(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Data -> latent without the log-det."""
        return self.inverse_and_log_det(x, context)[0]


class Inverse(Transform):
    """The inverse of a transform (swaps the two directions)."""

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_and_log_det(z, context)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.transform.forward_and_log_det(x, context)


class Compose(Transform):
    """Transforms applied in order ``transforms[0]`` first in the forward (sampling) direction."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        total = None
        for t in self.transforms:
            z, ld = t.forward_and_log_det(z, context)
            total = ld if total is None else total + ld
        return z, (z.new_zeros(z.shape[0]) if total is None else total)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        total = None
        for t in reversed(self.transforms):
            x, ld = t.inverse_and_log_det(x, context)
            total = ld if total is None else total + ld
        return x, (x.new_zeros(x.shape[0]) if total is None else total)
