"""Training tests: reverse KL on the cylinder, forward KL against known differential entropies.

Each test trains a small mixed-domain spline flow on one CPU thread (minutes-scale: ``slow``).
Reference numbers come from the exact target densities: the reverse-KL target's normaliser is
closed form; the entropies are integrals of the known mixture densities on a fine grid.
"""

import math
import time

import pytest
import torch

from boltzgen.flows import Circular, Unbounded, make_spline_flow

pytestmark = pytest.mark.slow

LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: one thread is fastest and robust on shared CPUs
    yield
    torch.set_num_threads(n)


def log_i0(k):
    k = torch.as_tensor(k, dtype=torch.float64)
    return torch.log(torch.special.i0e(k)) + k


def cylinder_target_log_prob(v):
    """log p(x, phi) = log N(x | 0, 1) + log vonMises(phi | 3x, 1), normalised exactly."""
    x, phi = v[:, 0], v[:, 1]
    log_z = 0.5 * LOG_2PI + LOG_2PI + log_i0(1.0).item()
    return -0.5 * x * x + torch.cos(phi - 3.0 * x) - log_z


def train(flow, loss_fn, steps, lr=3e-3):
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_reverse_kl_cylinder():
    """The seed paper's example: one unbounded x and one circular phi, trained by reverse KL."""
    torch.manual_seed(0)
    cpu0 = time.process_time()
    flow = make_spline_flow(
        [Unbounded(), Circular()], n_blocks=4, n_bins=8, hidden=64, n_res_blocks=2, seed=0
    )

    def reverse_kl():
        x, log_q = flow.sample(512)
        return (log_q - cylinder_target_log_prob(x)).mean()

    train(flow, reverse_kl, steps=1500)
    with torch.no_grad():
        x, log_q = flow.sample(100_000)
        gap = log_q - cylinder_target_log_prob(x)
    cpu = time.process_time() - cpu0
    kl, err = gap.mean().item(), gap.std().item() / math.sqrt(gap.numel())
    print(f"reverse KL {kl:.5f} +- {err:.5f} nats, {cpu:.1f} s CPU")
    assert kl < 0.02
    assert cpu < 120.0
    # The trained flow inverts to float32 precision.
    z, _ = flow.transform.inverse_and_log_det(x[:2000])
    xr, _ = flow.transform.forward_and_log_det(z)
    d = xr - x[:2000]
    d[:, 1] = torch.remainder(d[:, 1] + math.pi, 2 * math.pi) - math.pi
    assert d.abs().max() < 1e-5


def _entropy_by_quadrature(log_prob, xs, ys):
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    lp = log_prob(torch.stack([gx.flatten(), gy.flatten()], 1))
    p = lp.exp()
    area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert abs((p.sum() * area).item() - 1.0) < 1e-6  # the grid captures all the mass
    return (-(p * lp).sum() * area).item()


class GaussianMixture2D:
    w = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    sd = torch.tensor([[0.6, 1.0], [0.8, 0.4], [1.2, 0.5]], dtype=torch.float64)
    domains = [Unbounded(), Unbounded()]

    def sample(self, n, g):
        k = torch.multinomial(self.w, n, True, generator=g)
        return self.mu[k] + self.sd[k] * torch.randn(n, 2, generator=g, dtype=torch.float64)

    def log_prob(self, x):
        z = (x[:, None, :] - self.mu) / self.sd
        lp = (-0.5 * z * z - torch.log(self.sd) - 0.5 * LOG_2PI).sum(-1) + torch.log(self.w)
        return torch.logsumexp(lp, 1)

    def entropy(self):
        xs = torch.linspace(-12, 12, 2401, dtype=torch.float64)
        return _entropy_by_quadrature(self.log_prob, xs, xs)


class VonMisesGaussianMixture:
    """Mixture of N(x | m, s) vonMises(phi | mu, kappa) on the cylinder R x [-pi, pi)."""

    w = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    mx = torch.tensor([-1.5, 1.0, 0.5], dtype=torch.float64)
    sx = torch.tensor([0.5, 0.7, 0.4], dtype=torch.float64)
    mp = torch.tensor([0.0, 2.5, -2.0], dtype=torch.float64)
    kp = torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64)
    domains = [Unbounded(), Circular()]

    def sample(self, n, g):
        k = torch.multinomial(self.w, n, True, generator=g)
        x = self.mx[k] + self.sx[k] * torch.randn(n, generator=g, dtype=torch.float64)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # VonMises uses it
        phi = torch.distributions.VonMises(self.mp[k], self.kp[k]).sample()
        return torch.stack([x, torch.remainder(phi + math.pi, 2 * math.pi) - math.pi], 1)

    def log_prob(self, v):
        x, phi = v[:, :1], v[:, 1:]
        lp = (
            -0.5 * ((x - self.mx) / self.sx) ** 2
            - torch.log(self.sx)
            - 0.5 * LOG_2PI
            + self.kp * torch.cos(phi - self.mp)
            - LOG_2PI
            - log_i0(self.kp)
            + torch.log(self.w)
        )
        return torch.logsumexp(lp, 1)

    def entropy(self):
        xs = torch.linspace(-8, 8, 2001, dtype=torch.float64)
        ys = torch.linspace(-math.pi, math.pi, 1025, dtype=torch.float64)[:-1]
        return _entropy_by_quadrature(self.log_prob, xs, ys)


@pytest.mark.parametrize("density", [GaussianMixture2D(), VonMisesGaussianMixture()])
def test_forward_kl_reaches_entropy(density):
    g = torch.Generator().manual_seed(1)
    data = density.sample(50_000, g).float()
    test = density.sample(100_000, g).float()
    entropy = density.entropy()
    torch.manual_seed(0)
    flow = make_spline_flow(
        density.domains, n_blocks=4, n_bins=8, hidden=64, n_res_blocks=2, tail_bound=6.0
    )

    def nll():
        return -flow.log_prob(data[torch.randint(0, len(data), (512,))]).mean()

    train(flow, nll, steps=1000)
    with torch.no_grad():
        test_nll = -flow.log_prob(test)
    err = test_nll.std().item() / math.sqrt(test.shape[0])
    print(f"test NLL {test_nll.mean().item():.4f} +- {err:.4f}, entropy {entropy:.4f}")
    assert abs(test_nll.mean().item() - entropy) < 0.05
