"""Stochastic normalizing-flow layers (Wu, Köhler & Noé, NeurIPS 2020).

A stochastic layer keeps the `Transform` contract: ``forward_and_log_det(z, context)`` returns
``(x, delta)`` where ``x`` is the state after ``n_steps`` MCMC moves started from ``z`` and
``delta`` ``(B,)`` is the layer's **log path-weight increment**, which plays the role of
``log|det dx/dz|`` of a deterministic layer.

Sign convention (the one that makes `boltzgen.flows.Flow` work unchanged). For a flow
``z_0 ~ q_0``, ``z_t = f_t(z_{t-1})`` with deterministic or stochastic layers,
``Flow.sample_and_log_prob`` returns ``log_q = log q_0(z_0) - Σ_t delta_t`` and the importance
log-weight against an unnormalised target ``p`` is::

    log_w = log p(x) - log_q = log p(x) - log q_0(z_0) + Σ_t delta_t

with ``delta_t = log|det ∂f_t/∂z_{t-1}|`` for deterministic layers and, for stochastic layers
with forward kernel ``F_t`` and backward kernel ``B_t``::

    delta_t = log B_t(z_{t-1} | z_t) - log F_t(z_t | z_{t-1}).

Then ``E[exp(log_w)] = Z = ∫ p`` exactly, for any kernels and any step sizes, so
``logmeanexp(log_w)`` estimates ``log Z`` consistently and ``mean(exp(log_w))`` unbiasedly.
We take ``B_t = F_t`` (the same kernel run backwards in time), as Wu et al. do:

* for a kernel in detailed balance with ``p_λ`` (Metropolis, MALA, HMC with its Metropolis
  test) ``F(y|x) p_λ(x) = F(x|y) p_λ(y)``, hence ``delta = log p_λ(z_{t-1}) - log p_λ(z_t)``
  (zero for rejected moves);
* for unadjusted Langevin, ``delta = log K(z_t -> z_{t-1}) - log K(z_{t-1} -> z_t)`` with the
  Gaussian Langevin kernel ``K(x -> y) = N(y; x + ε ∇log p_λ(x), 2ε)``.

Each layer targets the interpolated density ``log p_λ(x) = (1 - λ) log ρ(x) + λ log p(x)``
between a reference density ``ρ`` (e.g. the flow's base distribution or any simple Gaussian) and
the target ``p``; a schedule of λ ending at 1 anneals from ``ρ`` to ``p``.

``inverse_and_log_det(x)`` runs the same kernel from ``x`` (sampling the backward path) and
returns ``log F / B`` of that step, which by the symmetry ``B = F`` is the same formula. Summed
by `Flow.log_prob`, ``exp(log q_0(z_0) + Σ delta)`` is then an unbiased estimate of the flow's
marginal density ``q(x)``; its log is a (Jensen-biased) stochastic estimate of ``log q(x)``.

Step sizes are stored as ``log_step_size`` (learnable parameter or buffer) and can be adapted
toward a target acceptance rate with `StochasticLayer.adapt` (the `Trainer` does so after every
step for layers with ``adaptive=True``); every layer records ``last_acceptance`` (mean
acceptance of its last call).

Circular dimensions (angles in [-π, π)) are wrapped after every move and the densities are read
through the wrap, i.e. the chain lives on the torus. Metropolis, MALA and HMC moves then keep
detailed balance with respect to the (periodic) ``p_λ``, so their weights stay exact; the ULA
path ratio uses the unwrapped Gaussian kernel, which neglects the periodic images (relative
error ``~exp(-π²/ε)``, nil for useful step sizes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from boltzgen.flows.base import Transform, wrap_circular
from boltzgen.sampling.mcmc import (
    MCMCStep,
    first_order_gradients,
    hmc_step,
    log_prob_and_grad,
    mala_step,
    metropolis_step,
    ula_step,
)

__all__ = [
    "HMCLayer",
    "LangevinLayer",
    "MALALayer",
    "MetropolisLayer",
    "StochasticLayer",
    "acceptance_rates",
    "adapt_step_sizes",
    "linear_lambdas",
    "make_snf_layers",
    "stochastic_layers",
]

LogDensity = nn.Module | Callable[[Tensor], Tensor]


def _as_log_prob(obj: LogDensity) -> Callable[[Tensor], Tensor]:
    return obj.log_prob if hasattr(obj, "log_prob") else obj  # type: ignore[union-attr]


def linear_lambdas(n_layers: int) -> list[float]:
    """Interpolation parameters ``λ_t = t / n_layers``, ``t = 1..n_layers`` (the last is 1)."""
    return [(t + 1) / n_layers for t in range(n_layers)]


class StochasticLayer(Transform):
    """Base class: ``n_steps`` moves of an MCMC kernel targeting ``p_λ``; see the module docstring.

    Args:
        target: Target density ``p``: a module with ``log_prob(x)`` or a callable,
            ``(B, D) -> (B,)``.
        reference: Reference density ``ρ``, same form (e.g. the flow's base distribution).
        lam: Interpolation parameter λ in [0, 1].
        step_size: Initial step size, scalar or ``(D,)``.
        n_steps: Kernel moves per call.
        target_acceptance: Acceptance rate that `adapt` steers toward.
        learn_step_size: Make ``log_step_size`` an ``nn.Parameter``.
        adapt_rate: Multiplicative adaptation rate of `adapt`.
        generator: Optional ``torch.Generator`` for reproducible moves.
        circular: ``(D,)`` bool mask of circular dimensions (angles in [-π, π)), wrapped after
            every move.
        adaptive: Let the `Trainer` call `adapt` after every optimisation step.
        second_order: Backpropagate through the kernels' gradient drift (needs second
            derivatives of ``log p``); False keeps the drift out of the training graph
            (`boltzgen.sampling.mcmc.first_order_gradients`), which the weights do not depend on.
    """

    default_acceptance: float = 0.5

    def __init__(
        self,
        target: LogDensity,
        reference: LogDensity,
        lam: float = 1.0,
        step_size: float | Tensor = 0.1,
        n_steps: int = 1,
        target_acceptance: float | None = None,
        learn_step_size: bool = False,
        adapt_rate: float = 0.1,
        generator: torch.Generator | None = None,
        circular: Sequence[bool] | Tensor | None = None,
        adaptive: bool = False,
        second_order: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.target = target
        self.reference = reference
        self.lam = float(lam)
        self.n_steps = int(n_steps)
        self.target_acceptance = (
            self.default_acceptance if target_acceptance is None else float(target_acceptance)
        )
        self.adapt_rate = float(adapt_rate)
        self.generator = generator
        log_step = torch.log(torch.as_tensor(step_size, dtype=torch.float64))
        if learn_step_size:
            self.log_step_size = nn.Parameter(log_step)
        else:
            self.register_buffer("log_step_size", log_step)
        self.last_acceptance = float("nan")
        self.adaptive = bool(adaptive)
        self.second_order = bool(second_order)
        mask = None if circular is None else torch.as_tensor(circular, dtype=torch.bool)
        if mask is not None and not bool(mask.any()):
            mask = None
        self.register_buffer("circular", mask)

    def wrap(self, x: Tensor) -> Tensor:
        """``x`` with its circular dimensions wrapped to [-π, π) (identity gradient)."""
        return wrap_circular(x, self.circular)

    def diagnostics(self) -> dict[str, float]:
        """Acceptance rate of the last call and the mean step size (for training logs)."""
        return {"acceptance": self.last_acceptance, "step_size": float(self.step_size.mean())}

    @property
    def step_size(self) -> Tensor:
        """Current step size (scalar or ``(D,)``)."""
        return torch.exp(self.log_step_size)

    def log_prob_lambda(self, x: Tensor) -> Tensor:
        """``log p_λ(x) = (1 - λ) log ρ(x) + λ log p(x)`` (unnormalised), ``(B, D) -> (B,)``."""
        x = self.wrap(x)
        if self.lam == 1.0:
            return _as_log_prob(self.target)(x)
        if self.lam == 0.0:
            return _as_log_prob(self.reference)(x)
        lam = self.lam
        return (1 - lam) * _as_log_prob(self.reference)(x) + lam * _as_log_prob(self.target)(x)

    def _move(
        self, x: Tensor, log_p: Tensor, grad: Tensor | None, step: Tensor
    ) -> tuple[MCMCStep, Tensor]:
        """One kernel move; return the step and its log path-weight increment ``(B,)``."""
        raise NotImplementedError

    _needs_grad: bool = True

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run ``n_steps`` moves from ``z`` ``(B, D)``; return ``(x, delta)``, delta ``(B,)``."""
        step = self.step_size.to(z.dtype)
        x = z
        order = contextlib.nullcontext() if self.second_order else first_order_gradients()
        with order:
            if self._needs_grad:
                log_p, grad = log_prob_and_grad(self.log_prob_lambda, x)
            else:
                log_p, grad = self.log_prob_lambda(x), None
            delta = z.new_zeros(z.shape[0])
            acc = 0.0
            for _ in range(self.n_steps):
                res, d = self._move(x, log_p, grad, step)
                x, log_p, grad = self.wrap(res.x), res.log_prob, res.grad
                delta = delta + d
                acc += float(res.accepted.to(torch.float64).mean())
        self.last_acceptance = acc / self.n_steps
        return x, delta

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sample the backward path from ``x``; return ``(z, log F/B)``, the same formula."""
        return self.forward_and_log_det(x, context)

    @torch.no_grad()
    def adapt(self, acceptance: float | None = None) -> float:
        """Scale the step size by ``exp(adapt_rate * (acceptance - target_acceptance))``.

        Args:
            acceptance: Observed acceptance rate; default ``last_acceptance``.

        Returns:
            The new step size (mean over dimensions).
        """
        acc = self.last_acceptance if acceptance is None else float(acceptance)
        if math.isfinite(acc):
            self.log_step_size.add_(self.adapt_rate * (acc - self.target_acceptance))
        return float(self.step_size.mean())


class MetropolisLayer(StochasticLayer):
    """Random-walk Metropolis moves (Gaussian proposal of std ``step_size``) targeting ``p_λ``.

    ``delta = log p_λ(z) - log p_λ(x)`` summed over moves (detailed balance).
    """

    default_acceptance = 0.3
    _needs_grad = False

    def _move(
        self, x: Tensor, log_p: Tensor, grad: Tensor | None, step: Tensor
    ) -> tuple[MCMCStep, Tensor]:
        res = metropolis_step(self.log_prob_lambda, x, log_p, step, self.generator)
        return res, log_p - res.log_prob


class MALALayer(StochasticLayer):
    """Metropolis-adjusted Langevin moves targeting ``p_λ``; ``step_size`` is ``ε`` (noise var 2ε).

    ``delta = log p_λ(z) - log p_λ(x)`` summed over moves (detailed balance).
    """

    default_acceptance = 0.57

    def _move(
        self, x: Tensor, log_p: Tensor, grad: Tensor | None, step: Tensor
    ) -> tuple[MCMCStep, Tensor]:
        res = mala_step(self.log_prob_lambda, x, log_p, grad, step, self.generator)
        return res, log_p - res.log_prob


class LangevinLayer(StochasticLayer):
    """Unadjusted overdamped Langevin moves toward ``p_λ`` (always accepted).

    ``delta = log K(x -> z) - log K(z -> x)`` per move, the Gaussian forward/backward path ratio.
    `adapt` has nothing to steer (acceptance is always 1) and leaves the step size alone.
    """

    default_acceptance = 1.0

    def _move(
        self, x: Tensor, log_p: Tensor, grad: Tensor | None, step: Tensor
    ) -> tuple[MCMCStep, Tensor]:
        res = ula_step(self.log_prob_lambda, x, log_p, grad, step, self.generator)
        return res, res.log_accept_ratio


class HMCLayer(StochasticLayer):
    """Hamiltonian Monte Carlo moves (leapfrog + Metropolis test) targeting ``p_λ``.

    Args:
        *args: As `StochasticLayer`.
        n_leapfrog: Leapfrog steps per move.
        mass: Diagonal mass, scalar or ``(D,)``.
        **kwargs: As `StochasticLayer`.

    ``delta = log p_λ(z) - log p_λ(x)`` summed over moves (detailed balance in ``x``).
    """

    default_acceptance = 0.65

    def __init__(
        self,
        *args: object,
        n_leapfrog: int = 5,
        mass: float | Tensor = 1.0,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.n_leapfrog = int(n_leapfrog)
        self.register_buffer("mass", torch.as_tensor(mass, dtype=torch.float64))

    def _move(
        self, x: Tensor, log_p: Tensor, grad: Tensor | None, step: Tensor
    ) -> tuple[MCMCStep, Tensor]:
        res = hmc_step(
            self.log_prob_lambda,
            x,
            log_p,
            grad,
            step,
            self.n_leapfrog,
            self.mass.to(x.dtype),
            self.generator,
        )
        return res, log_p - res.log_prob


def stochastic_layers(module: nn.Module) -> list[StochasticLayer]:
    """All `StochasticLayer` submodules of ``module`` (e.g. a `Flow`), in registration order."""
    return [m for m in module.modules() if isinstance(m, StochasticLayer)]


def acceptance_rates(module: nn.Module) -> list[float]:
    """``last_acceptance`` of every stochastic layer in ``module`` (NaN before the first call)."""
    return [layer.last_acceptance for layer in stochastic_layers(module)]


def adapt_step_sizes(module: nn.Module) -> list[float]:
    """Call `StochasticLayer.adapt` on every stochastic layer; return the new step sizes."""
    return [layer.adapt() for layer in stochastic_layers(module)]


LAYER_KINDS: dict[str, type[StochasticLayer]] = {
    "metropolis": MetropolisLayer,
    "mala": MALALayer,
    "langevin": LangevinLayer,
    "hmc": HMCLayer,
}


def make_snf_layers(
    kind: str,
    n_layers: int,
    target: LogDensity,
    reference: LogDensity,
    lambdas: str | Sequence[float] = "linear",
    n_steps: int = 1,
    step_size: float = 0.01,
    n_leapfrog: int = 5,
    circular: Sequence[bool] | Tensor | None = None,
    adaptive: bool = True,
    second_order: bool = False,
    target_acceptance: float | None = None,
) -> list[StochasticLayer]:
    """A chain of ``n_layers`` stochastic layers annealing from ``reference`` to ``target``.

    Args:
        kind: ``"metropolis"``, ``"mala"``, ``"langevin"`` (unadjusted) or ``"hmc"``.
        n_layers: Number of layers (>= 1).
        target: Target log density in the layers' space, ``(B, D) -> (B,)``.
        reference: Reference log density (e.g. the flow's own ``log_prob`` when the layers sit
            after the flow).
        lambdas: ``"linear"`` (``t / n_layers``), ``"one"`` (all layers target ``p``) or a
            list of ``n_layers`` values in [0, 1].
        n_steps: Kernel moves per layer.
        step_size: Initial step size (Metropolis: proposal std; MALA/ULA: ``ε``; HMC: leapfrog
            step), in the units of the layers' space.
        n_leapfrog: Leapfrog steps of HMC moves.
        circular: ``(D,)`` mask of circular dimensions.
        adaptive: Adapt step sizes toward the kernel's target acceptance during training.
        second_order: Backpropagate through the gradient drift (see `StochasticLayer`).
        target_acceptance: Override the kernel's default target acceptance.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown stochastic layer kind {kind!r}; use {', '.join(LAYER_KINDS)}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if lambdas == "linear":
        lams = linear_lambdas(n_layers)
    elif lambdas == "one":
        lams = [1.0] * n_layers
    elif isinstance(lambdas, str):
        raise ValueError(f"lambdas must be 'linear', 'one' or a list, got {lambdas!r}")
    else:
        lams = [float(v) for v in lambdas]
        if len(lams) != n_layers:
            raise ValueError(f"need {n_layers} lambdas, got {len(lams)}")
    cls = LAYER_KINDS[kind]
    extra: dict = {"n_leapfrog": n_leapfrog} if kind == "hmc" else {}
    return [
        cls(
            target,
            reference,
            lam=lam,
            step_size=step_size,
            n_steps=n_steps,
            target_acceptance=target_acceptance,
            circular=circular,
            adaptive=adaptive,
            second_order=second_order,
            **extra,
        )
        for lam in lams
    ]
