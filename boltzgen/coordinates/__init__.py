"""Coordinates: Z-matrix from the bond graph, exact Cartesian <-> internal/mixed bijections,
torsions and chirality.

Modules: `geometry` (batched bonds, angles, dihedrals, atom placement in torch), `zmatrix`
(Z-matrix, molecular graph, backbone torsions, chiral centres), `internal`
(`InternalCoordinates`, `MixedCoordinates`), `chirality` (phi/psi and the backbone CVs, L/D form).
"""

from boltzgen.coordinates.chirality import (
    alpha_carbons,
    backbone_cvs,
    chirality,
    is_l_form,
    named_dihedrals,
    phi_psi,
    phi_psi_atoms,
)
from boltzgen.coordinates.internal import DEFAULT_SCALES, InternalCoordinates, MixedCoordinates
from boltzgen.coordinates.zmatrix import (
    ChiralCentre,
    MolecularGraph,
    ZMatrix,
    ZMatrixError,
    backbone_torsions,
    chiral_centres,
    molecular_graph,
)

__all__ = [
    "DEFAULT_SCALES",
    "ChiralCentre",
    "InternalCoordinates",
    "MixedCoordinates",
    "MolecularGraph",
    "ZMatrix",
    "ZMatrixError",
    "alpha_carbons",
    "backbone_cvs",
    "backbone_torsions",
    "chiral_centres",
    "chirality",
    "is_l_form",
    "molecular_graph",
    "named_dihedrals",
    "phi_psi",
    "phi_psi_atoms",
]
