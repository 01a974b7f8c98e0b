"""`BoltzmannGenerator`: a flow over (internal) coordinates followed by a coordinate transform."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzgen.flows.base import Transform, circular_mask
from boltzgen.protocols import Bijection, Density, LogDensity

__all__ = ["BoltzmannGenerator", "FlowSpace", "FlowSpaceTarget", "MixtureDensity", "flow_space"]


class BoltzmannGenerator(nn.Module):
    """A sampler of configurations ``x = C(T(z))`` with its exact (or path-weighted) log density.

    ``log q(x) = log q_flow(y) - log|det dx/dy|`` where ``y = T(z)`` is the flow's sample and
    ``C`` the coordinate transform (e.g. `InternalCoordinates`, internal -> Cartesian). Any
    stochastic layers inside ``flow.transform`` keep the `Transform` contract (their log-weight
    increment in place of a log-det), so `sample_and_log_prob` then yields SNF path weights.

    Args:
        flow: A `Flow` (anything with ``sample_and_log_prob(n)`` and ``log_prob(y)``).
        coordinates: Optional `Transform` from the flow's space to the data space (Cartesian).
    """

    def __init__(
        self,
        flow: nn.Module,
        coordinates: Transform | None = None,
        stochastic: Sequence[Transform] | None = None,
    ) -> None:
        super().__init__()
        self.flow = flow
        self.coordinates = coordinates
        self.stochastic = nn.ModuleList(stochastic or [])
        self._counters: list[FlowSpaceTarget] = []

    def add_stochastic_layers(
        self, layers: Sequence[Transform], target: FlowSpaceTarget | None = None
    ) -> None:
        """Append SNF layers acting in the flow's space after the flow (before the coordinates).

        ``target`` (the `FlowSpaceTarget` the layers evaluate) is kept so that its evaluations
        enter `internal_target_evals`.
        """
        self.stochastic.extend(layers)
        if target is not None:
            self._counters.append(target)

    @property
    def internal_target_evals(self) -> int:
        """Target evaluations spent inside the model so far (by its stochastic layers)."""
        return sum(t.n_evals for t in self._counters)

    def flow_sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Samples in the flow's space after any stochastic layers: ``(y (n, D), log q (n,))``."""
        y, log_q = self.flow.sample_and_log_prob(n)
        for layer in self.stochastic:
            y, delta = layer.forward_and_log_det(y)
            log_q = log_q - delta
        return y, log_q

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples: ``(x (n, ...), log q(x) (n,))``, e.g. x ``(n, n_atoms, 3)`` nm.

        With stochastic layers ``log q`` is the SNF path log-weight (see
        `boltzgen.sampling.stochastic`).
        """
        y, log_q = self.flow_sample_and_log_prob(n)
        if self.coordinates is None:
            return y, log_q
        x, ld = self.coordinates.forward_and_log_det(y)
        return x, log_q - ld

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density ``(batch,)`` of data ``x`` (through the inverse transforms).

        With stochastic layers this runs their backward path and is a stochastic estimate.
        """
        ld = x.new_zeros(x.shape[0])
        y = x
        if self.coordinates is not None:
            y, ld = self.coordinates.inverse_and_log_det(x)
        for layer in reversed(self.stochastic):
            y, delta = layer.inverse_and_log_det(y)
            ld = ld + delta
        return self.flow.log_prob(y) + ld

    @torch.no_grad()
    def sample(self, n: int, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples without gradients, in batches of ``batch_size``: ``(x, log_q)``."""
        batch_size = n if batch_size is None else max(1, int(batch_size))
        xs, lqs = [], []
        for start in range(0, n, batch_size):
            x, lq = self.sample_and_log_prob(min(batch_size, n - start))
            xs.append(x)
            lqs.append(lq)
        return torch.cat(xs), torch.cat(lqs)

    def forward(self, x: Tensor) -> Tensor:
        """Alias of `log_prob`."""
        return self.log_prob(x)


class FlowSpaceTarget(nn.Module):
    """A target density carried into the flow's space through the coordinate transform.

    ``log p_Y(y) = log p(C(y)) + log|det dC/dy|`` for ``y`` ``(B, D)`` in the flow's space
    (e.g. internal coordinates) and ``C`` the coordinate transform (internal -> Cartesian). This
    is the density that MCMC moves inside the flow (SNF layers) and AIS (FAB) target. Counts the
    rows it evaluates in ``n_evals``.

    Args:
        target: Has ``log_prob(x) -> (B,)`` on the data space (e.g. a `BoltzmannTarget`).
        coordinates: The `Transform` flow space -> data space (None: the identity).
    """

    def __init__(self, target: LogDensity, coordinates: Bijection | None = None) -> None:
        super().__init__()
        self.target = target
        self.coordinates = coordinates
        self.n_evals = 0

    def log_prob(self, y: Tensor) -> Tensor:
        """Unnormalised log density ``(B,)`` of flow-space points ``y`` ``(B, D)``."""
        self.n_evals += int(y.shape[0])
        if self.coordinates is None:
            return self.target.log_prob(y)
        x, ld = self.coordinates.forward_and_log_det(y)
        return self.target.log_prob(x) + ld

    def forward(self, y: Tensor) -> Tensor:
        """Alias of `log_prob`."""
        return self.log_prob(y)


@dataclass
class FlowSpace:
    """What a sampler in the flow's space (AIS, FAB) needs from a model and its target.

    Attributes:
        flow: The model's flow (the model itself when it has no ``flow`` attribute).
        coordinates: The coordinate transform flow space -> data space, or None.
        target: The target carried into the flow's space (`FlowSpaceTarget`).
        dim: Dimension D of the flow's space.
        circular: ``(D,)`` bool mask of angular dimensions, or None.
        log_p_floor: ``-energy_cut`` of a `BoltzmannTarget` (below it AIS treats a point as
            outside the support), or None.
    """

    flow: Density
    coordinates: Bijection | None
    target: FlowSpaceTarget
    dim: int
    circular: Tensor | None
    log_p_floor: float | None


def flow_space(model: Density, target: LogDensity) -> FlowSpace:
    """The `FlowSpace` of a `BoltzmannGenerator` (or a bare flow) and its target."""
    flow = getattr(model, "flow", model)
    coords = getattr(model, "coordinates", None)
    domains = getattr(coords, "domains", None)
    cut = getattr(target, "energy_cut", None)
    return FlowSpace(
        flow=flow,
        coordinates=coords,
        target=FlowSpaceTarget(target, coords),
        dim=int(flow.base.dim),
        circular=None if domains is None else circular_mask(domains),
        log_p_floor=None if cut is None else -float(cut),
    )


class MixtureDensity(nn.Module):
    """A mixture ``q(y) = sum_k f_k q_k(y)`` of densities on one space (e.g. the flows of several
    runs that share a coordinate transform): the proposal of AIS with a mixture model.

    ``sample_and_log_prob(n)`` draws every sample's component from the categorical
    distribution of ``fractions`` (so the samples are exactly iid from the mixture) and returns
    the mixture's log density at each, rows in random order.

    Args:
        densities: Each has ``sample_and_log_prob(n) -> (y (n, D), log_q (n,))`` and
            ``log_prob(y) -> (B,)``.
        fractions: Mixture weights, positive, summing to 1.
    """

    def __init__(self, densities: Sequence[Density], fractions: Sequence[float]) -> None:
        super().__init__()
        if len(densities) != len(fractions) or not densities:
            raise ValueError("MixtureDensity needs one fraction per density")
        f = torch.tensor([float(v) for v in fractions], dtype=torch.float64)
        if bool((f <= 0).any()) or abs(float(f.sum()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
        self.densities = nn.ModuleList(densities)
        self.register_buffer("fractions", f)

    def log_prob(self, y: Tensor) -> Tensor:
        """``log sum_k f_k q_k(y)`` ``(B,)`` for ``y`` ``(B, D)``."""
        log_f = self.fractions.log().to(y)
        parts = [lf + d.log_prob(y) for lf, d in zip(log_f, self.densities, strict=True)]
        return torch.logsumexp(torch.stack(parts), 0)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` mixture samples ``(n, D)`` and their mixture log densities ``(n,)``."""
        labels = torch.multinomial(self.fractions.float().cpu(), n, replacement=True)
        counts = torch.bincount(labels, minlength=len(self.densities)).tolist()
        ys = [d.sample_and_log_prob(m)[0] for d, m in zip(self.densities, counts) if m > 0]
        y = torch.cat(ys)[torch.randperm(n, device=ys[0].device)]
        return y, self.log_prob(y)
