"""What the parts exchange, as structural types (`typing.Protocol`).

A target, a flow, a coordinate transform or a sampler need not inherit from anything: having the
methods below is enough. The type hints where the parts join (`boltzgen.pipeline.Run`, the
`Trainer`, `FlowSpaceTarget`, AIS) use these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "Bijection",
    "Density",
    "EnergyModel",
    "LogDensity",
    "LogProbFn",
    "SampleFilter",
    "Sampler",
]

#: An unnormalised log density as a plain function: ``(B, D) -> (B,)`` nats.
LogProbFn = Callable[[Tensor], Tensor]

#: A keep-mask of samples: Cartesian ``(B, n_atoms, 3)`` (or flat ``(B, D)``) -> ``(B,)`` bool.
SampleFilter = Callable[[Tensor], Tensor]


@runtime_checkable
class LogDensity(Protocol):
    """An (unnormalised) log density, e.g. a `BoltzmannTarget`: ``log_prob(x) -> (B,)`` nats."""

    def log_prob(self, x: Tensor) -> Tensor:  # noqa: D102
        ...


@runtime_checkable
class Sampler(Protocol):
    """Draws samples with their log density: ``sample_and_log_prob(n) -> (x, log q (n,))``."""

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:  # noqa: D102
        ...


@runtime_checkable
class Density(LogDensity, Sampler, Protocol):
    """A normalised model density that can also sample: a `Flow` or `BoltzmannGenerator`."""


@runtime_checkable
class Bijection(Protocol):
    """A transform with both fused directions, each returning ``(output, log|det J| (B,))``;
    forward is the sampling direction (latent -> configuration)."""

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        ...

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        ...


@runtime_checkable
class EnergyModel(LogDensity, Protocol):
    """A Boltzmann target: ``log_prob(x) = -U(x)/kT`` (regularised), with its energy function
    ``energy(x) -> (B,)`` kJ/mol and ``kT`` in kJ/mol."""

    kT: float

    def energy(self, x: Tensor) -> Tensor:  # noqa: D102
        ...
