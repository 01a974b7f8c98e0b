"""boltzgen.systems: shipped systems, user files, clear errors; the CLI's error contract."""

import os
import shutil

import mdtraj as md
import numpy as np
import openmm
import pytest

from boltzgen import cli, systems
from boltzgen.errors import BoltzgenError, SystemLoadError


def test_load_aldp_implicit_and_vacuum():
    s = systems.load("aldp")
    assert s.n_atoms == 22 and s.positions.shape == (22, 3) and s.positions.dtype == np.float64
    assert s.temperature == 300.0 and s.kT == pytest.approx(2.494339, rel=1e-6)
    forces = {type(f).__name__ for f in s.system.getForces()}
    assert forces == {
        "HarmonicBondForce",
        "HarmonicAngleForce",
        "PeriodicTorsionForce",
        "NonbondedForce",
        "CustomGBForce",
    }
    assert s.system.getNumConstraints() == 0
    assert s.masses.shape == (22,) and s.masses.sum() == pytest.approx(144.17, abs=0.1)
    # positions agree with the shipped PDB (independent reader: mdtraj)
    pdb = md.load(str(systems.system_dir("aldp") / "alanine-dipeptide.pdb"))
    np.testing.assert_allclose(s.positions, pdb.xyz[0], atol=1e-3)
    assert s.mdtraj_topology.n_atoms == 22 and s.to_mdtraj().n_frames == 1
    vac = systems.load("aldp", solvent="vacuum", temperature=600.0)
    assert "CustomGBForce" not in {type(f).__name__ for f in vac.system.getForces()}
    assert vac.kT == pytest.approx(2 * s.kT)
    assert systems.load("aldp").with_temperature(150).kT == pytest.approx(s.kT / 2)


def test_available_and_other_molecules():
    names = systems.available_systems()
    assert {"aldp", "xylene", "trpzip2"} <= set(names)
    xyl = systems.load("xylene")
    assert xyl.n_atoms == 18
    assert not any(r.name in ("ALA", "GLY") for r in xyl.topology.residues())


def test_user_prmtop_and_pdb(tmp_path):
    src = systems.system_dir("aldp")
    s = systems.from_prmtop(src / "alanine-dipeptide.prmtop", src / "alanine-dipeptide.pdb")
    assert s.n_atoms == 22
    pdb = tmp_path / "ala.pdb"
    shutil.copy(src / "alanine-dipeptide.pdb", pdb)
    s2 = systems.from_pdb(pdb, forcefield=["amber14-all.xml"], solvent="vacuum")
    assert s2.n_atoms == 22 and isinstance(s2.system, openmm.System)
    # a user directory with a config works like a shipped system
    (tmp_path / "mine").mkdir()
    shutil.copy(pdb, tmp_path / "mine" / "ala.pdb")
    (tmp_path / "mine" / "config.yaml").write_text("pdb: ala.pdb\nforcefield: amber14-all.xml\n")
    s3 = systems.load(tmp_path / "mine", solvent="implicit")
    assert s3.implicit_model == "OBC1" and s3.name == "mine"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: systems.load("no-such-molecule"), "available: .*aldp"),
        (lambda: systems.load("aldp", solvent="water"), "unknown solvent"),
        (lambda: systems.load("aldp", temperature=-3), "temperature"),
        (lambda: systems.from_prmtop("/nonexistent.prmtop", "/x.crd"), "does not exist"),
        (lambda: systems.from_pdb("/nonexistent.pdb"), "does not exist"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(SystemLoadError, match=match):
        call()


def test_unparametrisable_pdb_and_bad_config(tmp_path):
    src = systems.system_dir("xylene")
    with pytest.raises(SystemLoadError, match="cannot parametrise"):
        systems.from_pdb(src / "xylene.pdb", forcefield=["amber14-all.xml"])
    with pytest.raises(SystemLoadError, match="could not load force field"):
        systems.from_pdb(src / "xylene.pdb", forcefield=["no-such-ff.xml"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("prmtop: a.prmtop\ncolour: blue\n")
    with pytest.raises(SystemLoadError, match="unknown key"):
        systems.load(tmp_path / "bad")
    assert issubclass(SystemLoadError, BoltzgenError)


def test_cli_errors_exit_2_without_traceback(capsys):
    assert cli.main(["check-energy", "no-such-molecule"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boltzgen: error: unknown system") and "Traceback" not in err
    assert cli.main(["systems"]) == 0
    assert "aldp" in capsys.readouterr().out


def test_cli_check_energy_small(capsys):
    assert cli.main(["check-energy", "aldp", "--frames", "16"]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "TorchEnergy vs OpenMM" in out


def test_search_paths_order_and_shipped_path(tmp_path, monkeypatch):
    shipped = systems.shipped_path()
    assert (shipped / "aldp" / "config.yaml").is_file()
    assert systems.shipped_path("aldp", "reference", "reference.npz").is_file()
    with pytest.raises(SystemLoadError, match="not among the systems shipped"):
        systems.shipped_path("aldp", "no-such-file")
    env, data, cwd = (tmp_path / d for d in ("env", "data", "cwd"))
    for d in (env, data / "boltzgen" / "systems", cwd / "systems"):
        d.mkdir(parents=True)
    monkeypatch.setenv("BOLTZGEN_SYSTEMS_PATH", os.pathsep.join([str(env), str(tmp_path / "no")]))
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.chdir(cwd)
    assert systems.search_paths() == [
        env,
        data / "boltzgen" / "systems",
        cwd / "systems",
        shipped,
    ]
    # a user system shadows the shipped one of the same name
    shutil.copytree(shipped / "aldp", data / "boltzgen" / "systems" / "aldp")
    assert systems.system_dir("aldp") == data / "boltzgen" / "systems" / "aldp"
