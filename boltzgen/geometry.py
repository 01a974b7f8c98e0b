"""Batched molecular geometry in torch: bond lengths, angles, dihedrals and atom placement.

All functions take Cartesian batches ``x`` of shape ``(batch, n_atoms, 3)`` (nm) and integer index
arrays naming the atoms, work in any float dtype on any device, and are differentiable.

Conventions (IUPAC, as mdtraj):

- ``angles(x, [[i, j, k]])`` is the angle at ``j`` between ``i - j`` and ``k - j``, in [0, pi].
- ``dihedrals(x, [[i, j, k, l]])`` is the torsion about ``j -> k``, in [-pi, pi): zero when ``i``
  and ``l`` are cis, positive when, looking down ``j -> k``, ``l`` is rotated clockwise from ``i``.
- `place_atoms` is the inverse of the three: it puts atom ``d`` at ``bond`` from ``c``, at
  ``angle`` ``b-c-d`` and with torsion ``a-b-c-d`` (the "natural extension reference frame"
  construction, NeRF; Parsons et al., J. Comput. Chem. 26, 1063 (2005)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "angles",
    "canonical_frame",
    "dihedrals",
    "distances",
    "place_atoms",
    "signed_volumes",
    "wrap_angle",
]

Index = Tensor | Sequence[Sequence[int]] | Sequence[int]


def _index(idx: Index, width: int, device: torch.device) -> Tensor:
    out = torch.as_tensor(idx, dtype=torch.long, device=device)
    if out.ndim == 1 and width > 1:
        out = out.reshape(1, -1)
    if out.ndim != 2 or out.shape[1] != width:
        raise ValueError(f"expected atom indices of shape (n, {width}), got {tuple(out.shape)}")
    return out


def _check_x(x: Tensor) -> None:
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected positions of shape (batch, n_atoms, 3), got {tuple(x.shape)}")


def wrap_angle(a: Tensor) -> Tensor:
    """Wrap angles (radians) to [-pi, pi); any shape."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def distances(x: Tensor, pairs: Index) -> Tensor:
    """Distances between atom pairs.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        pairs: Atom indices, shape ``(n, 2)``.

    Returns:
        Distances, shape ``(batch, n)``, nm.
    """
    _check_x(x)
    p = _index(pairs, 2, x.device)
    return torch.linalg.vector_norm(x[:, p[:, 1]] - x[:, p[:, 0]], dim=-1)


def _angle_between(u: Tensor, v: Tensor) -> Tensor:
    # atan2(|u x v|, u.v) is accurate near 0 and pi, where acos is not.
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def angles(x: Tensor, triples: Index) -> Tensor:
    """Angles ``i-j-k`` at the middle atom.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        triples: Atom indices, shape ``(n, 3)``.

    Returns:
        Angles, shape ``(batch, n)``, radians in [0, pi].
    """
    _check_x(x)
    t = _index(triples, 3, x.device)
    return _angle_between(x[:, t[:, 0]] - x[:, t[:, 1]], x[:, t[:, 2]] - x[:, t[:, 1]])


def _torsion(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    m = torch.cross(n1, n2, dim=-1)
    y = (m * b2).sum(-1) / torch.linalg.vector_norm(b2, dim=-1)
    return wrap_angle(torch.atan2(y, (n1 * n2).sum(-1)))


def dihedrals(x: Tensor, quads: Index) -> Tensor:
    """Torsion angles ``i-j-k-l`` about the ``j-k`` bond.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        quads: Atom indices, shape ``(n, 4)``.

    Returns:
        Dihedrals, shape ``(batch, n)``, radians in [-pi, pi).
    """
    _check_x(x)
    q = _index(quads, 4, x.device)
    return _torsion(x[:, q[:, 0]], x[:, q[:, 1]], x[:, q[:, 2]], x[:, q[:, 3]])


def signed_volumes(x: Tensor, quads: Index) -> Tensor:
    """Signed volumes ``det[x_i - x_c, x_j - x_c, x_k - x_c]`` for rows ``(c, i, j, k)``.

    The sign tells the handedness of the three substituents ``i, j, k`` around ``c``; it flips
    under a mirror image and is unchanged by rotations and translations.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        quads: Atom indices ``(centre, i, j, k)``, shape ``(n, 4)``.

    Returns:
        Volumes, shape ``(batch, n)``, nm^3.
    """
    _check_x(x)
    q = _index(quads, 4, x.device)
    c = x[:, q[:, 0]]
    u, v, w = x[:, q[:, 1]] - c, x[:, q[:, 2]] - c, x[:, q[:, 3]] - c
    return (u * torch.cross(v, w, dim=-1)).sum(-1)


def place_atoms(
    a: Tensor, b: Tensor, c: Tensor, bond: Tensor, angle: Tensor, torsion: Tensor
) -> Tensor:
    """Place atoms ``d`` from three reference atoms and their internal coordinates (NeRF).

    Args:
        a: Torsion reference positions, shape ``(..., 3)``, nm.
        b: Angle reference positions, shape ``(..., 3)``, nm.
        c: Bond reference positions, shape ``(..., 3)``, nm.
        bond: Distance ``|d - c|``, shape ``(...)``, nm.
        angle: Angle ``b-c-d``, shape ``(...)``, radians.
        torsion: Dihedral ``a-b-c-d``, shape ``(...)``, radians.

    Returns:
        Positions of ``d``, shape ``(..., 3)``, nm.
    """
    bc = c - b
    bc = bc / torch.linalg.vector_norm(bc, dim=-1, keepdim=True)
    n = torch.cross(b - a, bc, dim=-1)
    n = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True)
    m = torch.cross(n, bc, dim=-1)
    rs = (bond * torch.sin(angle)).unsqueeze(-1)
    return (
        c
        - (bond * torch.cos(angle)).unsqueeze(-1) * bc
        + rs * torch.cos(torsion).unsqueeze(-1) * m
        + rs * torch.sin(torsion).unsqueeze(-1) * n
    )


def canonical_frame(x: Tensor, origin: int, axis: int, plane: int) -> Tensor:
    """Rotate and translate each configuration into the frame fixed by three atoms.

    Atom ``origin`` goes to (0, 0, 0), ``axis`` onto the positive x axis and ``plane`` into the
    xy plane with y > 0. This removes the six rigid-body degrees of freedom exactly (a proper
    rotation: mirror images stay mirror images).

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        origin: Index of the atom put at the origin.
        axis: Index of the atom put on the +x axis.
        plane: Index of the atom put in the xy plane (y > 0); not collinear with the other two.

    Returns:
        Positions in that frame, shape ``(batch, n_atoms, 3)``, nm.
    """
    _check_x(x)
    x = x - x[:, origin : origin + 1]
    e1 = x[:, axis]
    e1 = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True)
    v = x[:, plane]
    e2 = v - (v * e1).sum(-1, keepdim=True) * e1
    e2 = e2 / torch.linalg.vector_norm(e2, dim=-1, keepdim=True)
    e3 = torch.cross(e1, e2, dim=-1)
    rot = torch.stack([e1, e2, e3], dim=-1)  # (batch, 3, 3), columns are the new axes
    return x @ rot
