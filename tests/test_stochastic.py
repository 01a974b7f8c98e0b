"""SNF layers give exact importance weights: unbiased log Z on targets with analytic normalisers.

Setup: Gaussian base ``q_0`` followed by 8 stochastic layers whose interpolation parameters
``λ = 1/8 .. 1`` anneal from the base density to the target, wrapped in the ordinary
`boltzgen.flows.Flow`. ``R = 30`` independent estimates ``log Ẑ_r = logmeanexp(log_w)`` over
``N = 1000`` samples each; the mean must lie within 3 standard errors of the exact ``log Z`` (and
so must the mean of the exactly unbiased ``Ẑ_r / Z`` around 1). Seeds are fixed.
"""

import math

import pytest
import torch

from boltzgen.energy.toys import DoubleWell1D, GaussianMixture, gmm_2d
from boltzgen.flows import AffineCoupling, Compose, DiagonalGaussian, Flow, Unbounded
from boltzgen.sampling.stochastic import (
    HMCLayer,
    LangevinLayer,
    MALALayer,
    MetropolisLayer,
    StochasticLayer,
    acceptance_rates,
    adapt_step_sizes,
    linear_lambdas,
    stochastic_layers,
)

R, N = 30, 1000

LAYERS = {
    "metropolis": (MetropolisLayer, dict(step_size=1.0, n_steps=2)),
    "mala": (MALALayer, dict(step_size=0.1, n_steps=2)),
    "ula": (LangevinLayer, dict(step_size=0.05, n_steps=2)),
    "hmc": (HMCLayer, dict(step_size=0.4, n_steps=1, n_leapfrog=3)),
}
TARGETS = {
    "double_well": (lambda: DoubleWell1D(a=1.0, b=4.0, c=1.0), 1, 1.5),
    "gmm_2d": (lambda: gmm_2d(n_modes=4, radius=3.0, scale=0.5), 2, 3.0),
}


def make_snf(target: torch.nn.Module, dim: int, scale: float, kind: str, seed: int) -> Flow:
    cls, kw = LAYERS[kind]
    base = DiagonalGaussian(dim, scale=scale).double()
    gen = torch.Generator().manual_seed(seed)
    layers = [cls(target, base, lam, generator=gen, **kw) for lam in linear_lambdas(8)]
    return Flow(base, Compose(layers))


@pytest.mark.parametrize("target_name", list(TARGETS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_snf_log_z_is_unbiased(target_name: str, kind: str) -> None:
    make_target, dim, scale = TARGETS[target_name]
    target = make_target()
    torch.manual_seed(10)
    flow = make_snf(target, dim, scale, kind, seed=11)
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(R * N)
    assert x.shape == (R * N, dim) and log_q.shape == (R * N,) and x.dtype == torch.float64
    log_w = (target.log_prob(x) - log_q).view(R, N)
    est = torch.logsumexp(log_w, 1) - math.log(N)
    mean, se = est.mean().item(), est.std().item() / math.sqrt(R)
    ratio = torch.exp(est - target.log_z)
    r_mean, r_se = ratio.mean().item(), ratio.std().item() / math.sqrt(R)
    msg = f"{kind} {target_name}: {mean:.4f} ± {se:.4f} vs {target.log_z:.4f}"
    assert abs(mean - target.log_z) < 3 * se, msg
    assert abs(r_mean - 1.0) < 3 * r_se, msg
    assert se < 0.03, msg  # the test has power
    for layer in flow.transform.transforms:
        if kind != "ula":
            assert 0.05 < layer.last_acceptance < 0.99, (kind, layer.last_acceptance)
    # the layers move the samples: the log-weight increments are far from zero
    with torch.no_grad():
        _, delta = flow.transform.forward_and_log_det(flow.base.sample(2000)[0])
    assert delta.std() > 0.3


def test_delta_matches_independent_formulas() -> None:
    target = DoubleWell1D()
    ref = DiagonalGaussian(1, scale=1.5).double()
    z = torch.randn(500, 1, dtype=torch.float64)

    def log_p_lam(x: torch.Tensor, lam: float) -> torch.Tensor:
        return (1 - lam) * ref.log_prob(x) + lam * target.log_prob(x)

    for cls in (MetropolisLayer, MALALayer, HMCLayer):
        layer = cls(target, ref, 0.4, step_size=0.3, generator=torch.Generator().manual_seed(0))
        x, delta = layer.forward_and_log_det(z)
        assert torch.allclose(delta, log_p_lam(z, 0.4) - log_p_lam(x, 0.4))
    eps = 0.07
    layer = LangevinLayer(target, ref, 0.4, step_size=eps)
    x, delta = layer.forward_and_log_det(z)

    def grad(y: torch.Tensor) -> torch.Tensor:
        y = y.clone().requires_grad_(True)
        return torch.autograd.grad(log_p_lam(y, 0.4).sum(), y)[0]

    std = math.sqrt(2 * eps)
    fwd = torch.distributions.Normal(z + eps * grad(z), std).log_prob(x).sum(-1)
    bwd = torch.distributions.Normal(x + eps * grad(x), std).log_prob(z).sum(-1)
    assert torch.allclose(delta, bwd - fwd)
    assert layer.last_acceptance == 1.0


def test_mixed_flow_with_deterministic_layers_stays_unbiased() -> None:
    # Deterministic affine coupling (random, non-identity parameters) + stochastic layers.
    target = gmm_2d(n_modes=3, radius=2.5, scale=0.6)
    torch.manual_seed(3)
    base = DiagonalGaussian(2, scale=2.0).double()
    mask = torch.tensor([True, False])
    coupling = AffineCoupling([Unbounded()] * 2, mask, hidden=8, identity_init=False).double()
    layers = [coupling] + [MALALayer(target, base, lam, step_size=0.1) for lam in linear_lambdas(4)]
    flow = Flow(base, Compose(layers))
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(R * N)
    est = torch.logsumexp((target.log_prob(x) - log_q).view(R, N), 1) - math.log(N)
    se = est.std().item() / math.sqrt(R)
    assert abs(est.mean().item() - target.log_z) < 3 * se
    assert se < 0.05


def test_adapt_moves_step_size_toward_target_acceptance() -> None:
    target = DoubleWell1D()
    ref = DiagonalGaussian(1, scale=1.5).double()
    z = target.sample(2000)
    layer = MetropolisLayer(target, ref, 1.0, step_size=20.0, target_acceptance=0.4, adapt_rate=0.5)
    for _ in range(60):
        layer.forward_and_log_det(z)
        layer.adapt()
    assert abs(layer.last_acceptance - 0.4) < 0.1
    assert layer.step_size < 20.0
    small = MALALayer(target, ref, 1.0, step_size=1e-4)
    small.forward_and_log_det(z)
    before = small.step_size.item()
    assert small.adapt() > before  # acceptance ~1 > 0.57: the step grows


def test_learnable_step_size_receives_gradients_and_inverse_contract() -> None:
    target = gmm_2d()
    ref = DiagonalGaussian(2, scale=3.0).double()
    layer = LangevinLayer(target, ref, 0.5, step_size=0.05, learn_step_size=True)
    assert isinstance(layer.log_step_size, torch.nn.Parameter)
    z = (3.0 * torch.randn(256, 2, dtype=torch.float64)).requires_grad_(True)
    x, delta = layer.forward_and_log_det(z)
    loss = -(target.log_prob(x) + delta).mean()
    loss.backward()
    assert layer.log_step_size.grad is not None and torch.isfinite(layer.log_step_size.grad)
    assert torch.isfinite(z.grad).all()
    with torch.no_grad():
        zb, ld = layer.inverse_and_log_det(x.detach())
    assert zb.shape == x.shape and ld.shape == (256,) and ld.dtype == torch.float64


def test_invalid_arguments() -> None:
    t = DoubleWell1D()
    with pytest.raises(ValueError):
        MetropolisLayer(t, t, lam=1.5)
    with pytest.raises(ValueError):
        MALALayer(t, t, n_steps=0)
    assert issubclass(HMCLayer, StochasticLayer)


def test_flow_level_helpers() -> None:
    target = DoubleWell1D()
    flow = make_snf(target, 1, 1.5, "mala", seed=0)
    assert len(stochastic_layers(flow)) == 8
    assert all(math.isnan(a) for a in acceptance_rates(flow))
    with torch.no_grad():
        flow.sample_and_log_prob(500)
    rates = acceptance_rates(flow)
    assert all(0.0 < a <= 1.0 for a in rates)
    before = [layer.step_size.item() for layer in stochastic_layers(flow)]
    after = adapt_step_sizes(flow)
    for a, b, r in zip(after, before, rates):
        assert (a > b) == (r > 0.57)


def test_toy_normalisers_against_independent_quadrature() -> None:
    from scipy.integrate import quad

    dw = DoubleWell1D(a=0.5, b=3.0, c=-0.7)
    val, _ = quad(
        lambda x: math.exp(-(0.5 * x**4 - 3.0 * x**2 - 0.7 * x)),
        -math.inf,
        math.inf,
        epsabs=1e-13,
        epsrel=1e-13,
    )
    assert abs(dw.log_z - math.log(val)) < 1e-9
    mean, _ = quad(
        lambda x: x * math.exp(-(0.5 * x**4 - 3.0 * x**2 - 0.7 * x) - dw.log_z),
        -math.inf,
        math.inf,
        epsabs=1e-13,
    )
    assert abs(dw.moment(1) - mean) < 1e-8
    xs = dw.sample(40000, generator=torch.Generator().manual_seed(0))
    assert abs(xs.mean().item() - mean) < 4 * xs.std().item() / 200
    gmm = gmm_2d(n_modes=5, radius=2.0, scale=0.7)
    g = torch.linspace(-7, 7, 561, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="ij")
    lp = gmm.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1))
    log_z_grid = torch.logsumexp(lp, 0).item() + 2 * math.log(g[1] - g[0])
    assert abs(gmm.log_z - log_z_grid) < 1e-8
    assert abs(gmm.log_z - math.log(15.0)) < 1e-12
    s = gmm.sample(40000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s.mean(0), gmm.mean(), atol=4 * 2.0 / 200)


def test_inverse_direction_gives_unbiased_marginal_density() -> None:
    # ULA on a Gaussian target maps Gaussians to Gaussians, so the marginal density of the SNF
    # output is known: mean' = (1 - e/t²) mean + e m / t², var' = (1 - e/t²)² var + 2e.
    # Flow.log_prob(x) runs the backward paths; exp of it must average to q(x) for each x.
    m, t, s, eps, n_layers = 1.0, 0.8, 1.5, 0.1, 3
    target = GaussianMixture(torch.tensor([[m]]), torch.tensor([t]))
    base = DiagonalGaussian(1, scale=s).double()
    flow = Flow(base, Compose([LangevinLayer(target, base, 1.0, step_size=eps)] * n_layers))
    mean, var = 0.0, s**2
    for _ in range(n_layers):
        mean = (1 - eps / t**2) * mean + eps * m / t**2
        var = (1 - eps / t**2) ** 2 * var + 2 * eps
    torch.manual_seed(5)
    reps = 20000
    xs = torch.tensor([-1.0, 0.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        lq = flow.log_prob(xs.repeat_interleave(reps)[:, None]).view(len(xs), reps)
    exact = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(xs)
    ratio = torch.exp(lq - exact[:, None])
    se = ratio.std(1) / math.sqrt(reps)
    assert ((ratio.mean(1) - 1).abs() < 3 * se).all(), (ratio.mean(1), se)
    assert (se < 0.05).all()
    # forward samples have the same marginal
    with torch.no_grad():
        x, _ = flow.sample_and_log_prob(40000)
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / 40000)
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / 40000)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_float32_flow_keeps_dtype(kind: str) -> None:
    target = gmm_2d()
    cls, kw = LAYERS[kind]
    base = DiagonalGaussian(2, scale=3.0)  # float32
    flow = Flow(base, Compose([cls(target, base, lam, **kw) for lam in linear_lambdas(3)]))
    x, log_q = flow.sample_and_log_prob(256)
    assert x.dtype == torch.float32 and log_q.dtype == torch.float32
    assert torch.isfinite(x).all() and torch.isfinite(log_q).all()
