"""Tests of boltzgen.sampling.md: Langevin MD and replica exchange with checkpoint/restart."""

import numpy as np
import pytest

from boltzgen import analysis, cli
from boltzgen.sampling import md
from boltzgen.units import MOLAR_GAS_CONSTANT


@pytest.fixture(scope="module")
def aldp():
    from boltzgen import systems

    return systems.load("aldp")


def _energy(system, positions):
    import openmm
    import openmm.unit as u

    ctx = openmm.Context(
        system.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    out = []
    for x in positions:
        ctx.setPositions(x.astype(np.float64) * u.nanometer)
        out.append(
            ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        )
    return np.array(out)


def test_plain_md_frames_and_energies(aldp):
    res = md.run_md(aldp, 1000, save_interval=100, seed=1, progress=False)
    assert res.positions.shape == (10, aldp.n_atoms, 3)
    assert res.positions.dtype == np.float32
    np.testing.assert_allclose(res.time_ps, 0.1 * np.arange(1, 11))
    # Energies recorded during the run are those of the saved frames (independent OpenMM context).
    np.testing.assert_allclose(res.energies, _energy(aldp, res.positions), atol=0.05)
    assert res.acceptance.shape == (0,)


def test_replica_exchange_restart_is_exact(aldp, tmp_path):
    kw = dict(
        save_interval=50,
        temperatures=[300.0, 400.0],
        exchange_interval=100,
        seed=3,
        checkpoint_interval=200,
        progress=False,
    )
    straight = md.run_md(aldp, 800, checkpoint=tmp_path / "a.npz", **kw)
    md.run_md(aldp, 400, checkpoint=tmp_path / "b.npz", **kw)  # "interrupted" half-way
    resumed = md.run_md(aldp, 800, checkpoint=tmp_path / "b.npz", **kw)
    assert resumed.positions.shape == (16, aldp.n_atoms, 3)
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.energies, straight.energies)
    assert 0.0 <= straight.acceptance[0] <= 1.0
    assert resumed.n_steps == 800
    with pytest.raises(md.MDError, match="seed"):
        md.run_md(aldp, 1000, checkpoint=tmp_path / "b.npz", **{**kw, "seed": 4})


def test_invalid_settings(aldp):
    with pytest.raises(md.MDError, match="must contain a replica at the system temperature"):
        md.run_md(aldp, 10, temperatures=[350.0, 400.0], progress=False)
    with pytest.raises(md.MDError, match="positive"):
        md.run_md(aldp, 0, progress=False)
    with pytest.raises(md.MDError, match="not available"):
        md.run_md(aldp, 10, platform="NoSuchPlatform", progress=False)


def test_cli_md_writes_trajectory_and_samples_file(tmp_path, capsys):
    import mdtraj

    out = tmp_path / "run"
    rc = cli.main(
        [
            "md",
            "aldp",
            "--length-ns",
            "0.0006",
            "--save-interval-ps",
            "0.1",
            "--replica-temperatures",
            "300,450",
            "--exchange-interval-ps",
            "0.2",
            "--checkpoint",
            str(tmp_path / "ck.npz"),
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "6 frames at 300.0 K" in capsys.readouterr().out
    traj = mdtraj.load_dcd(str(out) + ".dcd", top=str(out) + ".pdb")
    assert traj.n_frames == 6
    samples = analysis.load_samples(str(out) + ".npz")
    assert samples.n == 6 and samples.log_w is None and samples.time_series
    np.testing.assert_allclose(samples.phi_psi, analysis.phi_psi(traj.xyz, "aldp"), atol=1e-5)
    from boltzgen.analysis.reports import reweight_report

    report = reweight_report(samples, [], n_bootstrap=5)  # MD frames: time-correlated
    assert report["ess"] == 6 and report["statistical_inefficiency"] >= 1.0
    assert report["ess_time_series"] == report["ess"] / report["statistical_inefficiency"]
    assert (
        cli.main(
            [
                "md",
                "aldp",
                "--length-ns",
                "0.0001",
                "--save-interval-ps",
                "0.00015",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_torsion_bias_matches_openmm_and_hremd_keeps_unbiased_replica(aldp):
    import math

    import openmm
    import openmm.unit as u

    bias = md.TorsionBias((4, 6, 8, 14), 35.0, math.radians(30.0), 1.5)
    frames = aldp.positions[None] + np.random.default_rng(0).normal(0, 0.02, (5, aldp.n_atoms, 3))
    system = openmm.XmlSerializer.clone(aldp.system)
    force = bias.force()
    force.setForceGroup(31)
    system.addForce(force)
    ctx = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    ctx.setParameter("bias_scale", 1.0)
    for x in frames:
        ctx.setPositions(x * u.nanometer)
        e = ctx.getState(getEnergy=True, groups={31}).getPotentialEnergy()
        assert e.value_in_unit(u.kilojoule_per_mole) == pytest.approx(bias.energy(x[None])[0])
    phi = analysis.dihedral(frames, (4, 6, 8, 14))
    np.testing.assert_allclose(
        bias.energy(frames), -35.0 * np.exp(1.5 * (np.cos(phi - math.radians(30.0)) - 1.0))
    )

    res = md.run_md(
        aldp,
        600,
        save_interval=100,
        bias=bias,
        bias_scales=[0.0, 0.5, 1.0],
        exchange_interval=50,
        seed=2,
        progress=False,
    )
    assert res.bias_scales == [0.0, 0.5, 1.0] and res.acceptance.shape == (2,)
    assert np.all(res.acceptance > 0)
    # The frames kept are the unbiased replica's, with physical (unbiased) energies.
    np.testing.assert_allclose(res.energies, _energy(aldp, res.positions), atol=0.05)
    # Without an unbiased replica the least biased one is kept, with importance weights.
    res = md.run_md(
        aldp,
        100,
        save_interval=50,
        bias=bias,
        bias_scales=[1.0, 0.5],
        exchange_interval=50,
        progress=False,
    )
    kT = MOLAR_GAS_CONSTANT * 300.0
    np.testing.assert_allclose(res.log_weights, 0.5 * bias.energy(res.positions) / kT, atol=1e-4)
    with pytest.raises(md.MDError, match="need a bias"):
        md.run_md(aldp, 10, bias_scales=[0.0, 1.0], progress=False)


def test_single_biased_replica_carries_importance_weights(aldp):
    import math

    bias = md.TorsionBias((4, 6, 8, 14), 28.0, math.radians(20.0), 2.0)
    res = md.run_md(
        aldp, 500, save_interval=100, bias=bias, bias_scales=[1.0], seed=1, progress=False
    )
    kT = MOLAR_GAS_CONSTANT * 300.0
    # log w = +B(x) / kT turns the biased ensemble exp(-(U + B)/kT) into exp(-U/kT).
    np.testing.assert_allclose(res.log_weights, bias.energy(res.positions) / kT, atol=1e-4)
    np.testing.assert_allclose(res.energies, _energy(aldp, res.positions), atol=0.05)
    assert md.run_md(aldp, 100, save_interval=100, progress=False).log_weights is None


def test_cli_md_stopped_by_sigterm_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    """SIGTERM mid-way (a subprocess, signalled once its first checkpoint exists): the chunk in
    progress and its exchange finish, the checkpoint and the frames so far are written, exit
    143 with one line; the same command resumes and writes what an uninterrupted run writes,
    bit for bit (the OpenMM checkpoints carry positions, velocities and the integrators'
    random states, the npz checkpoint the exchange generator's state)."""
    import signal
    import subprocess
    import sys
    import time

    import mdtraj

    args = ["md", "aldp", "--length-ns", "0.003", "--replica-temperatures", "300,400"]
    args += ["--exchange-interval-ps", "0.1", "--checkpoint-interval-ps", "0.3", "--no-progress"]
    stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
    ckpt = tmp_path / "stopped.checkpoint.npz"  # the default checkpoint of --out stopped
    proc = subprocess.Popen(
        [sys.executable, "-m", "boltzgen", *args, "--out", stopped],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "SIGTERM at step" in err and "run the same command again to resume" in err
    step = int(np.load(ckpt)["step"])
    assert 300 <= step < 3000
    part = np.load(stopped + ".npz")
    assert bool(part["partial"]) and part["positions"].shape[0] == step // 100
    assert mdtraj.load_dcd(stopped + ".dcd", top=stopped + ".pdb").n_frames == step // 100

    assert cli.main([*args, "--out", stopped]) == 0
    assert "resuming" in capsys.readouterr().out
    assert not ckpt.exists()  # the default checkpoint goes once the outputs are written
    assert cli.main([*args, "--out", straight]) == 0
    a, b = np.load(stopped + ".npz"), np.load(straight + ".npz")
    assert sorted(a.files) == sorted(b.files) and not bool(a["partial"])
    for key in b.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["positions"].shape == (30, 22, 3)
    ta = mdtraj.load_dcd(stopped + ".dcd", top=stopped + ".pdb")
    np.testing.assert_array_equal(
        ta.xyz, mdtraj.load_dcd(straight + ".dcd", top=stopped + ".pdb").xyz
    )
