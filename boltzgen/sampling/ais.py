"""Annealed importance sampling (AIS) from a flow's density ``q`` toward ``q^(1-α) p^α``.

Neal, "Annealed importance sampling", Statistics and Computing 11, 125 (2001); the path and the
target ``p²/q`` (``α = 2``) follow FAB (Midgley et al., ICLR 2023).

Chains start from samples ``x_0 ~ q`` and visit the geometric path

    log π_β(x) = (1 - β) log q(x) + β log f(x),   log f = α log p + (1 - α) log q,

for ``0 = β_0 < β_1 < ... < β_K < β_{K+1} = 1`` (``K = n_intermediate``). Before the move at
``β_k`` the log-weight gains ``log π_{β_k}(x) - log π_{β_{k-1}}(x) = (β_k - β_{k-1}) α (log p -
log q)(x)``; each move (HMC or random-walk Metropolis, `boltzgen.sampling.mcmc`) leaves ``π_{β_k}``
invariant; the last increment brings ``β`` to 1. Then ``E[exp(log_w)] = Z_f / Z_q`` exactly for
any step sizes, and ``log_w`` are the importance log-weights of the final samples against ``f``
(with ``α = 1`` against ``p``, and ``logmeanexp(log_w)`` estimates ``log Z_p``).

Circular dimensions (angles on [-pi, pi)) are wrapped before every density evaluation and after
every move; the densities must be periodic there, so HMC runs on the circle's cover exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from boltzgen.flows.base import wrap_circular
from boltzgen.sampling.mcmc import hmc_step, metropolis_step

__all__ = ["AISResult", "AnnealedImportanceSampler", "ais", "ais_betas"]

LogProbFn = Callable[[Tensor], Tensor]


class AISResult(NamedTuple):
    """Output of one AIS run over ``B`` chains in ``D`` dimensions.

    Attributes:
        x: Final samples ``(B, D)`` (circular dims wrapped to [-pi, pi)).
        log_w: AIS log-weights ``(B,)`` against ``f = q^(1-α) p^α`` (detached).
        log_q: ``log q(x)`` at the final samples ``(B,)``.
        log_p: ``log p(x)`` at the final samples ``(B,)``.
        log_w_flow: ``log p(x_0) - log q(x_0)`` of the starting flow samples ``(B,)``.
        acceptance: Mean acceptance of the moves at each intermediate distribution ``(K,)``.
        n_target_evals: Rows on which ``log p`` was evaluated (start + every proposal).
        level_log_w: ``(K + 1, B)`` the log-weights accumulated up to each intermediate
            distribution ``π_k`` (k = 1..K; importance weights of the chains for ``π_k``, whose
            mean estimates ``Z_k / Z_q``) and, last, ``log_w``: their ESS shows where along the
            schedule the weights degenerate.
    """

    x: Tensor
    log_w: Tensor
    log_q: Tensor
    log_p: Tensor
    log_w_flow: Tensor
    acceptance: Tensor
    n_target_evals: int
    level_log_w: Tensor | None = None


def ais_betas(
    n_intermediate: int,
    spacing: str = "linear",
    beta_min: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Annealing schedule ``(K + 2,)`` from 0 to 1 with ``K = n_intermediate`` inner points.

    ``"linear"``: ``β_k = k / (K + 1)``. ``"geometric"``: ``β_k = β_min^(1 - k/(K+1))`` for
    ``k >= 1`` (denser near 0, where ``q`` dominates), ``β_0 = 0``.
    """
    if n_intermediate < 0:
        raise ValueError(f"n_intermediate must be >= 0, got {n_intermediate}")
    k = torch.arange(n_intermediate + 2, dtype=dtype)
    if spacing == "linear":
        return k / (n_intermediate + 1)
    if spacing == "geometric":
        if not 0 < beta_min < 1:
            raise ValueError(f"beta_min must be in (0, 1), got {beta_min}")
        b = beta_min ** (1 - k / (n_intermediate + 1))
        b[0] = 0.0
        return b
    raise ValueError(f"spacing must be 'linear' or 'geometric', got {spacing!r}")


def ais(
    x: Tensor,
    log_q_fn: LogProbFn,
    log_p_fn: LogProbFn,
    betas: Tensor,
    step_size: Tensor,
    alpha: float = 2.0,
    transition: str = "hmc",
    n_leapfrog: int = 5,
    n_steps: int = 1,
    circular: Tensor | None = None,
    log_q: Tensor | None = None,
    log_p_floor: float | None = None,
) -> AISResult:
    """Run AIS from samples ``x ~ q`` toward ``f = q^(1-α) p^α`` (see the module docstring).

    Args:
        x: Starting samples ``(B, D)`` drawn from ``q``.
        log_q_fn: ``log q``, ``(B, D) -> (B,)``, differentiable in ``x`` for HMC (e.g. a flow's
            ``log_prob``); parameters receive no gradient.
        log_p_fn: Unnormalised target ``log p``, ``(B, D) -> (B,)``, differentiable for HMC.
        betas: Schedule ``(K + 2,)`` from 0 to 1 (`ais_betas`).
        step_size: Per intermediate distribution ``(K,)``, ``(K, 1)`` or ``(K, D)`` (HMC
            leapfrog step or Metropolis proposal standard deviation).
        alpha: Exponent of ``p`` in ``f`` (2: FAB's ``p²/q``; 1: plain AIS toward ``p``).
        transition: ``"hmc"`` or ``"metropolis"``.
        n_leapfrog: Leapfrog steps per HMC move.
        n_steps: Moves per intermediate distribution.
        circular: ``(D,)`` bool mask of angular dimensions (wrapped to [-pi, pi)).
        log_q: ``log q(x)`` ``(B,)`` if already known (saves one flow evaluation).
        log_p_floor: Points with ``log p`` below it count as outside the support (``log p =
            -inf``: moves there are rejected, chains starting there get weight 0). Needed when
            ``p`` is a regularised Boltzmann density whose log grows only logarithmically in
            the energy above a cut (`BoltzmannTarget`): ``p²/q`` is then not normalisable, and
            HMC toward it runs away to absurd configurations.

    Returns:
        `AISResult`; all tensors detached.
    """
    if transition not in ("hmc", "metropolis"):
        raise ValueError(f"transition must be 'hmc' or 'metropolis', got {transition!r}")
    n_inner = betas.numel() - 2
    if step_size.shape[0] != n_inner:
        raise ValueError(f"step_size needs {n_inner} rows, got shape {tuple(step_size.shape)}")
    if circular is not None:
        circular = circular.to(x.device)
    hmc = transition == "hmc"
    x = wrap_circular(x.detach(), circular)
    evals = 0
    stash: dict[str, Tensor] = {}

    def floor(lp: Tensor) -> Tensor:
        """``log p`` with points below ``log_p_floor`` moved outside the support (-inf)."""
        if log_p_floor is None:
            return lp
        return torch.where(lp < log_p_floor, torch.full_like(lp, -math.inf), lp)

    def components(y: Tensor) -> tuple[Tensor, Tensor]:
        """``log q``, ``log p`` at ``y`` (and, for HMC, their gradients in ``stash``)."""
        nonlocal evals
        evals += y.shape[0]
        if not hmc:
            with torch.no_grad():
                yw = wrap_circular(y.detach(), circular)
                lq_y, lp_y = log_q_fn(yw), log_p_fn(yw)
        else:
            with torch.enable_grad():
                yd = y.detach().requires_grad_(True)
                yw = wrap_circular(yd, circular)
                lq_y, lp_y = log_q_fn(yw), log_p_fn(yw)
                (stash["gq"],) = torch.autograd.grad(lq_y.sum(), yd, retain_graph=True)
                (stash["gp"],) = torch.autograd.grad(lp_y.sum(), yd)
        stash["lq"], stash["lp"] = lq_y.detach(), floor(lp_y.detach())
        return stash["lq"], stash["lp"]

    if hmc:
        lq, lp = components(x)
        gq, gp = stash["gq"], stash["gp"]
    else:
        with torch.no_grad():
            lq = log_q_fn(x).detach() if log_q is None else log_q.detach()
            lp = floor(log_p_fn(x).detach())
        evals += x.shape[0]
    log_w_flow = lp - lq
    log_w = torch.zeros_like(lq)
    acc_means, levels = [], []
    beta_vals = [float(v) for v in betas]
    for k in range(1, n_inner + 1):
        beta = beta_vals[k]
        log_w = log_w + (beta - beta_vals[k - 1]) * alpha * (lp - lq)
        levels.append(log_w)
        scale = alpha * beta

        def log_pi(y: Tensor, scale: float = scale) -> Tensor:
            # value log π_β(y); its autograd gradient is the stashed exact one (a linear term
            # carries it), so hmc_step's backward pass costs nothing extra
            lq_y, lp_y = components(y)
            val = lq_y + scale * (lp_y - lq_y)
            if not hmc or not y.requires_grad:
                return val
            g = stash["gq"] + scale * (stash["gp"] - stash["gq"])
            return val + ((y - y.detach()) * g).sum(-1)

        step = step_size[k - 1].to(x)
        if step.dim() == 0:
            step = step.reshape(1)
        cur = lq + scale * (lp - lq)
        acc_k = torch.zeros((), dtype=x.dtype, device=x.device)
        for _ in range(n_steps):
            if hmc:
                grad = gq + scale * (gp - gq)
                res = hmc_step(log_pi, x, cur, grad, step, n_leapfrog)
                a = res.accepted[:, None]
                gq = torch.where(a, stash["gq"], gq)
                gp = torch.where(a, stash["gp"], gp)
            else:
                res = metropolis_step(log_pi, x, cur, step)
            a = res.accepted
            lq = torch.where(a, stash["lq"], lq)
            lp = torch.where(a, stash["lp"], lp)
            x = wrap_circular(res.x.detach(), circular)
            cur = res.log_prob.detach()
            acc_k = acc_k + a.to(x.dtype).mean() / n_steps
        acc_means.append(acc_k)
    log_w = log_w + (1.0 - beta_vals[n_inner]) * alpha * (lp - lq)
    acceptance = torch.stack(acc_means) if acc_means else x.new_zeros(0)
    level_log_w = torch.stack([*levels, log_w]).detach()
    return AISResult(x, log_w.detach(), lq, lp, log_w_flow, acceptance.detach(), evals, level_log_w)


class AnnealedImportanceSampler(nn.Module):
    """AIS with stored, adapted step sizes (one per intermediate distribution, optionally per dim).

    After every `forward` call the log step size of level ``k`` moves by
    ``adapt_rate * (acceptance_k - target_acceptance)``, so that the next call runs closer to the
    target acceptance (the step sizes are constant within a call, which keeps AIS exact). With
    ``per_dim=True`` the step of dimension ``d`` is additionally scaled by the spread of
    dimension ``d`` of the previous call's final samples (a diagonal preconditioner: the robust
    spread, interquartile range / 1.349, or for angles the circular spread ``sqrt(-2 log R)``),
    which matters when coordinates have very different scales (bond lengths vs torsions). Step
    sizes live in buffers, so they are in the state dict.

    Args:
        dim: Dimension D.
        n_intermediate: Number K of intermediate distributions.
        spacing: ``"linear"`` or ``"geometric"`` (`ais_betas`).
        transition: ``"hmc"`` or ``"metropolis"``.
        n_leapfrog: Leapfrog steps per HMC move.
        n_steps: Moves per intermediate distribution.
        step_size: Initial step size.
        per_dim: Per-dimension step sizes (diagonal preconditioning) instead of a global one.
        target_acceptance: Acceptance the step sizes are adapted toward.
        adapt_rate: Rate of the log step-size update (0: no adaptation).
        alpha: Exponent of ``p`` in the AIS target (2 for FAB).
        circular: ``(D,)`` bool mask of angular dimensions.
        log_p_floor: See `ais`.
    """

    def __init__(
        self,
        dim: int,
        n_intermediate: int = 2,
        spacing: str = "linear",
        transition: str = "hmc",
        n_leapfrog: int = 5,
        n_steps: int = 1,
        step_size: float = 0.1,
        per_dim: bool = False,
        target_acceptance: float = 0.65,
        adapt_rate: float = 1.0,
        alpha: float = 2.0,
        circular: Tensor | None = None,
        log_p_floor: float | None = None,
    ) -> None:
        super().__init__()
        self.log_p_floor = log_p_floor
        if not step_size > 0 or not 0 < target_acceptance < 1:
            raise ValueError("need step_size > 0 and 0 < target_acceptance < 1")
        self.transition = transition
        self.n_leapfrog = int(n_leapfrog)
        self.n_steps = int(n_steps)
        self.target_acceptance = float(target_acceptance)
        self.adapt_rate = float(adapt_rate)
        self.alpha = float(alpha)
        self.per_dim = bool(per_dim)
        self.register_buffer("betas", ais_betas(n_intermediate, spacing))
        self.register_buffer("log_step_size", torch.full((n_intermediate, 1), math.log(step_size)))
        self.register_buffer("dim_scale", torch.ones(dim))
        circ = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.bool()
        if circ.shape != (dim,):
            raise ValueError(f"circular must have shape ({dim},), got {tuple(circ.shape)}")
        self.register_buffer("circular", circ.clone())
        self.last_acceptance: Tensor | None = None

    @property
    def step_sizes(self) -> Tensor:
        """Current step sizes ``(K, D)`` (``(K, 1)`` without per-dimension scaling)."""
        step = self.log_step_size.exp()
        return step * self.dim_scale if self.per_dim else step

    def forward(
        self,
        x: Tensor,
        log_q_fn: LogProbFn,
        log_p_fn: LogProbFn,
        log_q: Tensor | None = None,
        adapt: bool = True,
    ) -> AISResult:
        """Run `ais` from ``x ~ q`` (``(B, D)``) and, with ``adapt``, `adapt` the step sizes
        for the next call to this run's acceptance and final samples."""
        res = ais(
            x,
            log_q_fn,
            log_p_fn,
            self.betas.to(x.dtype),
            self.step_sizes.to(x.dtype),
            alpha=self.alpha,
            transition=self.transition,
            n_leapfrog=self.n_leapfrog,
            n_steps=self.n_steps,
            circular=self.circular,
            log_q=log_q,
            log_p_floor=self.log_p_floor,
        )
        self.last_acceptance = res.acceptance
        if adapt:
            self.adapt(
                res.acceptance, res.x[torch.isfinite(res.x).all(-1) & torch.isfinite(res.log_w)]
            )
        return res

    @torch.no_grad()
    def adapt(self, acceptance: Tensor, x: Tensor) -> None:
        """Move the step sizes toward the target acceptance, and (``per_dim``) rescale them by
        the spread of ``x``.

        Args:
            acceptance: Mean acceptance per intermediate distribution ``(K,)``.
            x: Final samples ``(B, D)`` with finite coordinates and log-weight (data-parallel
                FAB passes all ranks' samples, so every rank adapts alike).
        """
        if self.adapt_rate > 0 and acceptance.numel() > 0:
            delta = self.adapt_rate * (acceptance - self.target_acceptance)
            self.log_step_size += delta.to(self.log_step_size)[:, None]
        if self.per_dim and x.shape[0] > 3:
            xf = x.double()
            # robust spread (interquartile range / 1.349): outliers do not inflate steps
            qs = torch.quantile(xf, torch.tensor([0.25, 0.75]).to(xf), dim=0)
            std = (qs[1] - qs[0]) / 1.349
            r = torch.sqrt(torch.cos(xf).mean(0) ** 2 + torch.sin(xf).mean(0) ** 2)
            circ_std = torch.sqrt(-2 * torch.log(r.clamp(min=1e-12))).clamp(max=math.pi)
            std = torch.where(self.circular, circ_std, std).clamp(min=1e-6)
            self.dim_scale.copy_(std.to(self.dim_scale))
