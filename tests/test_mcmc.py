"""MCMC kernels preserve known targets (moment tests) and are reproducible.

Oracle: chains started from exact samples of the target stay exactly distributed as the target
after any number of moves of an invariant kernel; chains are independent, so the sample mean of
``x`` has standard error ``σ / sqrt(N)`` and the sample variance ``σ² sqrt(2 / N)`` (Gaussian)
or the empirical SE of ``x²`` (double well). We require agreement within 4 standard errors.
"""

import math

import pytest
import torch

from boltzgen.energy.toys import DoubleWell1D, GaussianMixture
from boltzgen.sampling.mcmc import (
    hmc_step,
    langevin_log_kernel,
    log_prob_and_grad,
    mala_step,
    metropolis_step,
    ula_step,
)

N_CHAINS = 20000
N_MOVES = 15
MU = torch.tensor([1.0, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0], dtype=torch.float64)


def gauss_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((x - MU) / SIGMA) ** 2).sum(-1)


def run_kernel(kind: str, log_prob, x: torch.Tensor, step, n_moves: int, gen: torch.Generator):
    log_p, grad = log_prob_and_grad(log_prob, x)
    acc = []
    for _ in range(n_moves):
        if kind == "rwm":
            res = metropolis_step(log_prob, x, log_p, step, gen)
        elif kind == "mala":
            res = mala_step(log_prob, x, log_p, grad, step, gen)
        elif kind == "hmc":
            res = hmc_step(log_prob, x, log_p, grad, step, 3, 1.0, gen)
        else:
            res = ula_step(log_prob, x, log_p, grad, step, gen)
        x, log_p, grad = res.x, res.log_prob, res.grad
        acc.append(res.accepted.double().mean().item())
    return x, log_p, sum(acc) / len(acc)


KERNELS = {"rwm": 1.0, "mala": 0.15, "hmc": 0.6}


@pytest.mark.parametrize("kind", list(KERNELS))
def test_kernels_preserve_gaussian(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = MU + SIGMA * torch.randn(N_CHAINS, 2, dtype=torch.float64, generator=gen)
    # per-dimension step sizes for RWM exercise the (D,) form
    step = torch.tensor([0.6, 2.0], dtype=torch.float64) if kind == "rwm" else KERNELS[kind]
    x, log_p, acc = run_kernel(kind, gauss_log_prob, x0, step, N_MOVES, gen)
    assert 0.2 < acc < 0.95, acc  # the kernel moves the chains (and rejects some proposals)
    assert torch.allclose(log_p, gauss_log_prob(x))
    assert (x - x0).abs().mean() > 0.3  # the chains decorrelated from their start
    se_mean = SIGMA / math.sqrt(N_CHAINS)
    se_var = SIGMA**2 * math.sqrt(2.0 / N_CHAINS)
    assert ((x.mean(0) - MU).abs() < 4 * se_mean).all(), (x.mean(0), MU)
    assert ((x.var(0) - SIGMA**2).abs() < 4 * se_var).all(), (x.var(0), SIGMA**2)


@pytest.mark.parametrize("kind", list(KERNELS))
def test_kernels_preserve_double_well(kind: str) -> None:
    target = DoubleWell1D(a=1.0, b=4.0, c=1.0)
    gen = torch.Generator().manual_seed(2)
    x0 = target.sample(N_CHAINS, generator=gen)
    step = {"rwm": 1.5, "mala": 0.1, "hmc": 0.15}[kind]
    x, _, acc = run_kernel(kind, target.log_prob, x0, step, N_MOVES, gen)
    assert 0.2 < acc < 0.98, acc
    for k in (1, 2, 3):
        xk = x[:, 0] ** k
        se = xk.std() / math.sqrt(N_CHAINS)
        assert abs(xk.mean() - target.moment(k)) < 4 * se, (k, xk.mean(), target.moment(k))


def test_mala_and_hmc_preserve_gaussian_mixture_weights() -> None:
    # Mode occupations of a 2-mode mixture with unequal weights are kept (tests the MH ratio).
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    gmm = GaussianMixture(means, torch.tensor([0.6, 0.6]), torch.log(torch.tensor([1.0, 3.0])))
    gen = torch.Generator().manual_seed(3)
    x0 = gmm.sample(N_CHAINS, generator=gen)
    for kind, step in (("mala", 0.3), ("hmc", 0.4)):
        x, _, _ = run_kernel(kind, gmm.log_prob, x0, step, 10, gen)
        se = (x.std(0) / math.sqrt(N_CHAINS))[0]
        assert abs(x[:, 0].mean() - gmm.mean()[0]) < 4 * se
        cov = gmm.covariance()
        se_v = math.sqrt(2.0 / N_CHAINS) * cov[0, 0] * 1.5  # x not Gaussian: generous factor
        assert abs(x[:, 0].var() - cov[0, 0]) < 4 * se_v


def test_ula_stationary_variance_is_the_exact_discretised_one() -> None:
    # For p = N(mu, s^2), x' = x + eps (mu - x) / s^2 + sqrt(2 eps) xi has the exact stationary
    # variance s^2 / (1 - eps / (2 s^2)), which differs from s^2: ULA is biased, by a known amount.
    eps = 0.1
    gen = torch.Generator().manual_seed(4)
    var_ula = SIGMA**2 / (1 - eps / (2 * SIGMA**2))
    x0 = MU + var_ula.sqrt() * torch.randn(N_CHAINS, 2, dtype=torch.float64, generator=gen)
    x, _, acc = run_kernel("ula", gauss_log_prob, x0, eps, N_MOVES, gen)
    assert acc == 1.0
    se_var = var_ula * math.sqrt(2.0 / N_CHAINS)
    assert ((x.var(0) - var_ula).abs() < 4 * se_var).all(), (x.var(0), var_ula)
    assert (x.var(0)[0] - SIGMA[0] ** 2) > 10 * se_var[0]  # the bias is resolved
    assert ((x.mean(0) - MU).abs() < 4 * var_ula.sqrt() / math.sqrt(N_CHAINS)).all()


def test_langevin_log_kernel_matches_torch_normal() -> None:
    g = torch.Generator().manual_seed(5)
    x, y, gr = (torch.randn(7, 3, dtype=torch.float64, generator=g) for _ in range(3))
    eps = torch.tensor(0.3, dtype=torch.float64)
    ref = torch.distributions.Normal(x + eps * gr, torch.sqrt(2 * eps)).log_prob(y).sum(-1)
    assert torch.allclose(langevin_log_kernel(y, x, gr, eps), ref)


def test_generator_reproducibility_and_per_chain_steps() -> None:
    x = torch.randn(64, 2, dtype=torch.float64)
    steps = torch.linspace(0.01, 1.0, 64, dtype=torch.float64)[:, None]  # (B, 1) per chain
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        outs.append(run_kernel("hmc", gauss_log_prob, x, steps, 3, gen)[0])
    assert torch.equal(outs[0], outs[1])
    gen = torch.Generator().manual_seed(8)
    res = mala_step(gauss_log_prob, x, *log_prob_and_grad(gauss_log_prob, x), steps, gen)
    assert res.x.shape == x.shape and res.accepted.shape == (64,)
    assert res.log_prob.dtype == torch.float64


def test_gradient_kernels_work_under_no_grad_and_keep_graph_when_asked() -> None:
    x = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        lp, g = log_prob_and_grad(gauss_log_prob, x)
        res = hmc_step(gauss_log_prob, x, lp, g, 0.2)
    assert not res.x.requires_grad
    assert torch.allclose(g, -(x - MU) / SIGMA**2)
    xr = x.clone().requires_grad_(True)
    lp, g = log_prob_and_grad(gauss_log_prob, xr)
    res = ula_step(gauss_log_prob, xr, lp, g, 0.1)
    (gx,) = torch.autograd.grad(res.log_accept_ratio.sum() + res.x.sum(), xr)
    assert torch.isfinite(gx).all()


def test_nan_proposals_are_rejected() -> None:
    def lp(x: torch.Tensor) -> torch.Tensor:
        out = gauss_log_prob(x)
        return torch.where(x[:, 0] > MU[0], torch.full_like(out, math.nan), out)

    x = MU.expand(1000, 2).clone()
    res = metropolis_step(lp, x, lp(x), 0.5, torch.Generator().manual_seed(0))
    assert torch.isfinite(res.log_prob).all()
    assert (res.x[:, 0] <= MU[0]).all()
