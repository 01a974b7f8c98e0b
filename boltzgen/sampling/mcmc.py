"""Pure, batched MCMC kernels shared by stochastic flow layers (SNF) and AIS.

Every kernel advances a batch of ``B`` independent chains ``x`` of shape ``(B, D)`` by one move
that leaves the density ``p(x) ∝ exp(log_prob(x))`` invariant (except `ula_step`, which is
unadjusted). ``log_prob`` is any callable mapping ``(B, D)`` to ``(B,)``; the gradient kernels
differentiate it with autograd. Step sizes may be Python floats, 0-d tensors, ``(D,)`` tensors
(per dimension) or ``(B, 1)`` tensors (per chain). Randomness comes from an optional
``torch.Generator`` so that runs are reproducible.

Gradients: if ``x`` requires grad and grad mode is on, the returned state is differentiable with
respect to ``x`` and to tensor step sizes through the (reparametrised) proposals; accept/reject
decisions are not differentiated (as in Wu, Köhler & Noé, NeurIPS 2020).

References:
    Metropolis et al., J. Chem. Phys. 21, 1087 (1953); Roberts & Tweedie, Bernoulli 2, 341
    (1996) for MALA and ULA; Neal, "MCMC using Hamiltonian dynamics" (2011) for HMC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LogProbFn",
    "MCMCStep",
    "first_order_gradients",
    "hmc_step",
    "langevin_log_kernel",
    "log_prob_and_grad",
    "mala_step",
    "metropolis_step",
    "ula_step",
]

LogProbFn = Callable[[Tensor], Tensor]


class MCMCStep(NamedTuple):
    """Result of one kernel move.

    Attributes:
        x: New states ``(B, D)``.
        log_prob: ``log_prob(x)`` at the new states ``(B,)``.
        grad: ``∇ log_prob(x)`` at the new states ``(B, D)``, or ``None`` for gradient-free kernels.
        accepted: Whether each chain's proposal was accepted ``(B,)`` bool (all ``True`` for ULA).
        log_accept_ratio: Log Metropolis-Hastings ratio of the proposal ``(B,)`` (clamped at 0
            from above it is the log acceptance probability); the log path ratio for ULA.
    """

    x: Tensor
    log_prob: Tensor
    grad: Tensor | None
    accepted: Tensor
    log_accept_ratio: Tensor


_GRAPH = {"second_order": True}


@contextmanager
def first_order_gradients() -> Iterator[None]:
    """Within this context, kernel gradients ``∇ log p`` carry no graph of their own.

    `log_prob_and_grad` then returns ``log p`` with its graph but a detached gradient, so
    backpropagating through moves needs first derivatives of ``log p`` only (no double backward,
    e.g. through an energy with analytic once-differentiable forces). The moves stay exact MCMC;
    only the training gradient through the drift term is dropped.
    """
    old = _GRAPH["second_order"]
    _GRAPH["second_order"] = False
    try:
        yield
    finally:
        _GRAPH["second_order"] = old


def log_prob_and_grad(log_prob: LogProbFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate ``log_prob(x)`` ``(B,)`` and its gradient ``(B, D)`` with autograd.

    If ``x`` is part of a graph (requires grad, grad mode on) the gradient keeps its graph
    (``create_graph=True``, or detached inside `first_order_gradients`) so that callers can
    backpropagate through gradient-based moves; otherwise ``x`` is detached and nothing is
    retained. Works inside ``torch.no_grad()``.
    """
    if x.requires_grad and torch.is_grad_enabled():
        lp = log_prob(x)
        if _GRAPH["second_order"]:
            (g,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
        else:
            (g,) = torch.autograd.grad(lp.sum(), x, retain_graph=True)
        return lp, g
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        lp = log_prob(xd)
        (g,) = torch.autograd.grad(lp.sum(), xd)
    return lp.detach(), g.detach()


def _as_step(step: float | Tensor, x: Tensor) -> Tensor:
    return torch.as_tensor(step, dtype=x.dtype, device=x.device)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _accept(log_ratio: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(
        log_ratio.shape, dtype=log_ratio.dtype, device=log_ratio.device, generator=generator
    )
    # NaN ratios (proposal outside the support, failed energy) are rejected.
    return torch.log(u) < torch.nan_to_num(log_ratio.detach(), nan=-math.inf)


def _select(acc: Tensor, new: Tensor, old: Tensor) -> Tensor:
    a = acc.view(-1, *([1] * (new.dim() - 1)))
    return torch.where(a, new, old)


def metropolis_step(
    log_prob: LogProbFn,
    x: Tensor,
    log_p: Tensor,
    step_size: float | Tensor,
    generator: torch.Generator | None = None,
) -> MCMCStep:
    """Random-walk Metropolis: propose ``x' = x + step_size * ξ``, ``ξ ~ N(0, I)``.

    Args:
        log_prob: Log density (up to a constant), ``(B, D) -> (B,)``.
        x: Current states ``(B, D)``.
        log_p: ``log_prob(x)`` ``(B,)``.
        step_size: Proposal standard deviation (scalar, ``(D,)`` or ``(B, 1)``).
        generator: Optional random generator.

    Returns:
        `MCMCStep` (``grad`` is ``None``).
    """
    step = _as_step(step_size, x)
    y = x + step * _randn(x, generator)
    log_p_y = log_prob(y)
    log_ratio = log_p_y - log_p
    acc = _accept(log_ratio, generator)
    return MCMCStep(_select(acc, y, x), _select(acc, log_p_y, log_p), None, acc, log_ratio)


def langevin_log_kernel(
    x_to: Tensor, x_from: Tensor, grad_from: Tensor, step_size: Tensor
) -> Tensor:
    """Log density of the overdamped Langevin proposal ``x_to ~ N(x_from + ε ∇log p, 2ε I)``.

    Args:
        x_to: Destination ``(B, D)``.
        x_from: Origin ``(B, D)``.
        grad_from: ``∇ log p(x_from)`` ``(B, D)``.
        step_size: ``ε`` (scalar, ``(D,)`` or ``(B, 1)``), broadcastable to ``(B, D)``.

    Returns:
        ``log N(x_to; x_from + ε grad_from, 2ε)`` summed over dimensions, ``(B,)``.
    """
    eps = step_size.expand_as(x_to)
    r = x_to - x_from - eps * grad_from
    return (-0.25 * r * r / eps - 0.5 * torch.log(4 * math.pi * eps)).sum(-1)


def _langevin_proposal(
    log_prob: LogProbFn,
    x: Tensor,
    grad: Tensor,
    step: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = x + step * grad + torch.sqrt(2 * step) * _randn(x, generator)
    log_p_y, grad_y = log_prob_and_grad(log_prob, y)
    log_path = langevin_log_kernel(x, y, grad_y, step) - langevin_log_kernel(y, x, grad, step)
    return y, log_p_y, grad_y, log_path


def ula_step(
    log_prob: LogProbFn,
    x: Tensor,
    log_p: Tensor,
    grad: Tensor,
    step_size: float | Tensor,
    generator: torch.Generator | None = None,
) -> MCMCStep:
    """Unadjusted overdamped Langevin: ``x' = x + ε ∇log p(x) + sqrt(2ε) ξ`` (always accepted).

    Not exactly ``p``-invariant (bias O(ε)); `MCMCStep.log_accept_ratio` holds the log path
    ratio ``log K(x' -> x) - log K(x -> x')`` that the SNF layer uses as its weight.

    Args:
        log_prob: Log density (up to a constant), differentiable.
        x: Current states ``(B, D)``.
        log_p: ``log_prob(x)`` ``(B,)``.
        grad: ``∇ log_prob(x)`` ``(B, D)``.
        step_size: ``ε`` (scalar, ``(D,)`` or ``(B, 1)``).
        generator: Optional random generator.
    """
    step = _as_step(step_size, x)
    y, log_p_y, grad_y, log_path = _langevin_proposal(log_prob, x, grad, step, generator)
    acc = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return MCMCStep(y, log_p_y, grad_y, acc, log_path)


def mala_step(
    log_prob: LogProbFn,
    x: Tensor,
    log_p: Tensor,
    grad: Tensor,
    step_size: float | Tensor,
    generator: torch.Generator | None = None,
) -> MCMCStep:
    """Metropolis-adjusted Langevin: the `ula_step` proposal with a Metropolis-Hastings test.

    Args and returns as `ula_step`; ``log_accept_ratio`` is
    ``log p(x') - log p(x) + log K(x' -> x) - log K(x -> x')``.
    """
    step = _as_step(step_size, x)
    y, log_p_y, grad_y, log_path = _langevin_proposal(log_prob, x, grad, step, generator)
    log_ratio = log_p_y - log_p + log_path
    acc = _accept(log_ratio, generator)
    return MCMCStep(
        _select(acc, y, x), _select(acc, log_p_y, log_p), _select(acc, grad_y, grad), acc, log_ratio
    )


def hmc_step(
    log_prob: LogProbFn,
    x: Tensor,
    log_p: Tensor,
    grad: Tensor,
    step_size: float | Tensor,
    n_leapfrog: int = 5,
    mass: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> MCMCStep:
    """Hamiltonian Monte Carlo with a diagonal mass matrix and a Metropolis test.

    Momenta ``p ~ N(0, M)`` are drawn fresh, ``n_leapfrog`` leapfrog steps of size ``ε``
    integrate ``H = -log p(x) + p² / (2M)``, and the end point is accepted with probability
    ``min(1, exp(-ΔH))``. The kernel is reversible with respect to ``p(x)``.

    Args:
        log_prob: Log density (up to a constant), differentiable.
        x: Current states ``(B, D)``.
        log_p: ``log_prob(x)`` ``(B,)``.
        grad: ``∇ log_prob(x)`` ``(B, D)``.
        step_size: Leapfrog step ``ε`` (scalar, ``(D,)`` or ``(B, 1)``).
        n_leapfrog: Number of leapfrog steps (>= 1).
        mass: Diagonal mass, scalar or ``(D,)``.
        generator: Optional random generator.
    """
    if n_leapfrog < 1:
        raise ValueError(f"n_leapfrog must be >= 1, got {n_leapfrog}")
    step = _as_step(step_size, x)
    m = _as_step(mass, x)
    p0 = torch.sqrt(m) * _randn(x, generator)
    y, g, p = x, grad, p0 + 0.5 * step * grad
    for i in range(n_leapfrog):
        y = y + step * p / m
        log_p_y, g = log_prob_and_grad(log_prob, y)
        if i < n_leapfrog - 1:
            p = p + step * g
    p = p + 0.5 * step * g
    kin0 = (0.5 * p0 * p0 / m).sum(-1)
    kin1 = (0.5 * p * p / m).sum(-1)
    log_ratio = log_p_y - log_p - kin1 + kin0
    acc = _accept(log_ratio, generator)
    return MCMCStep(
        _select(acc, y, x), _select(acc, log_p_y, log_p), _select(acc, g, grad), acc, log_ratio
    )
