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

from collections.abc import Sequence

import torch
from torch import Tensor

from boltzgen.flows.base import wrap_angle

__all__ = [
    "angle_between",
    "angles",
    "canonical_frame",
    "component_major",
    "cross",
    "dihedrals",
    "distances",
    "dot",
    "gather",
    "norm",
    "place_atoms",
    "place_local",
    "signed_volumes",
    "torsion",
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


def component_major(x: Tensor) -> Tensor:
    """``(batch, n_atoms, 3)`` -> contiguous ``(3, n_atoms, batch)``, the fast layout here.

    Gathering atoms then copies whole rows of ``batch`` numbers, and every vector component is
    a contiguous ``(n, batch)`` block.
    """
    return x.permute(2, 1, 0).contiguous()


def gather(xt: Tensor, idx: Tensor) -> list[Tensor]:
    """Columns of an ``(n, k)`` index array from component-major ``xt`` ``(3, n_atoms, batch)``.

    Returns:
        ``k`` tensors of shape ``(3, n, batch)``.
    """
    n, k = idx.shape
    p = torch.index_select(xt, 1, idx.T.reshape(-1)).view(3, k, n, xt.shape[-1])
    return [p[:, j] for j in range(k)]


def cross(u: Tensor, v: Tensor) -> Tensor:
    """Cross product of component-major vectors ``(3, ...)``."""
    out = torch.empty_like(u) if not (u.requires_grad or v.requires_grad) else None
    if out is None:
        return torch.stack(
            [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
        )
    torch.mul(u[1], v[2], out=out[0]).addcmul_(u[2], v[1], value=-1)
    torch.mul(u[2], v[0], out=out[1]).addcmul_(u[0], v[2], value=-1)
    torch.mul(u[0], v[1], out=out[2]).addcmul_(u[1], v[0], value=-1)
    return out


def dot(u: Tensor, v: Tensor) -> Tensor:
    """Dot product of component-major vectors ``(3, ...)`` -> ``(...)``."""
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def norm(u: Tensor) -> Tensor:
    """Length of component-major vectors ``(3, ...)`` -> ``(...)``."""
    return dot(u, u).sqrt()


def angle_between(u: Tensor, v: Tensor) -> Tensor:
    """Angle between component-major vectors, radians in [0, pi].

    ``atan2(|u x v|, u.v)`` is accurate near 0 and pi, where ``acos`` is not.
    """
    return torch.atan2(norm(cross(u, v)), dot(u, v))


def torsion(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    """Dihedral ``p0-p1-p2-p3`` of component-major positions ``(3, ...)``, in [-pi, pi)."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1 = cross(b1, b2)
    n2 = cross(b2, b3)
    y = dot(cross(n1, n2), b2) / norm(b2)
    return wrap_angle(torch.atan2(y, dot(n1, n2)))


def distances(x: Tensor, pairs: Index) -> Tensor:
    """Distances between atom pairs.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        pairs: Atom indices, shape ``(n, 2)``.

    Returns:
        Distances, shape ``(batch, n)``, nm.
    """
    _check_x(x)
    p = gather(component_major(x), _index(pairs, 2, x.device))
    return norm(p[1] - p[0]).T


def angles(x: Tensor, triples: Index) -> Tensor:
    """Angles ``i-j-k`` at the middle atom.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        triples: Atom indices, shape ``(n, 3)``.

    Returns:
        Angles, shape ``(batch, n)``, radians in [0, pi].
    """
    _check_x(x)
    p = gather(component_major(x), _index(triples, 3, x.device))
    return angle_between(p[0] - p[1], p[2] - p[1]).T


def dihedrals(x: Tensor, quads: Index) -> Tensor:
    """Torsion angles ``i-j-k-l`` about the ``j-k`` bond.

    Args:
        x: Positions, shape ``(batch, n_atoms, 3)``, nm.
        quads: Atom indices, shape ``(n, 4)``.

    Returns:
        Dihedrals, shape ``(batch, n)``, radians in [-pi, pi).
    """
    _check_x(x)
    p = gather(component_major(x), _index(quads, 4, x.device))
    return torsion(*p).T


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
    c, i, j, k = gather(component_major(x), _index(quads, 4, x.device))
    return dot(i - c, cross(j - c, k - c)).T


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
    rs = bond * torch.sin(angle)
    local = torch.stack(
        [-bond * torch.cos(angle), rs * torch.cos(torsion), rs * torch.sin(torsion)]
    )
    d = place_local(a.movedim(-1, 0), b.movedim(-1, 0), c.movedim(-1, 0), local)
    return d.movedim(0, -1)


def place_local(a: Tensor, b: Tensor, c: Tensor, local: Tensor) -> Tensor:
    """NeRF with precomputed local coordinates, component-major (all shapes ``(3, ...)``).

    ``local = (-r cos(angle), r sin(angle) cos(torsion), r sin(angle) sin(torsion))`` is the
    position of ``d`` in the frame (bc, m, n) at ``c``; returns ``d``.
    """
    bc = c - b
    bc = bc / norm(bc)
    n = cross(b - a, bc)
    n = n / norm(n)
    m = cross(n, bc)
    return c + local[0] * bc + local[1] * m + local[2] * n


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
