"""The package's structure: one definition of each shared helper, one error hierarchy, the
CLI only parses and prints, the parts satisfy the protocols they exchange."""

import ast
import inspect
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import boltzgen
from boltzgen import errors, protocols

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "boltzgen"


def _definitions() -> Counter:
    """Top-level function and class names of every module, counted over the package."""
    names: Counter = Counter()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names[node.name] += 1
    return names


def test_shared_helpers_are_defined_once():
    defs = _definitions()
    for name in (
        "wrap_angle",
        "wrap_circular",
        "ess",
        "ess_fraction",
        "log_ess",
        "batch_ess_fraction",
        "phi_psi",
        "dihedral",
        "torsions",
        "load_states",
        "atomic_open",
        "save_npz",
        "save_torch",
        "write_json",
        "flow_space",
    ):
        assert defs[name] <= 1 or name == "phi_psi", name
    # phi_psi: the torch version on topologies and its numpy wrapper for samples files
    assert defs["phi_psi"] == 2
    gas_constant = [
        p for p in PACKAGE.rglob("*.py") if "8.314" in p.read_text() and p.name != "units.py"
    ]
    assert gas_constant == []
    savez = [p.name for p in PACKAGE.rglob("*.py") if "np.savez(" in p.read_text()]
    assert savez == ["files.py"]  # every samples file and MD checkpoint goes through save_npz


def test_every_error_is_a_boltzgen_error_defined_in_errors():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    assert len(classes) == len(errors.__all__)
    assert all(issubclass(c, errors.BoltzgenError) for c in classes)
    defs = _definitions()
    for name in errors.__all__:
        assert defs[name] == 1, f"{name} defined more than once"
    from boltzgen.config import ConfigError
    from boltzgen.flows.base import InputOutsideDomainError
    from boltzgen.train import CheckpointError, FABOptions, TrainOptions

    assert ConfigError is errors.ConfigError and CheckpointError is errors.CheckpointError
    assert InputOutsideDomainError is errors.InputOutsideDomainError
    # bad option values of every section are configuration errors
    with pytest.raises(errors.ConfigError):
        TrainOptions(objective="nonsense")
    with pytest.raises(errors.ConfigError):
        FABOptions(spacing="nonsense")


def test_cli_modules_hold_no_library_api():
    """README, notebooks and tests import only the entry points from the CLI; its modules export
    only ``register``/``run`` (one way of registering a subcommand)."""
    from boltzgen import cli

    used = []
    for path in [ROOT / "README.md", *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("tests/*.py")]:
        text = path.read_text()
        used += re.findall(r"from boltzgen\.cli(?:\.\w+)? import ([\w, ]+)", text)
    assert {n.strip() for u in used for n in u.split(",")} <= {"main", "build_parser"}
    import importlib

    for name in cli.SUBCOMMANDS:
        module = importlib.import_module(f"boltzgen.cli.{name}")
        assert set(module.__all__) == {"register", "run"}, name


def test_gas_constant_matches_openmm():
    import openmm.unit as u

    from boltzgen.units import MOLAR_GAS_CONSTANT, thermal_energy

    r = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
    assert MOLAR_GAS_CONSTANT == pytest.approx(r, rel=1e-9)
    assert thermal_energy(300.0) == pytest.approx(300.0 * r, rel=1e-9)


def test_wrap_angle_is_half_open_everywhere():
    from boltzgen.coordinates import geometry
    from boltzgen.flows import wrap_angle, wrap_circular

    assert geometry.wrap_angle is wrap_angle
    a = torch.tensor([math.pi, -math.pi, 3 * math.pi, 0.5], dtype=torch.float64)
    w = wrap_angle(a)
    assert (w >= -math.pi).all() and (w < math.pi).all()
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(wrap_circular(a, mask)[1::2], a[1::2])


def test_parts_satisfy_the_protocols():
    from boltzgen import systems
    from boltzgen.coordinates import InternalCoordinates
    from boltzgen.energy import BoltzmannTarget, TorchEnergy
    from boltzgen.flows import make_spline_flow
    from boltzgen.sampling import BoltzmannGenerator

    aldp = systems.load("aldp")
    ic = InternalCoordinates.from_topology(aldp.topology, aldp.positions)
    flow = make_spline_flow(ic.domains, n_blocks=1, hidden=8)
    model = BoltzmannGenerator(flow, ic)
    target = BoltzmannTarget(TorchEnergy.from_openmm(aldp.system), aldp.kT)
    assert isinstance(ic, protocols.Bijection)
    assert isinstance(flow, protocols.Density) and isinstance(model, protocols.Density)
    assert isinstance(target, protocols.EnergyModel)


def test_import_is_cheap():
    """``import boltzgen`` and building the CLI parser load neither torch nor OpenMM."""
    import subprocess
    import sys

    code = (
        "import sys, boltzgen; from boltzgen.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'openmm', 'mdtraj') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert boltzgen.__version__
