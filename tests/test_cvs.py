"""Tests of boltzgen.analysis.cvs: collective variables of any molecule and states files over
them, through the library and the reweight / evaluate CLI.

Oracles: mdtraj (compute_phi / compute_psi / compute_dihedrals on the same frames and atoms,
topology selections) and numpy sums of the importance weights.
"""

import json

import mdtraj
import numpy as np
import pytest

from boltzgen import analysis, cli, systems
from boltzgen.analysis.cvs import StatesFile, dihedral_cvs, fes_cvs, load_states, sample_cvs
from boltzgen.errors import BoltzgenError
from boltzgen.units import MOLAR_GAS_CONSTANT

#: Trp2's side-chain chi1 (N-CA-CB-CG) and Trp4's psi, as trpzip2.pdb's residue numbers name them.
CHI1_TRP2 = [f"resSeq 2 and name {a}" for a in ("N", "CA", "CB", "CG")]
PSI_TRP4 = [
    "resSeq 4 and name N",
    "resSeq 4 and name CA",
    "resSeq 4 and name C",
    "resSeq 5 and name N",
]


@pytest.fixture(scope="module")
def trpzip2():
    return systems.load("trpzip2")


@pytest.fixture(scope="module")
def trp_samples(trpzip2, tmp_path_factory):
    """A small trpzip2 samples file: the shipped structure perturbed (0.02 nm), its OpenMM
    energies, and ``log_q`` chosen so that the importance weights are moderate and known."""
    from boltzgen.energy import OpenMMEnergy

    rng = np.random.default_rng(0)
    n = 120
    pos = trpzip2.positions[None] + rng.normal(0.0, 0.02, (n, trpzip2.n_atoms, 3))
    pos = pos.astype(np.float32)
    import torch

    energies = OpenMMEnergy(trpzip2.system)(torch.as_tensor(pos, dtype=torch.float64)).numpy()
    kT = MOLAR_GAS_CONSTANT * trpzip2.temperature
    log_w = rng.normal(0.0, 0.7, n)
    path = tmp_path_factory.mktemp("trp") / "samples.npz"
    np.savez(
        path,
        positions=pos,
        energies=energies,
        log_q=-energies / kT - log_w,
        temperature=trpzip2.temperature,
        system="trpzip2",
    )
    return str(path), pos, log_w


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boltzgen: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_trpzip2_backbone_cvs_of_a_samples_file_match_mdtraj(trpzip2, trp_samples):
    path, pos, log_w = trp_samples
    s = analysis.load_samples(path)
    np.testing.assert_allclose(s.log_w, log_w, atol=1e-6)
    traj = trpzip2.to_mdtraj(pos)
    top = traj.topology
    expected = {}
    for kind, compute in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi)):
        idx, values = compute(traj)
        for k, quad in enumerate(idx):
            expected[f"{kind}_{top.atom(quad[1]).residue.resSeq}"] = values[:, k]
    assert set(s.cvs) == set(expected) and len(expected) == 22
    for name, values in expected.items():
        diff = np.angle(np.exp(1j * (s.cvs[name] - values)))
        assert np.abs(diff).max() < 1e-4, name
    assert s.phi_psi is None  # no single phi/psi pair in a 12-residue peptide
    # a samples file storing backbone torsions by name, without positions
    stored = path.replace(".npz", "_stored.npz")
    np.savez(stored, phi_6=s.cvs["phi_6"], psi_6=s.cvs["psi_6"], log_weights=log_w)
    again = analysis.load_samples(stored)
    assert list(again.cvs) == ["phi_6", "psi_6"] and again.n == len(log_w)


def _states_yaml(cut_chi: float, cut_psi: float, atoms: tuple[list, list] | None) -> str:
    """A states file over Trp2's chi1 and Trp4's psi (by atom indices when `atoms` are given,
    else by selections) and the backbone CV phi_6."""
    if atoms is not None:
        chi, psi = (f"{{atoms: {list(a)}}}" for a in atoms)
    else:
        chi, psi = (f"{{select: {json.dumps(sel)}}}" for sel in (CHI1_TRP2, PSI_TRP4))
    return f"""\
units: degrees
cvs:
  chi1_trp2: {chi}
  psi4: {psi}
states:
  low:
    chi1_trp2: [[-180, {cut_chi}]]
  high_up:
    chi1_trp2: [[{cut_chi}, 180]]
    psi4: [[{cut_psi}, 180]]
  high_down:
    chi1_trp2: [[{cut_chi}, 180]]
    psi4: [[-180, {cut_psi}]]
  turn:
    phi_6: [[0, 180]]
"""


@pytest.mark.parametrize("form", ["atoms", "select"])
def test_reweight_trpzip2_states_over_its_own_torsions(
    trpzip2, trp_samples, tmp_path, capsys, form
):
    path, pos, log_w = trp_samples
    top = trpzip2.mdtraj_topology
    # the atoms of the selections, found by mdtraj (the oracle of the selection form)
    chi_atoms = [int(top.select(s)[0]) for s in CHI1_TRP2]
    psi_atoms = [int(top.select(s)[0]) for s in PSI_TRP4]
    traj = trpzip2.to_mdtraj(pos)
    chi, psi4 = np.degrees(mdtraj.compute_dihedrals(traj, [chi_atoms, psi_atoms])).T
    phi_idx, phi = mdtraj.compute_phi(traj)
    k6 = [top.atom(q[1]).residue.resSeq for q in phi_idx].index(6)
    phi6 = np.degrees(phi[:, k6])
    cut_chi, cut_psi = float(np.median(chi)), float(np.median(psi4))
    states = tmp_path / "states.yaml"
    atoms = (chi_atoms, psi_atoms) if form == "atoms" else None
    states.write_text(_states_yaml(cut_chi, cut_psi, atoms))
    out = tmp_path / "r.json"
    argv = ["reweight", path, "--states", str(states), "--out", str(out), "--n-bootstrap", "20"]
    assert cli.main(argv) == 0
    assert "high_down" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    w = np.exp(log_w - log_w.max())
    masks = {
        "low": chi < cut_chi,
        "high_up": (chi >= cut_chi) & (psi4 >= cut_psi),
        "high_down": (chi >= cut_chi) & (psi4 < cut_psi),
        "turn": phi6 >= 0,
    }
    rows = {r["name"]: r for r in rep["states"]}
    assert list(rows) == list(masks) and rep["reference_state"] == "low"
    for name, m in masks.items():
        assert rows[name]["n_samples"] == int(m.sum()), name
        assert rows[name]["population"] == pytest.approx(w[m].sum() / w.sum(), abs=1e-5), name
    assert 0 < masks["high_up"].sum() < masks["low"].sum()  # the states split the samples
    assert masks["turn"].sum() > len(log_w) // 2  # Asn6 mostly stays at positive phi
    # the surface defaults to the states file's first two CVs; --cv takes any CV names
    assert rep["fes"]["cvs"] == ["chi1_trp2", "psi4"]
    assert cli.main(argv + ["--cv", "phi_6,chi1_trp2"]) == 0
    assert json.loads(out.read_text())["fes"]["cvs"] == ["phi_6", "chi1_trp2"]


def test_evaluate_trpzip2_samples_against_themselves(trp_samples, tmp_path):
    path, _, _ = trp_samples
    states = tmp_path / "states.yaml"
    states.write_text(_states_yaml(0.0, 0.0, None))
    out = tmp_path / "eval"
    argv = ["evaluate", path, "--reference", path, "--states", str(states), "--out-dir", str(out)]
    assert cli.main(argv + ["--n-bootstrap", "5", "--bins", "12"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ramachandran_cvs"] == ["chi1_trp2", "psi4"]
    assert m["ramachandran_kl_reweighted"] == 0.0
    assert all(row["dF_difference_kJ_per_mol"] == 0.0 for row in m["states"])
    for stem in ("ramachandran", "fes_chi1_trp2", "fes_psi4", "fes_phi_6", "energies"):
        assert (out / f"{stem}.png").stat().st_size > 1000, stem


def test_shipped_states_files_load_over_their_own_molecules():
    aldp = load_states(None, "aldp")
    assert aldp.cvs == {} and aldp.cv_names == ["phi", "psi"]
    assert [s.name for s in aldp.states] == ["C7eq_beta", "alpha_R", "alpha_L_C7ax"]
    xylene = load_states(None, "xylene")
    top = systems.load("xylene").mdtraj_topology
    bonds = {frozenset((a.index, b.index)) for a, b in top.bonds}
    for name, (i, j, k, m) in xylene.cvs.items():
        # a methyl rotation: ring C - ipso C - methyl C - H, bonded in that order
        assert {frozenset((i, j)), frozenset((j, k)), frozenset((k, m))} <= bonds, name
        hydrogens = [a for a in range(top.n_atoms) if frozenset((a, k)) in bonds and a != j]
        assert m in hydrogens and len(hydrogens) == 3, name
        assert {top.atom(a).element.symbol for a in hydrogens} == {"H"}
    assert list(xylene.cvs) == ["methyl_1", "methyl_2"]
    assert [s.name for s in xylene.states] == ["sector_a", "sector_b", "sector_c"]
    trp = load_states(None, "trpzip2")
    assert trp.cvs == {} and trp.cv_names == ["phi_6", "psi_6"]
    assert fes_cvs(["psi_1", "phi_2", "psi_2", "phi_6", "psi_6"], trp) == ["phi_6", "psi_6"]
    assert fes_cvs(["psi_1", "phi_2", "psi_2"]) == ["phi_2", "psi_2"]
    assert fes_cvs(["methyl_1"], StatesFile([])) == []


def test_xylene_methyl_cvs_match_mdtraj():
    xylene = systems.load("xylene")
    defs = load_states(None, "xylene").cvs
    rng = np.random.default_rng(1)
    pos = xylene.positions[None] + rng.normal(0.0, 0.01, (30, xylene.n_atoms, 3))
    s = analysis.SampleSet(
        "frames", 30, "xylene", 300.0, None, None, {}, pos, np.arange(30), time_series=False
    )
    values = sample_cvs(s, defs)
    ref = mdtraj.compute_dihedrals(xylene.to_mdtraj(pos), list(defs.values()))
    for k, name in enumerate(defs):
        np.testing.assert_allclose(values[name], ref[:, k], atol=1e-5)


def test_dihedral_cvs_resolve_selections_and_check_atoms(trpzip2):
    top = trpzip2.mdtraj_topology
    got = dihedral_cvs({"chi": {"select": CHI1_TRP2}, "x": {"atoms": [0, 1, 4, 5]}}, trpzip2)
    assert got == {"chi": tuple(int(top.select(s)[0]) for s in CHI1_TRP2), "x": (0, 1, 4, 5)}
    with pytest.raises(BoltzgenError, match=r"cvs\.x\.atoms: index 218 outside \[0, 218\)"):
        dihedral_cvs({"x": {"atoms": [0, 1, 2, 218]}}, trpzip2)
    # without a topology, indices are checked against the samples' positions
    assert dihedral_cvs({"x": {"atoms": [0, 1, 2, 218]}}) == {"x": (0, 1, 2, 218)}


BAD_STATES = {
    "unknown CV": ("states: {a: {chi9: [0, 10]}}", "unknown CV 'chi9'; known: psi_1, phi_2"),
    "three atoms": ("cvs: {c: {atoms: [0, 1, 2]}}\nstates: {a: {c: [0, 10]}}", "cvs.c.atoms"),
    "index range": ("cvs: {c: {atoms: [0, 1, 2, 9999]}}\nstates: {a: {c: [0, 1]}}", "9999"),
    "float atoms": ("cvs: {c: {atoms: [0, 1, 2, 3.5]}}\nstates: {a: {c: [0, 1]}}", "cvs.c.atoms"),
    "repeated": ("cvs: {c: {atoms: [0, 1, 1, 3]}}\nstates: {a: {c: [0, 1]}}", "distinct"),
    "text bound": ("states: {a: {phi_6: [low, 10]}}", "state 'a', CV 'phi_6'"),
    "nan bound": ("states: {a: {phi_6: [.nan, 10]}}", "state 'a', CV 'phi_6'"),
    "ragged": ("states: {a: {phi_6: [[0, 10], [20]]}}", "state 'a', CV 'phi_6'"),
    "many atoms": (
        'cvs: {c: {select: ["resSeq 2", "name CA", "name C", "name N"]}}\nstates: {a: {c: [0, 1]}}',
        "matches 24 atoms",
    ),
    "no atom": (
        'cvs: {c: {select: ["name XX", "resSeq 2 and name CA", "resSeq 2 and name C", '
        '"resSeq 3 and name N"]}}\nstates: {a: {c: [0, 1]}}',
        "matches 0 atoms",
    ),
    "bad syntax": (
        'cvs: {c: {select: ["((", "a", "b", "c"]}}\nstates: {a: {c: [0, 1]}}',
        "bad atom selection",
    ),
    "both forms": (
        "cvs: {c: {atoms: [0, 1, 2, 3], select: [a, b, c, d]}}\nstates: {a: {c: [0, 1]}}",
        "cvs.c",
    ),
    "unknown key": ("state: {a: {phi_6: [0, 1]}}\nunits: degrees", "'states' key"),
    "extra key": ("states: {a: {phi_6: [0, 1]}}\ncv: {}", "unknown key 'cv'"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_states_files_exit_2_with_one_line(trp_samples, tmp_path, capsys, case):
    text, match = BAD_STATES[case]
    states = tmp_path / "bad.yaml"
    states.write_text(text + "\n")
    out = tmp_path / "r.json"
    argv = ["reweight", trp_samples[0], "--states", str(states), "--out", str(out)]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert match in line, line
    assert not out.exists()


def test_bad_cv_option_and_missing_positions_exit_2(trp_samples, tmp_path, capsys):
    path = trp_samples[0]
    assert cli.main(["reweight", path, "--cv", "phi,psi", "--out", str(tmp_path / "r.json")]) == 2
    assert "--cv must be one or two of psi_1, phi_2" in _one_error_line(capsys)
    s = analysis.load_samples(path)
    stored = tmp_path / "no_positions.npz"
    np.savez(stored, log_weights=s.log_w, system="trpzip2", **s.cvs)
    states = tmp_path / "s.yaml"
    states.write_text("cvs: {c: {atoms: [0, 1, 4, 5]}}\nstates: {a: {c: [-180, 0]}}\n")
    assert cli.main(["reweight", str(stored), "--states", str(states)]) == 2
    assert "CV 'c' of the states file is computed from positions" in _one_error_line(capsys)


def test_reweight_with_an_empty_reference_state_reports_it(trp_samples, tmp_path, capsys):
    # valid input whose first state holds no sample: exit 0, the rest of the report, a note
    path = trp_samples[0]
    phi6 = np.degrees(analysis.load_samples(path).cvs["phi_6"])
    lo = float(phi6.max()) + 1e-3
    states = tmp_path / "s.yaml"
    states.write_text(
        f"states:\n  empty: {{phi_6: [{lo}, 180]}}\n  rest: {{phi_6: [-180, {lo}]}}\n"
    )
    out = tmp_path / "r.json"
    assert cli.main(["reweight", path, "--states", str(states), "--out", str(out)]) == 0
    assert "state free energies not estimated: no sample" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert "reference state 'empty'" in rep["states_error"] and "states" not in rep
    assert rep["ess"] > 1


def test_readme_states_file_example_loads_for_trpzip2(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "cvs:" in b]
    path = tmp_path / "states.yaml"
    path.write_text(block)
    states = load_states(path, "trpzip2")
    top = systems.load("trpzip2", solvent="vacuum").mdtraj_topology
    names = [(top.atom(i).residue.resSeq, top.atom(i).name) for i in states.cvs["omega_6"]]
    assert names == [(6, "CA"), (6, "C"), (7, "N"), (7, "CA")]
    assert states.cvs["chi1_trp2"] == tuple(int(top.select(s)[0]) for s in CHI1_TRP2)
    assert states.cv_names == ["omega_6", "chi1_trp2", "phi_6"]
