"""A basin flow and mixture proposals: the torsion restraint against mdtraj's dihedrals, and
the mixture's weights (multiple importance sampling, balance heuristic)."""

import math

import mdtraj
import numpy as np
import pytest
import torch
from helpers import sigterm_in_batch

from boltzgen import cli, pipeline, systems
from boltzgen.config import config_from_dict
from boltzgen.energy import BoltzmannTarget, TorchEnergy, TorsionRestraint
from boltzgen.errors import BoltzgenError, ConfigError

PHI = [4, 6, 8, 14]
TINY = {
    "system": {"name": "aldp"},
    "flow": {"n_blocks": 2, "n_bins": 4, "hidden": 16},
    "train": {"max_iter": 2, "batch_size": 32, "progress": False, "checkpoint_every": 2},
}


def test_torsion_restraint_is_the_target_inside_and_a_circular_well_outside():
    aldp = systems.load("aldp")
    frames = np.load(systems.shipped_path("aldp", "reference", "reference.npz"))["positions"]
    x = torch.tensor(frames[::100], dtype=torch.float64)  # 100 MD frames, phi mostly < 0
    target = BoltzmannTarget(TorchEnergy.from_openmm(aldp.system), aldp.kT)
    lo, hi, k = math.radians(-100.0), math.radians(-60.0), 50.0
    restrained = TorsionRestraint(target, PHI, lo, hi, k)
    phi = mdtraj.compute_dihedrals(mdtraj.Trajectory(frames[::100], aldp.topology), [PHI])[:, 0]
    # circular distance from [lo, hi], computed independently of the module
    shifted = [phi + s for s in (-2 * np.pi, 0.0, 2 * np.pi)]
    d = np.minimum.reduce(
        [
            np.where((a >= lo) & (a <= hi), 0.0, np.minimum(abs(a - lo), abs(a - hi)))
            for a in shifted
        ]
    )
    assert 0 < (d == 0).sum() < len(d)  # frames inside and outside the flat bottom
    expected = target.log_prob(x).numpy() - k * d**2
    # mdtraj computes in float32: |d error| ~ 1e-6 rad
    np.testing.assert_allclose(restrained.log_prob(x).numpy(), expected, rtol=0, atol=1e-3)
    assert restrained.energy is target.energy and restrained.kT == target.kT
    with pytest.raises(ValueError):
        TorsionRestraint(target, PHI[:3], lo, hi, k)


def test_restraint_config_is_validated():
    ok = config_from_dict({**TINY, "restraint": {"atoms": PHI, "range": [0, 120]}})
    assert ok.restraint.force_constant == 50.0
    for bad in (
        {"atoms": PHI[:3], "range": [0, 120]},
        {"atoms": [4, 4, 8, 14], "range": [0, 120]},
        {"atoms": PHI, "range": [120, 0]},
        {"atoms": PHI, "range": [0, "x"]},
        {"atoms": PHI, "range": [0, 120], "force_constant": -1},
    ):
        with pytest.raises(ConfigError, match="restraint"):
            config_from_dict({**TINY, "restraint": bad})
    with pytest.raises(ConfigError, match="22 atoms"):
        bad = {"atoms": [0, 1, 2, 99], "range": [0, 120]}
        pipeline.build_run(config_from_dict({**TINY, "restraint": bad}))


def test_several_restraints_all_apply():
    psi = [6, 8, 14, 16]
    two = [
        {"atoms": PHI, "range": [0, 120]},
        {"atoms": psi, "range": [0, 120], "force_constant": 20},
    ]
    config = config_from_dict({**TINY, "restraint": two})
    assert [r.atoms for r in config.restraint] == [PHI, psi]
    run = pipeline.build_run(config)
    frames = np.load(systems.shipped_path("aldp", "reference", "reference.npz"))["positions"]
    x = torch.tensor(frames[::10], dtype=torch.float64)
    angles = mdtraj.compute_dihedrals(
        mdtraj.Trajectory(frames[::10], run.system.topology), [PHI, psi]
    )
    # circular distance from [0, 120] deg, computed independently of the module
    lo, hi = 0.0, math.radians(120.0)
    d = np.minimum.reduce(
        [
            np.where(a < lo, lo - a, np.where(a > hi, a - hi, 0.0))
            for a in (angles, angles + 2 * np.pi)
        ]
    )
    assert (d[:, 0] > 0).any() and (d[:, 1] > 0).any() and (d.sum(1) == 0).any()
    plain = BoltzmannTarget(TorchEnergy.from_openmm(run.system.system), run.system.kT)
    expected = plain.log_prob(x).numpy() - 50.0 * d[:, 0] ** 2 - 20.0 * d[:, 1] ** 2
    with torch.no_grad():
        got = run.target.log_prob(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)
    assert run.target.energy is not None and run.target.kT == plain.kT
    with pytest.raises(ConfigError, match="restraint"):
        config_from_dict({**TINY, "restraint": []})
    with pytest.raises(ConfigError, match=r"restraint\[1\]"):
        config_from_dict({**TINY, "restraint": [two[0], {"atoms": PHI[:3], "range": [0, 1]}]})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixture")
    main = pipeline.train(config_from_dict({**TINY, "output_dir": str(d / "main")})).checkpoint
    basin = config_from_dict(
        {**TINY, "output_dir": str(d / "basin"), "restraint": {"atoms": PHI, "range": [0, 120]}}
    )
    return main, pipeline.train(basin).checkpoint


def test_a_run_mixed_with_itself_is_the_run(checkpoints):
    run = pipeline.load_run(checkpoints[0])
    s = pipeline.draw_mixture([run, run], [0.7, 0.3], 50, seed=3)
    with torch.no_grad():
        log_q = run.model.log_prob(torch.from_numpy(s.positions)).double().numpy()
    np.testing.assert_allclose(s.log_q, log_q, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(s.log_weights, -s.energies / run.target.kT - s.log_q, rtol=1e-12)
    assert s.n == 50
    with pytest.raises(BoltzgenError, match="sum to 1"):
        pipeline.draw_mixture([run, run], [0.7, 0.7], 50)


def test_mixture_weights_use_every_component_density(checkpoints):
    main, basin = (pipeline.load_run(c) for c in checkpoints)
    s = pipeline.draw_mixture([main, basin], [0.8, 0.2], 40, seed=5)
    x = torch.from_numpy(s.positions)
    with torch.no_grad():
        q = torch.stack([main.model.log_prob(x), basin.model.log_prob(x)]).double()
    expected = torch.logsumexp(torch.log(torch.tensor([[0.8], [0.2]])).double() + q, 0)
    np.testing.assert_allclose(s.log_q, expected.numpy(), rtol=1e-6, atol=1e-4)
    # the weights are toward the unrestrained Boltzmann density of both runs' system
    aldp = systems.load("aldp")
    u = TorchEnergy.from_openmm(aldp.system)(x.double()).numpy()
    np.testing.assert_allclose(s.energies, u, rtol=1e-6, atol=1e-4)


def test_cli_sample_mix(checkpoints, tmp_path, capsys):
    main, basin = checkpoints
    out = tmp_path / "mix.npz"
    assert cli.main(["sample", str(main), "-n", "60", "-o", str(out), "--mix",
                     f"{basin}:0.25", "--seed", "2"]) == 0  # fmt: skip
    data = np.load(out)
    assert data["positions"].shape == (60, 22, 3) and np.isfinite(data["log_weights"]).all()
    assert "2-run mixture (0.75, 0.25)" in capsys.readouterr().out


class _Gauss(torch.nn.Module):
    """Diagonal Gaussian with the density protocol of a flow (float64)."""

    def __init__(self, mu: list[float], sigma: list[float]) -> None:
        super().__init__()
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.sigma = torch.tensor(sigma, dtype=torch.float64)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        r = (y - self.mu) / self.sigma
        return (-0.5 * r * r - self.sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.mu + self.sigma * torch.randn(n, len(self.mu), dtype=torch.float64)
        return y, self.log_prob(y)


def test_mixture_density_samples_and_ais_from_it_is_unbiased():
    """`MixtureDensity`: log density = logsumexp of the weighted components, iid draws with
    component shares ~ fractions, and AIS started from it estimates an analytic normaliser
    without bias (the exactness of the AIS weights of a mixture model)."""
    from boltzgen.energy.toys import gmm_2d
    from boltzgen.sampling.ais import AnnealedImportanceSampler
    from boltzgen.sampling.generator import MixtureDensity

    torch.manual_seed(11)
    a, b = _Gauss([2.0, 0.0], [1.0, 1.5]), _Gauss([-2.0, 0.5], [0.7, 0.7])
    mix = MixtureDensity([a, b], [0.8, 0.2])
    y, lq = mix.sample_and_log_prob(20000)
    expected = torch.logsumexp(
        torch.stack([math.log(0.8) + a.log_prob(y), math.log(0.2) + b.log_prob(y)]), 0
    )
    torch.testing.assert_close(lq, expected)
    torch.testing.assert_close(mix.log_prob(y), expected)
    share_b = float((y[:, 0] < -3.5).double().mean()) / 0.98334  # P(b: y0 < -3.5) = 0.0166
    assert abs(share_b - 0.2 * 0.0166 / 0.98334) < 0.01  # b's left tail only b reaches
    near_b = float(((y - b.mu).norm(dim=1) < 1.0).double().mean())
    # b puts 1 - exp(-1/(2 * 0.49)) = 0.64 of its mass within 1 of its centre; a ~ 0.002
    assert abs(near_b - (0.2 * 0.6395 + 0.8 * 0.0021)) < 0.015
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureDensity([a, b], [0.8, 0.3])

    target = gmm_2d(n_modes=4, radius=2.0, scale=0.6)
    sampler = AnnealedImportanceSampler(2, 4, step_size=0.3, alpha=1.0)
    for _ in range(2):  # step-size adaptation
        sampler(mix.sample_and_log_prob(2000)[0], mix.log_prob, target.log_prob)
    ratios = []
    for _ in range(15):
        y0, lq0 = mix.sample_and_log_prob(2000)
        res = sampler(y0, mix.log_prob, target.log_prob, log_q=lq0)
        ratios.append(float(torch.exp(res.log_w - target.log_z).mean()))
    r = np.array(ratios)
    se = r.std(ddof=1) / math.sqrt(len(r))
    assert abs(r.mean() - 1) < 3 * se + 1e-12, (r.mean(), se)
    assert se < 0.05


def test_mixture_ais_draws_and_needs_one_coordinate_transform(checkpoints):
    main, basin = (pipeline.load_run(c) for c in checkpoints)
    s = pipeline.draw_mixture([main, basin], [0.8, 0.2], 30, batch_size=15, seed=2, ais=2)
    assert s.n == 30 and s.ais_intermediate == 2
    assert np.isfinite(s.log_weights).all()
    np.testing.assert_allclose(s.log_q, -s.energies / main.target.kT - s.log_weights)
    x = torch.from_numpy(s.positions).double()  # stored in float32: steep rows move
    u = TorchEnergy.from_openmm(systems.load("aldp").system)(x).numpy()
    ok = u < 1e3
    assert ok.sum() >= 5
    np.testing.assert_allclose(s.energies[ok], u[ok], rtol=1e-4, atol=1e-2)
    moved = pipeline.load_run(checkpoints[1])
    moved.model.coordinates.shift.add_(0.01)
    with pytest.raises(BoltzgenError, match="one coordinate transform"):
        pipeline.draw_mixture([main, moved], [0.8, 0.2], 10, ais=2)
    s0 = pipeline.draw_mixture([main, moved], [0.8, 0.2], 10, seed=2)  # plain: any transforms
    assert s0.n == 10


def test_mixture_ais_stopped_by_sigterm_resumes_to_the_uninterrupted_samples(
    checkpoints, tmp_path, monkeypatch
):
    """AIS from a mixture keeps a progress file like one flow's: SIGTERM in the third batch,
    then ``resume`` gives exactly the uninterrupted arrays; other fractions do not fit it."""
    runs = [pipeline.load_run(c) for c in checkpoints]
    kw = dict(batch_size=15, seed=4, ais=2)
    straight = pipeline.draw_mixture(runs, [0.8, 0.2], 60, **kw)
    partial = tmp_path / "m.partial.npz"
    calls, restore = sigterm_in_batch(monkeypatch, 3)
    with pytest.raises(pipeline.SamplingInterrupted) as stop:
        pipeline.draw_mixture(runs, [0.8, 0.2], 60, partial=partial, **kw)
    assert stop.value.partial == partial and 30 < stop.value.n_done <= 45 and len(calls) == 3
    restore()
    with pytest.raises(BoltzgenError, match="another checkpoint"):
        pipeline.draw_mixture(runs, [0.7, 0.3], 60, partial=partial, resume=True, **kw)
    resumed = pipeline.draw_mixture(runs, [0.8, 0.2], 60, partial=partial, resume=True, **kw)
    for key, value in straight.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[key], value, err_msg=key)
    with pytest.raises(BoltzgenError, match="no progress file"):
        pipeline.draw_mixture(runs, [0.8, 0.2], 10, partial=tmp_path / "x.npz")
