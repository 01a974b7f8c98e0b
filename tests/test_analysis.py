"""Tests of boltzgen.analysis and the reweight / evaluate CLI (plots: tests/test_plots.py)."""

import json

import numpy as np
import pytest

from boltzgen import analysis, cli
from boltzgen.analysis import reweighting
from boltzgen.errors import BoltzgenError
from boltzgen.systems import shipped_path
from boltzgen.units import MOLAR_GAS_CONSTANT

REFERENCE = shipped_path("aldp", "reference")


@pytest.fixture(scope="module")
def aldp():
    from boltzgen import systems

    return systems.load("aldp")


@pytest.fixture(scope="module")
def aldp_frames(aldp):
    rng = np.random.default_rng(0)
    return aldp.positions[None] + rng.normal(0.0, 0.01, (40, aldp.n_atoms, 3))


def test_dihedral_matches_mdtraj_and_aldp_indices(aldp, aldp_frames):
    import mdtraj

    traj = aldp.to_mdtraj(aldp_frames)
    idx_phi, phi = mdtraj.compute_phi(traj)
    idx_psi, psi = mdtraj.compute_psi(traj)
    from boltzgen.coordinates import phi_psi_atoms

    assert phi_psi_atoms(aldp.topology) == (tuple(idx_phi[0]), tuple(idx_psi[0]))
    pp = analysis.phi_psi(aldp_frames, "aldp")
    np.testing.assert_allclose(pp[:, 0], phi[:, 0], atol=1e-5)
    np.testing.assert_allclose(pp[:, 1], psi[:, 0], atol=1e-5)


def test_dihedral_of_constructed_geometry():
    # i above the x-y plane, l rotated by +60 degrees around the j-k (z) axis.
    ang = np.radians(60.0)
    x = np.array(
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [np.cos(ang), np.sin(ang), 1.0]]
    )
    assert analysis.dihedral(x, (0, 1, 2, 3))[0] == pytest.approx(ang)
    assert analysis.dihedral(x * [1, -1, 1], (0, 1, 2, 3))[0] == pytest.approx(-ang)
    with pytest.raises(analysis.SampleError, match="shape"):
        analysis.dihedral(np.zeros((2, 4)), (0, 1, 2, 3))
    with pytest.raises(analysis.SampleError, match="NaN"):
        analysis.dihedral(np.full((1, 4, 3), np.nan), (0, 1, 2, 3))


def test_ramachandran_and_kl():
    rng = np.random.default_rng(1)
    phi, psi = rng.uniform(-np.pi, np.pi, (2, 3000))
    h = analysis.ramachandran(phi, psi, bins=12)
    counts, _, _ = np.histogram2d(phi, psi, bins=12, range=[(-np.pi, np.pi)] * 2)
    assert np.array_equal(h, counts / 3000)
    assert analysis.kl_divergence(h, h) < 1e-12
    # Two bins: KL([0.5, 0.5] || [0.9, 0.1]) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1).
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(5.0)
    assert analysis.kl_divergence(np.array([1, 1]), np.array([9, 1]), eps=0) == pytest.approx(
        expected
    )
    pp = np.stack([phi, psi], 1)
    assert analysis.ramachandran_kl(pp, pp, None, bins=20) < 1e-12
    lw = np.where(phi > 0, 0.0, np.log(0.2))
    assert analysis.ramachandran_kl(pp, pp, lw, bins=20) > 0.1


def test_marginal_kls_and_torsions():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(4000, 2))
    kls = analysis.marginal_kls(ref, ref, None, bins=20)
    np.testing.assert_allclose(kls, 0.0, atol=1e-12)
    shifted = ref + [0.0, 1.0]
    kls = analysis.marginal_kls(shifted, ref, None, bins=20)
    assert kls[0] < 1e-12 and kls[1] > 0.3
    assert analysis.torsion_quadruples([(0, 1), (1, 2), (2, 3)]) == [(0, 1, 2, 3)]
    # Branched: 4 bonded to 1 gives torsions 4-1-2-3 as well.
    assert analysis.torsion_quadruples([(0, 1), (1, 2), (2, 3), (1, 4)]) == [
        (0, 1, 2, 3),
        (3, 2, 1, 4),
    ]


def test_energy_histogram_is_a_density():
    e = np.random.default_rng(3).normal(-50.0, 10.0, 5000)
    dens, edges = analysis.energy_histogram(e, None, bins=30)
    assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0)
    ref, _ = np.histogram(e, bins=30, range=(e.min(), e.max()), density=True)
    np.testing.assert_allclose(dens, ref, rtol=1e-12)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_samples_validates(tmp_path, aldp, aldp_frames):
    pos = aldp_frames.astype(np.float32)
    n = pos.shape[0]
    e = np.zeros(n)
    ok = _write(
        tmp_path / "ok.npz",
        positions=pos,
        energies=e,
        log_q=np.full(n, -2.0),
        temperature=300.0,
        system="aldp",
    )
    s = analysis.load_samples(ok)
    np.testing.assert_allclose(s.log_w, 2.0)
    np.testing.assert_allclose(s.phi_psi, analysis.phi_psi(pos, "aldp"), atol=1e-6)
    cases = {
        "nan": (dict(positions=pos, log_weights=np.r_[np.nan, np.zeros(n - 1)]), "NaN"),
        "zero": (dict(positions=pos, log_weights=np.full(n, -np.inf)), "all weights are zero"),
        "shape": (dict(positions=pos[:, :, :2]), r"expected \(n, n_atoms, 3\)"),
        "len": (dict(positions=pos, log_weights=np.zeros(n + 1)), "but .log_weights. has"),
        "logq": (dict(positions=pos, log_q=np.zeros(n)), "without 'energies'"),
        "wshape": (dict(positions=pos, log_weights=np.zeros((n, 2))), "shape"),
    }
    for name, (arrays, match) in cases.items():
        with pytest.raises(analysis.SamplesFileError, match=match):
            analysis.load_samples(_write(tmp_path / f"{name}.npz", **arrays))
    with pytest.raises(BoltzgenError, match="cannot read"):
        analysis.load_samples(tmp_path / "missing.npz")


def test_samples_from_arrays_is_load_samples_without_the_file(tmp_path, aldp_frames):
    from boltzgen.pipeline import GeneratedSamples

    n = aldp_frames.shape[0]
    rng = np.random.default_rng(0)
    gen = GeneratedSamples(
        positions=aldp_frames.astype(np.float32),
        log_q=rng.normal(size=n),
        energies=rng.normal(size=n),
        log_weights=rng.normal(size=n),
        temperature=310.0,
        system="aldp",
    )
    mem = analysis.samples_from_arrays(gen.arrays())
    disk = analysis.load_samples(gen.save(tmp_path / "s.npz"))
    assert mem.path == "<arrays>" and disk.path == str(tmp_path / "s.npz")
    assert (mem.n, mem.system, mem.temperature, mem.time_series) == (n, "aldp", 310.0, False)
    for a, b in [(mem.log_w, disk.log_w), (mem.energies, disk.energies)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mem.positions, disk.positions)
    assert set(mem.cvs) == set(disk.cvs) == {"phi", "psi"}
    np.testing.assert_array_equal(mem.phi_psi, disk.phi_psi)
    bad = {**gen.arrays(), "log_weights": np.zeros(n + 1)}
    with pytest.raises(analysis.SamplesFileError, match="^drawn: .*but .log_weights. has"):
        analysis.samples_from_arrays(bad, "drawn")


def test_cli_reweight_table_json_and_errors(tmp_path, capsys, aldp, aldp_frames):
    rng = np.random.default_rng(5)
    pos = np.concatenate([aldp_frames] * 5).astype(np.float32)
    n = pos.shape[0]
    lw = rng.normal(size=n) * 0.5
    path = _write(
        tmp_path / "s.npz",
        positions=pos,
        log_weights=lw,
        energies=rng.normal(size=n),
        temperature=300.0,
        system="aldp",
    )
    # Every frame sits in the C7eq/beta-like start structure region or near it; use a state file
    # splitting on psi so both states are populated.
    states = tmp_path / "states.yaml"
    psi = np.degrees(analysis.phi_psi(pos, "aldp")[:, 1])
    cut = float(np.median(psi))
    states.write_text(
        f"units: degrees\nstates:\n  lo:\n    psi: [[-180, {cut}]]\n"
        f"  hi:\n    psi: [[{cut}, 180]]\n"
    )
    out = tmp_path / "r.json"
    rc = cli.main(
        [
            "reweight",
            path,
            "--states",
            str(states),
            "--out",
            str(out),
            "--n-bootstrap",
            "50",
            "--target-temperature",
            "320",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "ESS" in text and "k-hat" in text and "hi" in text and "kJ/mol" in text
    rep = json.loads(out.read_text())
    assert rep["ess"] == pytest.approx(reweighting.ess(lw))
    w = np.exp(lw - lw.max())
    p_hi = w[psi >= cut].sum() / w.sum()
    assert rep["states"][1]["population"] == pytest.approx(p_hi)
    kT = MOLAR_GAS_CONSTANT * 300.0
    assert rep["states"][1]["dF_kJ_per_mol"] == pytest.approx(-kT * np.log(p_hi / (1 - p_hi)))
    assert rep["states"][1]["dF_kT"] == pytest.approx(-np.log(p_hi / (1 - p_hi)))
    assert rep["fes"]["cvs"] == ["phi", "psi"]
    hi = psi >= cut
    assert rep["states"][1]["n_samples"] == int(hi.sum())
    assert rep["states"][1]["n_eff"] == pytest.approx(reweighting.ess(lw[hi]))
    assert "*" not in text.split("ESS in state")[1].split("\n")[1]
    # a state holding one sample is flagged as unreliable
    states.write_text(
        f"units: degrees\nstates:\n  lo:\n    psi: [[-180, {cut}]]\n"
        f"  one:\n    psi: [[{psi.max() - 1e-3}, 180]]\n"
    )
    assert cli.main(["reweight", path, "--states", str(states), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "effective sample count below 10 in one" in text
    assert json.loads(out.read_text())["states"][1]["n_eff"] < 10

    bad = _write(tmp_path / "bad.npz", positions=pos, log_weights=np.full(n, np.nan))
    assert cli.main(["reweight", bad]) == 2
    assert "NaN" in capsys.readouterr().err


def test_evaluate_reference_against_itself(tmp_path):
    # A subsample of the shipped MD reference, evaluated against itself: KL 0; ESS is that of the
    # reference's own importance weights (100 % once the weights are dropped).
    ref = np.load(REFERENCE / "reference.npz")
    step = max(1, ref["frame_index"].shape[0] // 300)
    keep = ref["frame_index"][::step]
    arrays = dict(
        phi=ref["phi"][keep],
        psi=ref["psi"][keep],
        energies=ref["energies"][keep],
        time_ps=ref["time_ps"][keep],
        positions=ref["positions"][::step],
        temperature=ref["temperature"],
        system=str(ref["system"]),
    )
    weighted = "log_weights" in ref.files
    if weighted:
        arrays["log_weights"] = ref["log_weights"][keep]
    log = tmp_path / "train.csv"
    log.write_text("step,loss\n0,2.0\n1,1.0\n")
    for name, extra in (("plain", {}), ("weighted", arrays if weighted else {})):
        data = {k: v for k, v in arrays.items() if k != "log_weights"}
        data.update({k: v for k, v in extra.items() if k == "log_weights"})
        sub = _write(tmp_path / f"ref_{name}.npz", **data)
        out = tmp_path / f"eval_{name}"
        rc = cli.main(
            [
                "evaluate",
                sub,
                "--reference",
                sub,
                "--out-dir",
                str(out),
                "--n-bootstrap",
                "20",
                "--training-log",
                str(log),
            ]
        )
        assert rc == 0
        m = json.loads((out / "metrics.json").read_text())
        if "log_weights" in data:
            assert m["ess_fraction"] == pytest.approx(reweighting.ess_fraction(data["log_weights"]))
        else:
            assert m["ess_fraction"] == 1.0
        assert m["ramachandran_kl_reweighted"] == 0.0
        if "log_weights" not in data:
            assert m["ramachandran_kl_raw"] == 0.0
        assert m["torsion_marginal_kl"]["max"] == 0.0
        for row in m["states"]:
            assert row["dF_difference_kJ_per_mol"] == 0.0
        for name in ("ramachandran", "fes_phi", "fes_psi", "energies", "training"):
            assert (out / f"{name}.png").stat().st_size > 1000
            assert (out / f"{name}.pdf").stat().st_size > 1000


def test_shipped_reference_halves_agree_and_sample_phi_positive():
    import yaml

    ref = np.load(REFERENCE / "reference.npz")
    phi, psi = ref["phi"].astype(np.float64), ref["psi"].astype(np.float64)
    assert ref["positions"].shape[0] == ref["frame_index"].shape[0]
    np.testing.assert_allclose(
        analysis.phi_psi(ref["positions"][:50], "aldp"),
        np.stack([phi, psi], 1)[ref["frame_index"][:50]],
        atol=1e-5,
    )
    spec = yaml.safe_load((REFERENCE.parent / "states.yaml").read_text())
    states = reweighting.states_from_dict(spec, scale=np.pi / 180)
    lw = ref["log_weights"] if "log_weights" in ref.files else None
    assert np.sum((phi > 0) & (phi < np.radians(120))) > 100  # alpha_L / C7ax is sampled
    half = phi.shape[0] // 2
    res = [
        reweighting.state_free_energies(
            states,
            {"phi": phi[sl], "psi": psi[sl]},
            None if lw is None else lw[sl],
            n_bootstrap=300,
            block_length=half // 20,
            seed=k,
        )
        for k, sl in enumerate((slice(0, half), slice(half, None)))
    ]
    # State 0 is the reference (dF = 0 exactly); compare the others.
    z = np.abs(res[0].free_energy[1:] - res[1].free_energy[1:]) / np.hypot(
        res[0].free_energy_error[1:], res[1].free_energy_error[1:]
    )
    assert np.all(z < 2.0), z
    readme = (REFERENCE / "README.md").read_text()
    assert "Length" in readme and "alpha_L_C7ax" in readme


def test_samples_file_with_wrong_atom_count_is_named(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, positions=np.zeros((5, 21, 3)), system="aldp", log_weights=np.zeros(5))
    with pytest.raises(analysis.SamplesFileError, match="21 atoms, system 'aldp' has 22"):
        analysis.load_samples(path)


def test_a_file_that_is_not_npz_is_named(tmp_path):
    path = tmp_path / "s.npz"
    path.write_text("positions: none\n")
    with pytest.raises(analysis.SamplesFileError, match="is not an .npz samples file"):
        analysis.load_samples(path)
    with pytest.raises(analysis.SamplesFileError, match="cannot read"):
        analysis.load_samples(tmp_path / "missing.npz")
