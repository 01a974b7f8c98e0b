"""Objectives against analytic Gaussians; NaN safety; the Boltzmann generator's densities."""

import math

import pytest
import torch
from torch import nn

from boltzgen.flows import Unbounded, make_spline_flow
from boltzgen.sampling.generator import BoltzmannGenerator
from boltzgen.train.objectives import forward_kl, log_ess, mixed_kl, reverse_kl, reweighted_kl


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module only (restored after each test)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Gauss1D(nn.Module):
    """q = N(mu, s^2) in one dimension, written out by hand (the oracle)."""

    def __init__(self, mu=0.5, s=1.5):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))

    def log_prob(self, x):
        s = self.log_s.exp()
        return -0.5 * ((x[:, 0] - self.mu) / s) ** 2 - self.log_s - 0.5 * math.log(2 * math.pi)

    def sample_and_log_prob(self, n):
        z = torch.randn(n, 1)
        x = self.mu + self.log_s.exp() * z
        return x, self.log_prob(x)


class StdNormalUnnorm:
    """p(x) = exp(-x^2/2) (log Z = 0.5 log 2 pi), optionally NaN where x > nan_above."""

    def __init__(self, nan_above=None):
        self.nan_above = nan_above

    def log_prob(self, x):
        lp = -0.5 * (x**2).sum(-1)
        if self.nan_above is not None:
            nan = torch.where(x[:, 0] > self.nan_above, float("nan"), 0.0).detach()
            lp = lp + nan  # NaN rows; x's gradient in the other rows stays finite
        return lp


def test_reverse_kl_matches_analytic_value():
    torch.manual_seed(0)
    mu, s = 0.5, 1.5
    model = Gauss1D(mu, s)
    kl = math.log(1 / s) + (s**2 + mu**2) / 2 - 0.5  # KL(N(mu,s^2) || N(0,1))
    log_z = 0.5 * math.log(2 * math.pi)
    target = StdNormalUnnorm()
    vals = torch.stack([reverse_kl(model, target, 4000).loss.detach() for _ in range(10)])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean().item() - (kl - log_z)) < 4 * se.item() + 1e-3
    res = reverse_kl(model, StdNormalUnnorm(), 100)
    assert res.n_target_evals == 100 and res.n_used == 100 and res.log_weights.shape == (100,)


def test_reverse_kl_gradient_matches_analytic():
    torch.manual_seed(1)
    mu, s = 0.5, 1.5
    model = Gauss1D(mu, s)
    reverse_kl(model, StdNormalUnnorm(), 200000).loss.backward()
    # d/dmu KL = mu; d/dlog s KL = s^2 - 1
    assert model.mu.grad.item() == pytest.approx(mu, abs=0.02)
    assert model.log_s.grad.item() == pytest.approx(s**2 - 1, abs=0.05)


def test_reverse_kl_drops_nonfinite_energies_and_keeps_gradients_finite():
    torch.manual_seed(2)
    model = Gauss1D(0.0, 1.0)
    res = reverse_kl(model, StdNormalUnnorm(nan_above=1.0), 2000)
    expected_bad = res.n_nonfinite
    assert 200 < expected_bad < 450  # P(x > 1) = 0.159
    assert res.n_used + expected_bad == 2000
    assert res.n_target_evals == 2000 + res.n_used  # the good rows were re-evaluated
    assert torch.isfinite(res.loss)
    res.loss.backward()
    assert torch.isfinite(model.mu.grad) and torch.isfinite(model.log_s.grad)
    assert torch.isfinite(res.log_weights).all()


class NaNSampler(Gauss1D):
    def sample_and_log_prob(self, n):
        x, lq = super().sample_and_log_prob(n)
        bad = torch.arange(n) % 4 == 0
        return torch.where(bad[:, None], float("nan"), x), lq


def test_reverse_kl_drops_nonfinite_samples_and_filtered_ones():
    torch.manual_seed(3)
    res = reverse_kl(NaNSampler(), StdNormalUnnorm(), 100, sample_filter=lambda x: x[:, 0] > 0)
    assert res.n_nonfinite == 25
    assert res.n_filtered + res.n_used == 75
    assert res.n_target_evals == res.n_used  # filtered samples cost no energy
    assert torch.isfinite(res.loss)
    # everything dropped: a zero loss that still backpropagates
    res = reverse_kl(NaNSampler(), StdNormalUnnorm(), 8, sample_filter=lambda x: x[:, 0] > 99)
    assert res.loss.item() == 0.0 and res.n_used == 0
    res.loss.backward()


def test_forward_and_mixed_kl():
    torch.manual_seed(4)
    model = Gauss1D(0.5, 1.5)
    x = torch.randn(50, 1)
    x[3] = float("nan")
    f = forward_kl(model, x)
    good = torch.cat([x[:3], x[4:]])
    assert f.loss.item() == pytest.approx(-model.log_prob(good).mean().item(), rel=1e-12)
    assert f.n_nonfinite == 1 and f.n_used == 49
    torch.manual_seed(5)
    r = reverse_kl(model, StdNormalUnnorm(), 64)
    torch.manual_seed(5)
    m = mixed_kl(model, StdNormalUnnorm(), 64, x, alpha=0.25)
    assert m.loss.item() == pytest.approx(0.25 * r.loss.item() + 0.75 * f.loss.item(), rel=1e-12)
    with pytest.raises(ValueError):
        mixed_kl(model, StdNormalUnnorm(), 4, x, alpha=1.5)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.stack([model.mu.grad.clone(), model.log_s.grad.clone()])


def test_reweighted_kl_gradient_is_the_forward_kl_gradient():
    """power 1, alpha 0: the self-normalised IS estimate of grad KL(p || q) from q's samples."""
    torch.manual_seed(6)
    mu, s = 0.5, 1.5
    model = Gauss1D(mu, s)
    g = _grads(model, reweighted_kl(model, StdNormalUnnorm(), 200000, alpha=0.0).loss)
    # KL(N(0,1) || N(mu, s^2)) = log s + (1 + mu^2) / (2 s^2) - 1/2
    assert g[0].item() == pytest.approx(mu / s**2, abs=0.01)
    assert g[1].item() == pytest.approx(1 - (1 + mu**2) / s**2, abs=0.02)


def test_reweighted_kl_power_2_is_the_alpha_2_divergence_gradient():
    torch.manual_seed(7)
    model = Gauss1D(0.5, 1.5)
    res = reweighted_kl(model, StdNormalUnnorm(), 200000, alpha=0.0, power=2.0)
    g = _grads(model, res.loss)
    # oracle: autograd of the closed form log int N(0,1)^2 / N(mu, s^2) dx
    mu, log_s = (
        torch.tensor(0.5, requires_grad=True),
        torch.tensor(math.log(1.5), requires_grad=True),
    )
    s2 = torch.exp(2 * log_s)
    a, b = 1 - 1 / (2 * s2), mu / s2
    d2 = log_s - 0.5 * math.log(2 * math.pi) + 0.5 * torch.log(math.pi / a) + b**2 / (4 * a)
    d2 = d2 + mu**2 / (2 * s2)
    exact = torch.stack(torch.autograd.grad(d2, [mu, log_s]))
    assert torch.allclose(g, exact, atol=0.03), (g, exact)
    assert res.n_used == 200000 and res.log_weights.shape == (200000,)


def test_reweighted_kl_alpha_1_is_reverse_kl_and_mixes_linearly():
    model = Gauss1D(0.5, 1.5)
    torch.manual_seed(8)
    r = reverse_kl(model, StdNormalUnnorm(), 64)
    gr = _grads(model, r.loss)
    torch.manual_seed(8)
    w1 = reweighted_kl(model, StdNormalUnnorm(), 64, alpha=1.0)
    assert w1.loss.item() == pytest.approx(r.loss.item(), rel=1e-12)
    assert torch.allclose(_grads(model, w1.loss), gr)
    torch.manual_seed(8)
    gf = _grads(model, reweighted_kl(model, StdNormalUnnorm(), 64, alpha=0.0).loss)
    torch.manual_seed(8)
    gm = _grads(model, reweighted_kl(model, StdNormalUnnorm(), 64, alpha=0.3).loss)
    assert torch.allclose(gm, 0.3 * gr + 0.7 * gf)
    # NaN rows dropped from both parts; everything dropped backpropagates a zero loss
    torch.manual_seed(9)
    res = reweighted_kl(NaNSampler(), StdNormalUnnorm(), 100, sample_filter=lambda x: x[:, 0] > 0)
    assert res.n_nonfinite == 25 and torch.isfinite(res.loss)
    res = reweighted_kl(NaNSampler(), StdNormalUnnorm(), 8, sample_filter=lambda x: x[:, 0] > 99)
    assert res.loss.item() == 0.0 and res.n_used == 0
    res.loss.backward()
    with pytest.raises(ValueError):
        reweighted_kl(model, StdNormalUnnorm(), 4, power=0.0)


def test_log_ess():
    lw = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert log_ess(lw).exp().item() == pytest.approx(4.0)
    lw = torch.tensor([0.0, -1e9, -1e9])
    assert log_ess(lw).exp().item() == pytest.approx(1.0)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert log_ess(w.log()).exp().item() == pytest.approx(36 / 14)


class Scale(nn.Module):
    """x = 2 y as a transform (log det = D log 2)."""

    def forward_and_log_det(self, y, context=None):
        return 2 * y, torch.full((y.shape[0],), y.shape[1] * math.log(2.0))

    def inverse_and_log_det(self, x, context=None):
        return x / 2, torch.full((x.shape[0],), -x.shape[1] * math.log(2.0))


def test_generator_density_is_consistent():
    torch.manual_seed(6)
    flow = make_spline_flow([Unbounded()] * 2, n_blocks=2, hidden=8, identity_init=False)
    gen = BoltzmannGenerator(flow, Scale())
    x, lq = gen.sample_and_log_prob(16)
    assert torch.allclose(gen.log_prob(x), lq, atol=1e-9)
    y = x / 2
    assert torch.allclose(lq, flow.log_prob(y) - 2 * math.log(2.0), atol=1e-9)
    xs, lqs = gen.sample(10, batch_size=3)
    assert xs.shape == (10, 2) and not lqs.requires_grad
