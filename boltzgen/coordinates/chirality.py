"""Peptide torsions and chirality: phi/psi from the topology, L/D form of alpha carbons.

Every function takes Cartesian batches ``(batch, n_atoms, 3)`` in nm and finds its atoms from the
topology (atom names and bonds), so any peptide works, not only alanine dipeptide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from boltzgen.coordinates import geometry
from boltzgen.coordinates.zmatrix import (
    ChiralCentre,
    ZMatrixError,
    backbone_torsions,
    molecular_graph,
)
from boltzgen.flows.base import Transform

__all__ = [
    "alpha_carbons",
    "backbone_cvs",
    "chirality",
    "is_l_form",
    "named_dihedrals",
    "phi_psi",
    "phi_psi_atoms",
]


def named_dihedrals(x: Tensor, quads: dict[str, Sequence[int]]) -> dict[str, Tensor]:
    """Any named torsions of a Cartesian batch ``(batch, N, 3)``: ``{name: (batch,) rad}``."""
    if not quads:
        return {}
    values = geometry.dihedrals(x, [list(q) for q in quads.values()])
    return {k: values[:, i] for i, k in enumerate(quads)}


def backbone_cvs(topology: Any) -> dict[str, tuple[int, int, int, int]]:
    """The backbone torsions of a peptide as named collective variables: CV name -> atoms.

    ``"phi"`` and ``"psi"`` when the molecule has exactly one of each (alanine dipeptide), else
    ``"phi_<n>"`` / ``"psi_<n>"`` of every residue that has them, ``n`` the residue number of the
    structure file (PDB resSeq, e.g. ``psi_1`` ... ``phi_12`` for trpzip2, S1 ... K12); see
    `backbone_torsions`, whose quadruples these are. Empty for a molecule without a backbone.
    """
    tors = backbone_torsions(topology)
    return {k: q for k, q in tors.items() if "_" not in k or tors.get(k.split("_")[0]) != q}


def phi_psi_atoms(topology: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Atom quadruples ``(phi, psi)`` of the first residue with both backbone torsions.

    Raises:
        ZMatrixError: when the topology has no residue with both a phi and a psi torsion.
    """
    tors = backbone_torsions(topology)
    for k in tors:
        if k.startswith("phi_") and f"psi_{k[4:]}" in tors:
            return tuple(tors[k]), tuple(tors[f"psi_{k[4:]}"])
    raise ZMatrixError("the topology has no residue with both a phi and a psi torsion")


def phi_psi(x: Tensor, topology: Any) -> tuple[Tensor, Tensor]:
    """Backbone phi and psi of a peptide from Cartesian ``(batch, N, 3)`` nm.

    Returns:
        ``(phi, psi)``, each ``(batch, n)`` radians in [-pi, pi), in residue order (residues
        with both torsions defined; for alanine dipeptide ``n = 1``).

    Raises:
        ZMatrixError: when the topology has no residue with both phi and psi.
    """
    tors = backbone_torsions(topology)
    res = [k[4:] for k in tors if k.startswith("phi_") and f"psi_{k[4:]}" in tors]
    if not res:
        raise ZMatrixError("the topology has no residue with both a phi and a psi torsion")
    phi = geometry.dihedrals(x, [tors[f"phi_{r}"] for r in res])
    psi = geometry.dihedrals(x, [tors[f"psi_{r}"] for r in res])
    return phi, psi


def alpha_carbons(topology: Any) -> list[tuple[int, int, int, int]]:
    """``(CA, N, C, CB)`` of every amino-acid residue with a side chain (all but glycine)."""
    g = molecular_graph(topology)
    by_res: dict[int, dict[str, int]] = {}
    for i, (name, res) in enumerate(zip(g.names, g.residue_indices)):
        by_res.setdefault(res, {}).setdefault(name, i)
    adj = g.neighbours()
    out = []
    for res in sorted(by_res):
        a = by_res[res]
        names = ("N", "C", "CB")
        if "CA" in a and all(k in a and a[k] in adj[a["CA"]] for k in names):
            out.append((a["CA"], a["N"], a["C"], a["CB"]))
    return out


def chirality(x: Tensor, centres: Sequence[ChiralCentre] | Sequence[Sequence[int]]) -> Tensor:
    """Handedness of chiral centres: ``det[n1 - c, n2 - c, n3 - c] > 0``.

    Args:
        x: Positions ``(batch, N, 3)`` nm.
        centres: `ChiralCentre` objects (from `chiral_centres`) or rows ``(c, n1, n2, n3)``.

    Returns:
        ``(batch, n_centres)`` booleans; a mirror image flips every entry. Compare with a
        reference structure to tell configurations apart.
    """
    quads = [
        (c.centre, *c.neighbours[:3]) if isinstance(c, ChiralCentre) else tuple(c)[:4]
        for c in centres
    ]
    return geometry.signed_volumes(x, quads) > 0


def is_l_form(x: Tensor, topology: Any, transform: Transform | None = None) -> Tensor:
    """Whether every chiral alpha carbon of a peptide is in the L configuration.

    L means ``det[N - CA, C - CA, CB - CA] > 0``; this holds for the shipped alanine dipeptide
    and every residue of the NMR structure of trpzip2, and a mirror image fails it.

    Args:
        x: Cartesian ``(batch, N, 3)`` nm, or coordinates ``(batch, 3N-6)`` of ``transform``
            (an `InternalCoordinates` or `MixedCoordinates`; turned into Cartesian first).
        topology: The molecule's topology (openmm, mdtraj or a `MolecularSystem`).
        transform: The coordinate transform when ``x`` holds internal coordinates.

    Returns:
        ``(batch,)`` booleans.

    Raises:
        ZMatrixError: when the topology has no amino-acid residue.
    """
    if transform is not None:
        x = transform.forward(x)
    quads = alpha_carbons(topology)
    if not quads:
        raise ZMatrixError("no amino-acid alpha carbon (atoms N, CA, C, CB) in the topology")
    return (geometry.signed_volumes(x, quads) > 0).all(-1)
