"""Molecular systems: a molecule as data (prmtop, or PDB + force field) loaded into OpenMM.

A system directory ``systems/<name>/`` holds the structure files and a ``config.yaml``::

    name: aldp
    prmtop: alanine-dipeptide.prmtop     # AMBER topology and parameters, or ...
    positions: alanine-dipeptide.crd     # ... coordinates (crd/inpcrd/pdb)
    # pdb: molecule.pdb                  # a PDB (with hydrogens) ...
    # forcefield: [amber14-all.xml]      # ... parametrised by OpenMM force-field XML files
    implicit_solvent: OBC1               # OBC1 | OBC2 | HCT | GBn | GBn2
    temperature: 300.0                   # K

Units: positions in nm, masses in dalton, temperature in K, kT in kJ/mol.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.errors import SystemLoadError
from boltzgen.units import MOLAR_GAS_CONSTANT

__all__ = [
    "MolecularSystem",
    "available_systems",
    "from_pdb",
    "from_prmtop",
    "load",
    "resolve_path",
    "search_paths",
    "shipped_path",
    "system_dir",
]


#: The data package that holds the shipped systems (the top-level systems/ folder of the source).
_SHIPPED_PACKAGE = "boltzgen._systems"

SOLVENTS = ("implicit", "vacuum")
_IMPLICIT_MODELS = ("OBC1", "OBC2", "HCT", "GBn", "GBn2")
_FF_IMPLICIT_XML = {
    "OBC1": "implicit/obc1.xml",
    "OBC2": "implicit/obc2.xml",
    "HCT": "implicit/hct.xml",
    "GBn": "implicit/gbn.xml",
    "GBn2": "implicit/gbn2.xml",
}
_CONFIG_KEYS = {
    "name",
    "description",
    "prmtop",
    "positions",
    "pdb",
    "forcefield",
    "implicit_solvent",
    "temperature",
}


@dataclass
class MolecularSystem:
    """A molecule with its OpenMM Hamiltonian at a temperature.

    Attributes:
        name: Short name (the directory name for shipped systems).
        system: The `openmm.System` (no constraints, no cutoff, no periodic box).
        topology: The `openmm.app.Topology`.
        positions: Reference positions, shape `(n_atoms, 3)`, nm, float64.
        temperature: Temperature in K.
        solvent: ``"implicit"`` or ``"vacuum"``.
        implicit_model: Implicit-solvent model name (``"OBC1"``, ...) or None in vacuum.
        source: Where the molecule was loaded from.
    """

    name: str
    system: Any
    topology: Any
    positions: np.ndarray
    temperature: float
    solvent: str = "implicit"
    implicit_model: str | None = None
    source: str = ""
    _mdtraj_topology: Any = field(default=None, repr=False)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return self.system.getNumParticles()

    @property
    def kT(self) -> float:  # noqa: N802 - the physical symbol
        """Thermal energy k_B T in kJ/mol."""
        return MOLAR_GAS_CONSTANT * self.temperature

    @property
    def masses(self) -> np.ndarray:
        """Atomic masses, shape `(n_atoms,)`, dalton."""
        import openmm.unit as u

        return np.array(
            [self.system.getParticleMass(i).value_in_unit(u.dalton) for i in range(self.n_atoms)]
        )

    @property
    def mdtraj_topology(self) -> Any:
        """The topology as an `mdtraj.Topology` (built on first use)."""
        if self._mdtraj_topology is None:
            import mdtraj

            self._mdtraj_topology = mdtraj.Topology.from_openmm(self.topology)
        return self._mdtraj_topology

    def to_mdtraj(self, positions: np.ndarray | None = None) -> Any:
        """Positions `(n_frames, n_atoms, 3)` or `(n_atoms, 3)` in nm as an `mdtraj.Trajectory`."""
        import mdtraj

        xyz = self.positions if positions is None else np.asarray(positions)
        return mdtraj.Trajectory(np.asarray(xyz, dtype=np.float32), self.mdtraj_topology)

    def with_temperature(self, temperature: float) -> MolecularSystem:
        """The same Hamiltonian at another temperature (K)."""
        _check_temperature(temperature)
        return MolecularSystem(
            name=self.name,
            system=self.system,
            topology=self.topology,
            positions=self.positions,
            temperature=float(temperature),
            solvent=self.solvent,
            implicit_model=self.implicit_model,
            source=self.source,
            _mdtraj_topology=self._mdtraj_topology,
        )


def search_paths() -> list[Path]:
    """Existing directories searched for ``<name>/config.yaml``, first match wins.

    In order: the entries of ``$BOLTZGEN_SYSTEMS_PATH`` (os.pathsep-separated), the user
    directory ``$XDG_DATA_HOME/boltzgen/systems`` (``~/.local/share/boltzgen/systems`` when
    ``XDG_DATA_HOME`` is unset), ``./systems`` of the current directory, and the systems shipped
    with boltzgen (`shipped_path`). Missing directories and duplicates are left out.
    """
    paths = [Path(p) for p in os.environ.get("BOLTZGEN_SYSTEMS_PATH", "").split(os.pathsep) if p]
    paths += [p for p in (_user_dir(), Path.cwd() / "systems", _shipped_root()) if p is not None]
    unique: list[Path] = []
    for p in paths:
        if p.is_dir() and p.resolve() not in [q.resolve() for q in unique]:
            unique.append(p)
    return unique


def shipped_path(*parts: str) -> Path:
    """A file or directory of the systems shipped with boltzgen (the package data).

    Works the same in a source checkout installed with ``pip install -e .`` and in an installed
    wheel, whatever the current directory. Use it instead of paths built from ``__file__``.

    Args:
        *parts: Path components below the shipped systems folder, e.g.
            ``shipped_path("aldp", "reference", "reference.npz")``; none: the folder itself.

    Raises:
        SystemLoadError: boltzgen was installed without its data, or no such file.
    """
    root = _shipped_root()
    if root is None:
        raise SystemLoadError(
            f"the systems shipped with boltzgen (package {_SHIPPED_PACKAGE}) are not installed; "
            "reinstall boltzgen (pip install boltzgen-mol, or pip install -e . in a checkout)"
        )
    path = root.joinpath(*parts)
    if not path.exists():
        raise SystemLoadError(f"{path} is not among the systems shipped with boltzgen")
    return path


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` if it exists; failing that, the same path inside a system's folder when it
    reads ``[systems/]NAME/REST`` (e.g. ``systems/aldp/reference`` or ``aldp/fab.yaml``
    outside a checkout), looked up with `system_dir`; else ``path`` unchanged (the caller
    reports it missing)."""
    p = Path(path)
    if p.exists():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("systems",) else p.parts
    if len(parts) >= 2:
        try:
            candidate = system_dir(parts[0]).joinpath(*parts[1:])
        except SystemLoadError:
            return p
        if candidate.exists():
            return candidate
    return p


def _user_dir() -> Path | None:
    data_home = os.environ.get("XDG_DATA_HOME")
    if not data_home:
        try:
            data_home = Path.home() / ".local" / "share"
        except RuntimeError:  # no home directory (some service accounts)
            return None
    return Path(data_home) / "boltzgen" / "systems"


def _shipped_root() -> Path | None:
    """The shipped systems folder, or None where the data package is not importable."""
    from importlib import resources

    try:
        root = resources.files(_SHIPPED_PACKAGE)
    except ModuleNotFoundError:  # e.g. a checkout on PYTHONPATH without pip install -e .
        return None
    # a plain directory in wheels and editable installs; not a zip archive
    return root if isinstance(root, Path) and root.is_dir() else None


def available_systems() -> list[str]:
    """Names of the systems found on `search_paths`."""
    names = {d.name for p in search_paths() for d in p.iterdir() if (d / "config.yaml").is_file()}
    return sorted(names)


def load(
    name: str | os.PathLike,
    solvent: str = "implicit",
    temperature: float | None = None,
) -> MolecularSystem:
    """Load a shipped or user system by name, or from a directory with a ``config.yaml``.

    Args:
        name: System name (``"aldp"``) or a path to a system directory.
        solvent: ``"implicit"`` (the config's implicit-solvent model) or ``"vacuum"``.
        temperature: Temperature in K; default: the config's (300 K if unset).

    Raises:
        SystemLoadError: unknown name, missing or malformed files, bad arguments.
    """
    directory = system_dir(name)
    config = _read_config(directory / "config.yaml")
    temperature = float(config.get("temperature", 300.0)) if temperature is None else temperature
    sys_name = str(config.get("name", directory.name))
    model = str(config.get("implicit_solvent", "OBC1"))
    if "prmtop" in config:
        positions = config.get("positions")
        return from_prmtop(
            directory / config["prmtop"],
            positions=None if positions is None else directory / positions,
            solvent=solvent,
            implicit_model=model,
            temperature=temperature,
            name=sys_name,
        )
    if "pdb" in config:
        ff = config.get("forcefield", ["amber14-all.xml"])
        ff = [ff] if isinstance(ff, str) else list(ff)
        ff = [str(directory / f) if (directory / f).is_file() else f for f in ff]
        return from_pdb(
            directory / config["pdb"],
            forcefield=ff,
            solvent=solvent,
            implicit_model=model,
            temperature=temperature,
            name=sys_name,
        )
    raise SystemLoadError(
        f"{directory / 'config.yaml'} names neither 'prmtop' nor 'pdb'; one of them is required"
    )


def from_prmtop(
    prmtop: str | os.PathLike,
    positions: str | os.PathLike | None = None,
    solvent: str = "implicit",
    implicit_model: str = "OBC1",
    temperature: float = 300.0,
    name: str | None = None,
) -> MolecularSystem:
    """Build a system from an AMBER prmtop (no cutoff, no constraints, flexible water).

    Args:
        prmtop: Path of the ``.prmtop`` file.
        positions: Coordinates (``.crd``/``.inpcrd``/``.rst7`` or ``.pdb``); required.
        solvent: ``"implicit"`` or ``"vacuum"``.
        implicit_model: ``OBC1``, ``OBC2``, ``HCT``, ``GBn`` or ``GBn2``.
        temperature: K.
        name: Defaults to the file stem.
    """
    import openmm.app as app

    _check_solvent(solvent, implicit_model)
    _check_temperature(temperature)
    prmtop = _existing(prmtop, "prmtop file")
    if positions is None:
        raise SystemLoadError(f"no positions given for {prmtop}; pass a .crd/.inpcrd or .pdb file")
    positions = _existing(positions, "positions file")
    try:
        top = app.AmberPrmtopFile(str(prmtop))
    except Exception as exc:  # OpenMM raises many types here
        raise SystemLoadError(f"could not read prmtop {prmtop}: {exc}") from exc
    xyz = _read_positions(positions)
    if xyz.shape[0] != top.topology.getNumAtoms():
        raise SystemLoadError(
            f"{positions} has {xyz.shape[0]} atoms but {prmtop} has {top.topology.getNumAtoms()}"
        )
    implicit = getattr(app, implicit_model) if solvent == "implicit" else None
    try:
        system = top.createSystem(
            implicitSolvent=implicit,
            nonbondedMethod=app.NoCutoff,
            constraints=None,
            rigidWater=False,
            removeCMMotion=False,
        )
    except Exception as exc:
        raise SystemLoadError(f"OpenMM could not build a system from {prmtop}: {exc}") from exc
    return MolecularSystem(
        name=name or prmtop.stem,
        system=system,
        topology=top.topology,
        positions=xyz,
        temperature=float(temperature),
        solvent=solvent,
        implicit_model=implicit_model if solvent == "implicit" else None,
        source=str(prmtop),
    )


def from_pdb(
    pdb: str | os.PathLike,
    forcefield: Sequence[str] = ("amber14-all.xml",),
    solvent: str = "implicit",
    implicit_model: str = "OBC1",
    temperature: float = 300.0,
    name: str | None = None,
) -> MolecularSystem:
    """Build a system from a PDB file (hydrogens included) and OpenMM force-field XML files.

    Args:
        pdb: Path of the PDB file.
        forcefield: Force-field XML names known to OpenMM (``"amber14-all.xml"``) or paths.
        solvent: ``"implicit"`` adds the matching ``implicit/*.xml``; ``"vacuum"`` does not.
        implicit_model: ``OBC1``, ``OBC2``, ``HCT``, ``GBn`` or ``GBn2``.
        temperature: K.
        name: Defaults to the file stem.
    """
    import openmm.app as app

    _check_solvent(solvent, implicit_model)
    _check_temperature(temperature)
    pdb = _existing(pdb, "PDB file")
    try:
        pdbfile = app.PDBFile(str(pdb))
    except Exception as exc:
        raise SystemLoadError(f"could not read PDB {pdb}: {exc}") from exc
    files = list(forcefield)
    if solvent == "implicit":
        files.append(_FF_IMPLICIT_XML[implicit_model])
    try:
        ff = app.ForceField(*files)
    except Exception as exc:
        raise SystemLoadError(
            f"could not load force field {files}: {exc}. Names are OpenMM's built-in XML files "
            "(e.g. amber14-all.xml, amber99sbildn.xml, charmm36.xml) or paths to your own."
        ) from exc
    try:
        system = ff.createSystem(
            pdbfile.topology,
            nonbondedMethod=app.NoCutoff,
            constraints=None,
            rigidWater=False,
            removeCMMotion=False,
        )
    except Exception as exc:
        raise SystemLoadError(
            f"force field {files} cannot parametrise {pdb}: {exc}. Check residue names and "
            "that all hydrogens are present."
        ) from exc
    xyz = np.array(pdbfile.getPositions(asNumpy=True).value_in_unit(_nm()), dtype=np.float64)
    return MolecularSystem(
        name=name or pdb.stem,
        system=system,
        topology=pdbfile.topology,
        positions=xyz,
        temperature=float(temperature),
        solvent=solvent,
        implicit_model=implicit_model if solvent == "implicit" else None,
        source=str(pdb),
    )


def _nm() -> Any:
    import openmm.unit as u

    return u.nanometer


def _check_solvent(solvent: str, implicit_model: str) -> None:
    if solvent not in SOLVENTS:
        raise SystemLoadError(f"unknown solvent {solvent!r}; choose one of {list(SOLVENTS)}")
    if solvent == "implicit" and implicit_model not in _IMPLICIT_MODELS:
        raise SystemLoadError(
            f"unknown implicit-solvent model {implicit_model!r}; choose one of "
            f"{list(_IMPLICIT_MODELS)}"
        )


def _check_temperature(temperature: float) -> None:
    if not np.isfinite(temperature) or temperature <= 0:
        raise SystemLoadError(f"temperature must be a positive number of kelvin, got {temperature}")


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SystemLoadError(f"{what} {path} does not exist")
    return path


def _read_positions(path: Path) -> np.ndarray:
    import openmm.app as app

    try:
        if path.suffix.lower() == ".pdb":
            pos = app.PDBFile(str(path)).getPositions(asNumpy=True)
        else:
            pos = app.AmberInpcrdFile(str(path)).getPositions(asNumpy=True)
    except Exception as exc:
        raise SystemLoadError(f"could not read positions from {path}: {exc}") from exc
    return np.array(pos.value_in_unit(_nm()), dtype=np.float64)


def system_dir(name: str | os.PathLike) -> Path:
    """The data directory of a system: a shipped name (searched in `search_paths`) or a path.

    Raises:
        SystemLoadError: no such system, or a directory without ``config.yaml``.
    """
    path = Path(name)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise SystemLoadError(f"system directory {path} has no config.yaml")
        return path
    for root in search_paths():
        candidate = root / str(name)
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemLoadError(
        f"unknown system {str(name)!r}; available: {', '.join(available_systems()) or 'none'} "
        f"(searched {', '.join(str(p) for p in search_paths())}; a directory with a config.yaml "
        "also works)"
    )


def _read_config(path: Path) -> dict[str, Any]:
    from boltzgen.files import read_yaml

    config = read_yaml(path, SystemLoadError, "system config")
    if not isinstance(config, dict):
        raise SystemLoadError(f"{path} must hold a mapping of keys to values")
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise SystemLoadError(
            f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}"
        )
    return config
