"""Collective variables (CVs) of a molecule: named dihedral angles, and the states files that use
them.

Two kinds of CV, both dihedrals in radians on [-pi, pi):

* backbone torsions, found in the topology (`boltzgen.coordinates.backbone_cvs`): ``phi`` and
  ``psi`` for a molecule with one of each (alanine dipeptide), else ``phi_<n>`` / ``psi_<n>`` of
  every residue, ``n`` the residue number of the structure file (PDB resSeq);
* dihedrals a states file defines under ``cvs:``, each by four zero-based atom indices or by four
  mdtraj atom selections that each match exactly one atom::

      cvs:
        methyl_1: {atoms: [1, 0, 3, 10]}
        chi1_trp2: {select: ["resSeq 2 and name N", "resSeq 2 and name CA",
                             "resSeq 2 and name CB", "resSeq 2 and name CG"]}

A `StatesFile` holds such definitions with the states (`boltzgen.analysis.reweighting.State`)
that name them; `load_states` reads one from YAML, `sample_cvs` computes the CVs of a samples
file, `fes_cvs` picks the pair of a free-energy surface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.analysis.reweighting import State, states_from_dict
from boltzgen.analysis.samples import SampleSet, _system_file, _system_topology, torsions
from boltzgen.errors import BoltzgenError, WeightError

__all__ = [
    "StatesFile",
    "cv_label",
    "dihedral_cvs",
    "fes_cvs",
    "load_states",
    "sample_cvs",
]

Atoms = tuple[int, int, int, int]


@dataclass(frozen=True)
class StatesFile:
    """Conformational states and the dihedral CVs they are defined on.

    Attributes:
        states: The states in file order (the first is the reference of free-energy
            differences).
        cvs: CV name -> four zero-based atom indices of the dihedrals the file defines (the
            molecule's backbone CVs need no definition).
        path: The file it was read from, or None.
    """

    states: list[State]
    cvs: dict[str, Atoms] = field(default_factory=dict)
    path: str | None = None

    @property
    def cv_names(self) -> list[str]:
        """The file's CVs in order: those defined under ``cvs:``, then any other CV the states
        use, in order of first use."""
        names = list(self.cvs)
        for st in self.states:
            names += [k for k in st.intervals if k not in names]
        return names


def _mdtraj(topology: Any) -> Any:
    """An `mdtraj.Topology` from an mdtraj or openmm topology or a `MolecularSystem`."""
    topology = getattr(topology, "mdtraj_topology", topology)
    if callable(getattr(topology, "atoms", None)):  # openmm.app.Topology
        import mdtraj

        topology = mdtraj.Topology.from_openmm(topology)
    return topology


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _select(top: Any, exprs: Any, where: str) -> Atoms:
    if (
        not isinstance(exprs, Sequence)
        or isinstance(exprs, str)
        or len(exprs) != 4
        or not all(isinstance(e, str) for e in exprs)
    ):
        raise BoltzgenError(f"{where}: expected 4 mdtraj atom selections (strings), got {exprs!r}")
    out = []
    for k, expr in enumerate(exprs):
        try:
            hits = top.select(expr)
        except Exception as exc:  # mdtraj: ValueError for syntax, others for bad keywords
            msg = str(exc).splitlines()[0] if str(exc) else ""
            if not msg or len(msg) > 80:  # pyparsing lists every keyword it expected
                msg = "not valid mdtraj selection syntax"
            raise BoltzgenError(f"{where}[{k}]: bad atom selection {expr!r}: {msg}") from exc
        if len(hits) != 1:
            raise BoltzgenError(
                f"{where}[{k}]: selection {expr!r} matches {len(hits)} atoms, expected exactly 1"
            )
        out.append(int(hits[0]))
    return tuple(out)  # type: ignore[return-value]


def dihedral_cvs(spec: Any, topology: Any | None = None, where: str = "cvs") -> dict[str, Atoms]:
    """Dihedral CVs from their definitions (a states file's ``cvs:`` mapping).

    Args:
        spec: ``{name: {"atoms": [i, j, k, l]}}`` (zero-based atom indices) or
            ``{name: {"select": [s_i, s_j, s_k, s_l]}}`` (mdtraj selections, one atom each).
        topology: The molecule (mdtraj or openmm topology, or a `MolecularSystem`): needed for
            ``select``; with it, indices are checked against its atom count. None: indices are
            checked when CVs are computed from positions.
        where: How error messages name the mapping (e.g. ``"states.yaml: cvs"``).

    Returns:
        CV name -> four distinct atom indices, in the mapping's order.

    Raises:
        BoltzgenError: naming the CV and field: not a mapping, neither or both of ``atoms`` and
            ``select``, not four entries, an index out of range, a selection matching no atom or
            several, repeated atoms.
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise BoltzgenError(f"{where}: expected a mapping of CV name to {{atoms: [i, j, k, l]}}")
    top = None if topology is None else _mdtraj(topology)
    out: dict[str, Atoms] = {}
    for name, entry in spec.items():
        here = f"{where}.{name}"
        if not isinstance(name, str) or not name:
            raise BoltzgenError(f"{where}: CV names must be strings, got {name!r}")
        if not isinstance(entry, Mapping) or len(set(entry) & {"atoms", "select"}) != 1:
            raise BoltzgenError(
                f"{here}: expected {{atoms: [i, j, k, l]}} or {{select: [4 selections]}}, "
                f"got {entry!r}"
            )
        unknown = sorted(set(entry) - {"atoms", "select"}, key=str)
        if unknown:
            raise BoltzgenError(f"{here}: unknown key {unknown[0]!r} (known: atoms, select)")
        if "select" in entry:
            if top is None:
                raise BoltzgenError(
                    f"{here}.select: atom selections need the molecule's topology (a samples "
                    "file of a known system)"
                )
            atoms = _select(top, entry["select"], f"{here}.select")
        else:
            raw = entry["atoms"]
            if (
                not isinstance(raw, Sequence)
                or isinstance(raw, str)
                or len(raw) != 4
                or not all(_is_index(i) for i in raw)
            ):
                raise BoltzgenError(
                    f"{here}.atoms: expected 4 zero-based atom indices, got {raw!r}"
                )
            atoms = tuple(int(i) for i in raw)  # type: ignore[assignment]
            n_atoms = None if top is None else top.n_atoms
            bad = [i for i in atoms if i < 0 or (n_atoms is not None and i >= n_atoms)]
            if bad:
                limit = f"[0, {n_atoms})" if n_atoms is not None else ">= 0"
                raise BoltzgenError(f"{here}.atoms: index {bad[0]} outside {limit}")
        if len(set(atoms)) != 4:
            raise BoltzgenError(f"{here}: a dihedral needs 4 distinct atoms, got {list(atoms)}")
        out[name] = atoms
    return out


def sample_cvs(
    samples: SampleSet, definitions: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """The collective variables of a samples file, name -> `(n,)` radians.

    Args:
        samples: The samples; their backbone torsions (`SampleSet.cvs`) are always included.
        definitions: Further dihedral CVs, name -> four atom indices (a `StatesFile`'s
            ``cvs``), computed from the positions; one named like a backbone torsion replaces it.

    Raises:
        BoltzgenError: definitions but not every sample has positions, an atom index beyond the
            samples' atoms.
    """
    out = dict(samples.cvs)
    if not definitions:
        return out
    names = list(definitions)
    idx = samples.position_index
    if samples.positions is None or idx is None or np.unique(idx).shape[0] != samples.n:
        raise BoltzgenError(
            f"{samples.path}: CV {names[0]!r} of the states file is computed from positions, "
            "and not every sample has them"
        )
    n_atoms = samples.positions.shape[1]
    for name, atoms in definitions.items():
        if len(atoms) != 4 or min(atoms) < 0 or max(atoms) >= n_atoms:
            raise BoltzgenError(
                f"CV {name!r}: atoms {list(atoms)} are not 4 indices in [0, {n_atoms}) (the "
                f"samples of {samples.system!r} have {n_atoms} atoms)"
            )
    values = np.empty((samples.n, len(names)))
    values[idx] = torsions(samples.positions, [definitions[k] for k in names])
    out.update({k: values[:, i] for i, k in enumerate(names)})
    return out


def _as_states_file(states: StatesFile | Sequence[State] | None) -> StatesFile:
    if isinstance(states, StatesFile):
        return states
    return StatesFile(list(states or []))


def _check_states(states: StatesFile, known: Sequence[str], what: str) -> None:
    """Every CV a state uses must be among `known` (``what`` says where they come from)."""
    where = f"{states.path}: " if states.path else ""
    for st in states.states:
        for name in st.intervals:
            if name not in known:
                raise BoltzgenError(
                    f"{where}state {st.name!r} uses unknown CV {name!r}; known: "
                    f"{', '.join(known) or 'none'} ({what} and the file's 'cvs:')"
                )


def fes_cvs(
    cvs: Sequence[str], states: StatesFile | None = None, requested: str | None = None
) -> list[str]:
    """The one or two CVs of a free-energy surface.

    Args:
        cvs: The CV names available.
        states: The states file, if any.
        requested: Comma-separated CV names (``--cv``); ``""`` for none; None for the default:
            ``phi`` and ``psi`` when the molecule has one of each (alanine dipeptide), else the
            first two CVs of the states file (`StatesFile.cv_names`), else the phi and psi of
            the first residue that has both, else none.

    Raises:
        BoltzgenError: a requested name that is not available, more than two.
    """
    if requested is not None:
        names = [c.strip() for c in requested.split(",") if c.strip()]
        bad = [c for c in names if c not in cvs]
        if bad or len(names) > 2:
            raise BoltzgenError(
                f"--cv must be one or two of {', '.join(cvs) or '(no CVs)'}, got {requested!r}"
            )
        return names
    if "phi" in cvs and "psi" in cvs:
        return ["phi", "psi"]
    if states is not None and states.cv_names:
        return [c for c in states.cv_names if c in cvs][:2]
    for c in cvs:
        if c.startswith("phi_") and "psi_" + c[4:] in cvs:
            return [c, "psi_" + c[4:]]
    return []


def load_states(path: str | Path | None, system: str | None = None) -> StatesFile:
    """Conformational states from a states YAML file (see ``systems/aldp/states.yaml``).

    The file has ``units: degrees|radians`` (default degrees), a ``states`` mapping (state ->
    CV -> ``[lo, hi]`` or a list of such half-open intervals; a sample is in a state when every
    listed CV lies in one of its intervals) and optionally ``cvs``, dihedrals by atoms or atom
    selections (`boltzgen.analysis.cvs.dihedral_cvs`). States may name those and the molecule's
    backbone torsions (``phi``/``psi``, or ``phi_<n>``/``psi_<n>`` by residue number).

    Args:
        path: The YAML file, or None for the system's shipped ``states.yaml``.
        system: System name: its topology resolves atom selections and checks atom indices and
            CV names; its ``states.yaml`` is used when ``path`` is None.

    Returns:
        A `StatesFile`: the states in file order (the first is the reference of free-energy
        differences) and the file's CV definitions; no states when ``path`` is None and the
        system ships no states file.

    Raises:
        BoltzgenError: unreadable or malformed file, naming the field: unknown keys, bad
            intervals, bad CV definitions, a state using a CV that is neither defined nor a
            backbone torsion of the system.
    """
    from boltzgen.files import read_yaml

    if path is None:
        path = _system_file(system, "states.yaml")
        if path is None:
            return StatesFile([])
    spec = read_yaml(path, BoltzgenError, "states file")
    if not isinstance(spec, dict) or ("states" not in spec and {"units", "cvs"} & set(spec)):
        raise BoltzgenError(f"{path}: expected a mapping with a 'states' key")
    if "states" in spec:
        unknown = sorted(set(spec) - {"units", "states", "cvs"}, key=str)
        if unknown:
            raise BoltzgenError(f"{path}: unknown key {unknown[0]!r} (known: units, states, cvs)")
    units = spec.get("units", "degrees")
    if units not in ("degrees", "radians"):
        raise BoltzgenError(f"{path}: units must be 'degrees' or 'radians', got {units!r}")
    top = None
    if system is not None:
        try:
            top = _system_topology(system)
        except BoltzgenError:  # not a known system: CVs are checked against the samples
            top = None
    cvs = dihedral_cvs(spec.get("cvs"), top, where=f"{path}: cvs")
    try:
        states = states_from_dict(spec, scale=math.pi / 180.0 if units == "degrees" else 1.0)
    except WeightError as exc:
        raise BoltzgenError(f"{path}: {exc}") from exc
    out = StatesFile(states, cvs, str(path))
    if top is not None:
        from boltzgen.coordinates import backbone_cvs

        known = list(dict.fromkeys([*backbone_cvs(top), *cvs]))
        _check_states(out, known, f"the backbone torsions of {system}")
    return out


def cv_label(name: str) -> str:
    """Axis label of a dihedral CV drawn in degrees: ``$\\phi$ (deg)``, ``$\\psi_{5}$ (deg)``,
    ``methyl_1 (deg)``."""
    kind, _, number = name.partition("_")
    if kind in ("phi", "psi") and (not number or number.lstrip("-").isdigit()):
        return rf"$\{kind}{'_{' + number + '}' if number else ''}$ (deg)"
    return f"{name} (deg)"
