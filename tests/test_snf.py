"""SNF layers in Boltzmann generators: circular wrap, flow-density reference, training wiring."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from boltzgen.energy.toys import DoubleWell1D, gmm_2d
from boltzgen.errors import BoltzgenError
from boltzgen.flows import Unbounded, make_spline_flow
from boltzgen.sampling.generator import BoltzmannGenerator, FlowSpaceTarget
from boltzgen.sampling.mcmc import first_order_gradients, log_prob_and_grad
from boltzgen.sampling.stochastic import make_snf_layers
from boltzgen.systems import shipped_path
from boltzgen.train import Trainer, TrainOptions, load_checkpoint


class VonMisesGauss(nn.Module):
    """``exp(k cos(t - mu)) * exp(-y^2 / (2 s^2))`` on ``[-pi, pi) x R``; exact log Z."""

    def __init__(self, k: float = 2.0, mu: float = 2.5, s: float = 0.7) -> None:
        super().__init__()
        self.k, self.mu, self.s = k, mu, s
        i0 = float(np.i0(k))
        self.log_z = math.log(2 * math.pi * i0) + math.log(math.sqrt(2 * math.pi) * s)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * torch.cos(x[:, 0] - self.mu) - 0.5 * (x[:, 1] / self.s) ** 2


def uniform_gauss(x: torch.Tensor) -> torch.Tensor:
    """Uniform on the circle x N(0, 2^2), normalised."""
    return -math.log(2 * math.pi) - 0.5 * (x[:, 1] / 2) ** 2 - math.log(2 * math.sqrt(2 * math.pi))


@pytest.mark.parametrize(
    "kind, step", [("metropolis", 1.0), ("mala", 0.5), ("hmc", 0.8), ("langevin", 0.03)]
)
def test_circular_layers_wrap_and_stay_unbiased(kind: str, step: float) -> None:
    """Chains on the torus: samples stay in [-pi, pi) and SNF weights give the exact log Z.

    The von Mises mode sits at 2.5 rad, near the seam, so moves cross it often.
    """
    target = VonMisesGauss()
    torch.manual_seed(3)
    layers = make_snf_layers(
        kind,
        8,
        target.log_prob,
        uniform_gauss,
        step_size=step,
        circular=[True, False],
        n_leapfrog=3,
    )
    r, n = 30, 1000
    z = torch.stack([(torch.rand(r * n) * 2 - 1) * math.pi, 2 * torch.randn(r * n)], 1).double()
    log_q = uniform_gauss(z)
    x = z
    with torch.no_grad():
        for layer in layers:
            x, delta = layer.forward_and_log_det(x)
            log_q = log_q - delta
    assert bool(((x[:, 0] >= -math.pi) & (x[:, 0] < math.pi)).all())
    crossed = (x[:, 0] < -2.0).double().mean()
    assert crossed > 0.05  # mass beyond the seam (the target has ~14 % below -2 rad)
    est = (torch.logsumexp((target.log_prob(x) - log_q).view(r, n), 1) - math.log(n)).double()
    mean, se = est.mean().item(), est.std().item() / math.sqrt(r)
    assert abs(mean - target.log_z) < 3 * se, (kind, mean, se, target.log_z)
    assert se < 0.03
    if kind != "langevin":
        acc = [layer.last_acceptance for layer in layers]
        assert all(0.05 < a < 0.99 for a in acc), acc


def _perturbed_flow(domains, seed=0, noise=0.3):
    torch.manual_seed(seed)
    flow = make_spline_flow(domains, n_blocks=2, n_bins=4, hidden=8)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(noise * torch.randn_like(p))
    return flow.double()


def test_generator_snf_with_flow_reference_is_unbiased_and_counts_evals() -> None:
    """Layers after a flow, annealing from the flow's own density to a 4-mode mixture."""
    target = gmm_2d(n_modes=4, radius=3.0, scale=0.5)
    flow = _perturbed_flow([Unbounded(), Unbounded()], noise=0.1)
    model = BoltzmannGenerator(flow)
    fst = FlowSpaceTarget(target)
    layers = make_snf_layers("mala", 4, fst.log_prob, flow.log_prob, step_size=0.2, n_steps=2)
    model.add_stochastic_layers(layers, fst)
    r, n = 20, 400
    with torch.no_grad():
        x, log_q = model.sample_and_log_prob(r * n)
    # 4 layers x (1 initial + 2 proposals) evaluations per sample
    assert model.internal_target_evals == 4 * 3 * r * n
    est = torch.logsumexp((target.log_prob(x) - log_q).view(r, n), 1) - math.log(n)
    mean, se = est.mean().item(), est.std().item() / math.sqrt(r)
    assert abs(mean - target.log_z) < 3 * se, (mean, se, target.log_z)
    assert model.log_prob(x[:10]).shape == (10,)


class OnceDifferentiable(torch.autograd.Function):
    """``-x^2/2`` summed, with a backward that refuses to be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -0.5 * (x * x).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -x * g[:, None]


def test_first_order_gradients_avoid_double_backward() -> None:
    def log_p(x):
        return OnceDifferentiable.apply(x)

    x = torch.randn(5, 3, requires_grad=True)
    y = 2 * x
    with first_order_gradients():
        lp, g = log_prob_and_grad(log_p, y)
    assert lp.requires_grad and not g.requires_grad
    torch.testing.assert_close(g, -y.detach())
    lp.sum().backward()
    torch.testing.assert_close(x.grad, -4 * x.detach())
    # a flow + MALA layers trains through such a target with second_order=False
    flow = _perturbed_flow([Unbounded(), Unbounded(), Unbounded()]).float()
    layers = make_snf_layers("mala", 2, log_p, flow.log_prob, step_size=0.05)
    model = BoltzmannGenerator(flow, stochastic=layers)
    x, log_q = model.sample_and_log_prob(16)
    (log_q - log_p(x)).mean().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_trainer_adapts_step_sizes_and_counts_layer_evals(tmp_path) -> None:
    target = gmm_2d(n_modes=4, radius=3.0, scale=0.5)
    flow = _perturbed_flow([Unbounded(), Unbounded()]).float()
    fst = FlowSpaceTarget(target)
    model = BoltzmannGenerator(flow)
    layers = make_snf_layers("mala", 3, fst.log_prob, flow.log_prob, step_size=1.0)
    model.add_stochastic_layers(layers, fst)
    opts = TrainOptions(max_iter=6, batch_size=64, lr=1e-3, progress=False, checkpoint_every=3)
    tr = Trainer(model, target, opts, output_dir=tmp_path)
    tr.run()
    # per iteration: 64 loss evaluations + 3 layers x 2 evaluations x 64
    assert tr.counters["target_evals"] == 6 * (64 + 3 * 2 * 64)
    # a huge step is rejected often, so adaptation shrank every layer's step
    assert all(float(layer.step_size) < 1.0 for layer in layers)
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert "stochastic.2.acceptance" in header and "stochastic.0.step_size" in header
    # adapted step sizes are part of the checkpoint, so resume continues them
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert float(state["model"]["stochastic.0.log_step_size"].exp()) == pytest.approx(
        float(layers[0].step_size)
    )


def test_make_snf_layers_and_config_validation() -> None:
    from boltzgen.config import ConfigError, config_from_dict

    def lp(x):
        return -0.5 * (x * x).sum(-1)

    layers = make_snf_layers("hmc", 3, lp, lp, lambdas=[0.2, 0.5, 1.0], n_leapfrog=4)
    assert [la.lam for la in layers] == [0.2, 0.5, 1.0] and layers[0].n_leapfrog == 4
    assert [la.lam for la in make_snf_layers("metropolis", 2, lp, lp, lambdas="one")] == [1, 1]
    with pytest.raises(ValueError, match="kind"):
        make_snf_layers("gibbs", 2, lp, lp)
    with pytest.raises(ValueError, match="lambdas"):
        make_snf_layers("mala", 2, lp, lp, lambdas=[0.5])
    cfg = config_from_dict({"snf": {"n_layers": 2, "kind": "hmc"}})
    assert cfg.snf.n_layers == 2 and cfg.snf.kind == "hmc"
    with pytest.raises(ConfigError, match="snf.kind"):
        config_from_dict({"snf": {"kind": "gibbs"}})
    with pytest.raises(ConfigError, match="snf.step_sizes"):
        config_from_dict({"snf": {"step_sizes": 0.1}})
    with pytest.raises(ConfigError, match="data"):
        config_from_dict({"data": 3})


TINY_SNF = """\
system: {name: aldp}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
snf: {n_layers: 2, kind: mala, n_steps: 2, step_size: 0.001}
train: {max_iter: 2, batch_size: 32, lr: 1.0e-3, checkpoint_every: 2, progress: false}
output_dir: OUT
"""


def test_cli_trains_and_samples_an_aldp_snf(tmp_path, capsys) -> None:
    from boltzgen.cli import main

    cfg = tmp_path / "snf.yaml"
    cfg.write_text(TINY_SNF.replace("OUT", str(tmp_path / "run")))
    assert main(["train", str(cfg)]) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    c = state["counters"]
    # 2 layers x (1 + 2 moves) = 6 evaluations per sample inside the model, plus at most one
    # (two if a non-finite row forces a re-evaluation) for the loss
    assert 2 * 32 * 6 + 2 * 32 - c["filtered"] - c["nonfinite"] <= c["target_evals"]
    assert c["target_evals"] <= 2 * 32 * 6 + 2 * 2 * 32
    out = tmp_path / "s.npz"
    assert (
        main(["sample", str(tmp_path / "run" / "checkpoint.pt"), "-n", "20", "-o", str(out)]) == 0
    )
    data = np.load(out)
    assert data["positions"].shape == (20, 22, 3) and np.isfinite(data["log_weights"]).all()
    capsys.readouterr()


TINY_FKL = """\
system: {name: aldp}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
train: {objective: forward_kl, max_iter: 3, batch_size: 32, checkpoint_every: 3, progress: false}
data: DATA
output_dir: OUT
"""


def test_cli_forward_kl_reads_weighted_md_frames(tmp_path, capsys) -> None:

    from boltzgen.cli import main
    from boltzgen.pipeline import load_training_data

    ref = np.load(shipped_path("aldp", "reference", "reference.npz"))
    frames = tmp_path / "frames.npz"
    np.savez(
        frames,
        positions=ref["positions"][:200],
        frame_index=ref["frame_index"][:200],
        log_weights=ref["log_weights"],
    )
    x, lw = load_training_data(str(frames), 22)
    assert x.shape == (200, 22, 3) and x.dtype == torch.float64
    np.testing.assert_array_equal(lw.numpy(), ref["log_weights"][ref["frame_index"][:200]])
    cfg = tmp_path / "fkl.yaml"
    cfg.write_text(TINY_FKL.replace("DATA", str(frames)).replace("OUT", str(tmp_path / "run")))
    assert main(["train", str(cfg)]) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["iteration"] == 3 and state["counters"]["target_evals"] == 0
    # bad input: one message, exit 2
    for text, needle in (
        (TINY_FKL.replace("data: DATA\n", ""), "needs MD frames"),
        (TINY_FKL.replace("DATA", str(tmp_path / "missing.npz")), "does not exist"),
    ):
        cfg.write_text(text.replace("OUT", str(tmp_path / "run2")))
        assert main(["train", str(cfg)]) == 2
        assert needle in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", positions=np.zeros((5, 21, 3)))
    with pytest.raises(BoltzgenError, match="shape"):
        load_training_data(str(tmp_path / "bad.npz"), 22)


def test_trainer_draws_data_frames_in_proportion_to_weights() -> None:
    x = torch.arange(4, dtype=torch.float64)[:, None]
    lw = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64))
    flow = make_spline_flow([Unbounded()], n_blocks=1, layer_type="autoregressive", hidden=8)
    model = BoltzmannGenerator(flow)
    opts = TrainOptions(max_iter=1, batch_size=20000, objective="forward_kl", progress=False)
    tr = Trainer(model, None, opts, x_data=x, data_weights=lw)
    torch.manual_seed(0)
    idx = torch.multinomial(tr.data_probs, 20000, replacement=True)
    frac = (idx == 0).double().mean().item()
    assert abs(frac - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 20000)
    with pytest.raises(BoltzgenError, match="one log-weight"):
        Trainer(model, None, opts, x_data=x, data_weights=lw[:3])


@pytest.mark.parametrize("snf_layers", [0, 3])
def test_reverse_kl_training_converges_on_double_well(snf_layers: int) -> None:
    """1-D double well (exact log Z): the flow alone and the flow + 3 MALA layers.

    The reverse KL ``log Z - E[log w]`` (exact for the flow alone, the path KL bound with SNF
    layers) falls below 0.05 nats and the ESS rises above 90 %; both wells are populated in the
    right proportion.
    """
    target = DoubleWell1D(a=1.0, b=4.0, c=1.0)
    torch.manual_seed(0)
    flow = make_spline_flow([Unbounded()], n_blocks=3, hidden=32, layer_type="autoregressive")
    model = BoltzmannGenerator(flow.double())
    if snf_layers:
        fst = FlowSpaceTarget(target)
        layers = make_snf_layers("mala", snf_layers, fst.log_prob, flow.log_prob, step_size=0.05)
        model.add_stochastic_layers(layers, fst)
    opts = TrainOptions(
        max_iter=400, batch_size=256, lr=1e-2, warmup_iters=20, dtype="float64", progress=False
    )
    tr = Trainer(model, target, opts)
    tr.run()
    with torch.no_grad():
        x, lq = model.sample_and_log_prob(20000)
    lw = target.log_prob(x) - lq
    kl = target.log_z - lw.mean().item()
    ess = float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))) / len(lw)
    print(f"double well, {snf_layers} SNF layers: reverse KL {kl:.4f} nats, ESS {ess:.3f}")
    assert kl < 0.05 and ess > 0.9
    # mass left of the barrier: exact by quadrature vs the weighted sample
    grid = torch.linspace(-6, 6, 200001, dtype=torch.float64)
    p = torch.exp(target.log_prob(grid[:, None]) - target.log_z)
    left_exact = float((p * (grid < 0)).sum() * (grid[1] - grid[0]))
    w = torch.softmax(lw, 0)
    left = float((w * (x[:, 0] < 0)).sum())
    assert abs(left - left_exact) < 0.02, (left, left_exact)
