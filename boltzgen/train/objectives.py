"""Training objectives of Boltzmann generators as free functions: reverse, forward, mixed and
reweighted KL.

All return an `ObjectiveResult` holding the differentiable loss and the diagnostics a trainer
logs (importance log-weights, target evaluations, dropped samples). Non-finite samples,
densities or energies are dropped and counted; they never enter the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzgen.protocols import Density, LogDensity, SampleFilter, Sampler

#: Reduces per-sample losses ``(n,)`` to a scalar loss (``torch.mean`` by default).
BatchMean = Callable[[Tensor], Tensor]

__all__ = [
    "BatchMean",
    "ObjectiveResult",
    "batch_ess_fraction",
    "filter_rows",
    "forward_kl",
    "log_ess",
    "mixed_kl",
    "reverse_kl",
    "reweighted_kl",
]


@dataclass
class ObjectiveResult:
    """Loss and diagnostics of one objective evaluation.

    Attributes:
        loss: Scalar loss (differentiable); 0 (no gradient) when nothing valid remained.
        log_weights: ``(n_valid,)`` detached ``log p(x) - log q(x)`` of the reverse-KL samples
            (empty for the forward KL).
        n_target_evals: Number of target (energy) evaluations spent.
        n_nonfinite: Samples dropped for non-finite coordinates, densities or energies.
        n_filtered: Samples dropped by the sample filter (e.g. D-form chirality).
        n_used: Samples that entered the loss.
    """

    loss: Tensor
    log_weights: Tensor
    n_target_evals: int = 0
    n_nonfinite: int = 0
    n_filtered: int = 0
    n_used: int = 0


def log_ess(log_w: Tensor) -> Tensor:
    """Log of the Kish effective sample size ``(sum w)^2 / sum w^2`` (a count, log space)."""
    if log_w.numel() == 0:
        return log_w.new_tensor(float("-inf"))
    return 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)


def batch_ess_fraction(log_w: Tensor, n: int | None = None) -> float:
    """Kish ESS of ``log_w`` ``(m,)`` as a fraction of ``n`` draws (default ``m``); NaN if empty.

    ``n`` larger than ``m`` counts draws that were dropped (non-finite, filtered) as zero weight.
    """
    n = log_w.numel() if n is None else n
    if log_w.numel() == 0 or n < 1:
        return math.nan
    return float(log_ess(log_w.detach().double()).exp()) / n


def filter_rows(
    ok: Tensor, x: Tensor, sample_filter: Callable[[Tensor], Tensor] | None
) -> tuple[Tensor, int]:
    """Narrow the keep-mask ``ok`` ``(n,)`` to rows of ``x`` that pass ``sample_filter``.

    The filter sees only the rows already kept (detached, no gradient). Returns the new mask and
    the number of rows it dropped; without a filter ``ok`` comes back unchanged.
    """
    if sample_filter is None or not bool(ok.any()):
        return ok, 0
    keep = torch.zeros_like(ok)
    with torch.no_grad():
        keep[ok] = torch.as_tensor(sample_filter(x[ok].detach()), device=ok.device)
    return keep, int((ok & ~keep).sum())


def _rows_finite(x: Tensor) -> Tensor:
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(-1)


def _target_log_prob(target: LogDensity, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(log_p, ok, n_evals)`` with ``ok`` False for rows to drop (their log_p set to 0).

    A row is dropped if its log density is not finite or, for a target with an ``energy_cut``
    (`BoltzmannTarget`), its reduced energy reached the cut (NaN energies and overlapping atoms
    end up there). If some log density is not finite and ``x`` carries gradients, the finite
    rows are evaluated again on their own so that no NaN enters the backward pass.
    """
    log_p = target.log_prob(x)
    evals = x.shape[0]
    finite = torch.isfinite(log_p)
    if not bool(finite.all()) and bool(finite.any()) and x.requires_grad:
        keep = finite.nonzero().flatten()
        sub = target.log_prob(x[keep])
        evals += keep.numel()
        log_p = torch.zeros_like(log_p).index_put((keep,), sub)
    ok = finite
    cut = getattr(target, "energy_cut", None)
    if cut is not None:
        ok = ok & (-log_p.detach() < cut)
    return torch.where(ok, log_p, torch.zeros_like(log_p)), ok, evals


def _reverse_parts(
    model: Sampler, target: LogDensity, n: int, sample_filter: SampleFilter | None
) -> tuple[Tensor, Tensor, Tensor, int, int, int]:
    """Draw ``n`` model samples; return the valid ones as ``(x, log_q, log_p, evals,
    n_nonfinite, n_filtered)`` (``x``, ``log_q`` with gradients, ``log_p`` of the target)."""
    x, log_q = model.sample_and_log_prob(n)
    ok = _rows_finite(x) & torch.isfinite(log_q)
    n_nonfinite = int((~ok).sum())
    ok, n_filtered = filter_rows(ok, x, sample_filter)
    idx = ok.nonzero().flatten()
    evals = 0
    x_ok, lq_ok, log_p = x[idx], log_q[idx], log_q.new_zeros(0)
    if idx.numel() > 0:
        log_p, p_ok, evals = _target_log_prob(target, x_ok)
        n_nonfinite += int((~p_ok).sum())
        x_ok, lq_ok, log_p = x_ok[p_ok], lq_ok[p_ok], log_p[p_ok]
    return x_ok, lq_ok, log_p, evals, n_nonfinite, n_filtered


def reverse_kl(
    model: Sampler,
    target: LogDensity,
    n: int,
    sample_filter: SampleFilter | None = None,
    mean: BatchMean | None = None,
) -> ObjectiveResult:
    """Reverse KL ``E_q[log q(x) - log p(x)]`` (up to log Z) from ``n`` model samples.

    With stochastic (SNF) layers in the model, ``log q`` is the path log-weight the layers
    return, and the same estimator is the SNF path-KL bound (Wu, Koehler & Noe 2020).

    Args:
        model: Has ``sample_and_log_prob(n) -> (x (n, ...), log_q (n,))``.
        target: Has ``log_prob(x) -> (n,)``, the unnormalised log density.
        n: Batch size.
        sample_filter: ``x -> (n,) bool``, True to keep (e.g. L-form chirality); dropped
            samples are counted and cost no target evaluation.
        mean: Reduces the per-sample losses to the loss (default ``torch.mean``; data-parallel
            training passes this rank's share of the mean over all ranks,
            `boltzgen.train.distributed.Shards.mean`, which is then called on every rank even
            when nothing valid remained).

    Returns:
        `ObjectiveResult` with the mean over valid samples as loss.
    """
    _, lq_ok, log_p, evals, n_nonfinite, n_filtered = _reverse_parts(
        model, target, n, sample_filter
    )
    if lq_ok.numel() == 0 and mean is None:
        zero = lq_ok.sum() * 0
        return ObjectiveResult(zero, lq_ok.new_zeros(0), evals, n_nonfinite, n_filtered, 0)
    loss = (mean or torch.mean)(lq_ok - log_p)
    return ObjectiveResult(
        loss, (log_p - lq_ok).detach(), evals, n_nonfinite, n_filtered, int(lq_ok.numel())
    )


def forward_kl(model: LogDensity, x_data: Tensor, mean: BatchMean | None = None) -> ObjectiveResult:
    """Forward KL ``-E_data[log q(x)]`` (up to the data entropy) on a batch ``x_data``.

    Args:
        model: Has ``log_prob(x) -> (n,)``.
        x_data: ``(n, ...)`` samples from the target (e.g. MD frames, nm).
        mean: As in `reverse_kl`.
    """
    ok = _rows_finite(x_data)
    log_q = model.log_prob(x_data[ok])
    fin = torch.isfinite(log_q)
    n_bad = int((~ok).sum()) + int((~fin).sum())
    if not bool(fin.any()) and mean is None:
        zero = (log_q.nan_to_num(0.0) * 0).sum()
        return ObjectiveResult(zero, log_q.new_zeros(0), 0, n_bad, 0, 0)
    loss = -(mean or torch.mean)(log_q[fin])
    return ObjectiveResult(loss, log_q.new_zeros(0), 0, n_bad, 0, int(fin.sum()))


def mixed_kl(
    model: Density,
    target: LogDensity,
    n: int,
    x_data: Tensor,
    alpha: float = 0.5,
    sample_filter: SampleFilter | None = None,
    mean: BatchMean | None = None,
) -> ObjectiveResult:
    """``alpha * reverse_kl + (1 - alpha) * forward_kl`` (Noe et al. 2019 mix the two).

    Diagnostics are those of the reverse part; dropped counts are summed. ``mean`` as in
    `reverse_kl`.
    """
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r = reverse_kl(model, target, n, sample_filter, mean)
    f = forward_kl(model, x_data, mean)
    return ObjectiveResult(
        alpha * r.loss + (1 - alpha) * f.loss,
        r.log_weights,
        r.n_target_evals,
        r.n_nonfinite + f.n_nonfinite,
        r.n_filtered,
        r.n_used + f.n_used,
    )


def reweighted_kl(
    model: Density,
    target: LogDensity,
    n: int,
    alpha: float = 0.5,
    power: float = 1.0,
    sample_filter: SampleFilter | None = None,
    mean: BatchMean | None = None,
    log_normalizer: Callable[[Tensor], Tensor] | None = None,
) -> ObjectiveResult:
    """``alpha * reverse_kl + (1 - alpha) * `` a self-normalised importance-weighted forward KL
    on the same model samples.

    The forward part is ``-sum_i wbar_i log q(x_i)`` with ``x_i`` the batch's samples taken as
    fixed points (detached), ``log q`` evaluated again through the model's inverse (with
    gradients), and ``wbar_i = w_i^power / sum_j w_j^power``, ``w = p(x) / q(x)`` detached.
    ``power = 1`` estimates the gradient of the forward KL ``KL(p || q)`` (mass covering: it
    pulls ``q`` up where samples are under-weighted by it, the heavy tail of the weights that
    reverse KL leaves); ``power = 2`` that of the alpha-2 divergence ``log E_q[w^2]``, i.e. of
    ``-log ESS``. With a target at another temperature than the model was trained at this is
    the reweighted forward KL of temperature-annealed Boltzmann generators (Schopmans &
    Friederich 2025). Costs one more pass of the model (``log_prob``) per step.

    Args:
        model: Has ``sample_and_log_prob(n)`` and ``log_prob(x)``.
        target: The unnormalised log density.
        n: Batch size.
        alpha: Weight of the reverse KL in [0, 1].
        power: Exponent of the weights (> 0).
        sample_filter, mean: As in `reverse_kl`.
        log_normalizer: ``log_w -> log sum_j exp(log_w_j)`` over all ranks' weights (data
            parallel training; default: this batch's logsumexp).
    """
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    x, lq_ok, log_p, evals, n_nonfinite, n_filtered = _reverse_parts(
        model, target, n, sample_filter
    )
    if lq_ok.numel() == 0 and mean is None:
        zero = lq_ok.sum() * 0
        return ObjectiveResult(zero, lq_ok.new_zeros(0), evals, n_nonfinite, n_filtered, 0)
    log_w = (log_p - lq_ok).detach()
    scaled = power * log_w
    log_norm = (log_normalizer or (lambda v: torch.logsumexp(v, 0)))(scaled)
    wbar = torch.exp(scaled - log_norm)
    loss = alpha * (mean or torch.mean)(lq_ok - log_p)
    if alpha < 1.0 and x.shape[0] > 0:
        log_q_fixed = model.log_prob(x.detach())
        keep = torch.isfinite(log_q_fixed)
        forward = -(wbar * torch.where(keep, log_q_fixed, torch.zeros_like(log_q_fixed))).sum()
        loss = loss + (1.0 - alpha) * forward
    return ObjectiveResult(loss, log_w, evals, n_nonfinite, n_filtered, int(lq_ok.numel()))
