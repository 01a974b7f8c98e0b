"""Z-matrices built from a molecule's bond graph, backbone torsions and chiral centres.

A Z-matrix row ``(d, c, b, a)`` places atom ``d`` at bond length ``|d - c|``, angle ``b-c-d`` and
torsion ``a-b-c-d`` from three already placed atoms. A Z-matrix either starts from three *seed*
rows (``(z0,)``, ``(z1, z0)``, ``(z2, c, b)``: the six rigid-body degrees of freedom removed) or
from a set of *Cartesian atoms* whose positions are given by other means (then every row has
three references); see `boltzgen.coordinates`.

`ZMatrix.from_topology` builds one for any connected molecule (rings included) from an
`openmm.app.Topology` or an `mdtraj.Topology`:

1. Heavy atoms are placed before hydrogens, and atoms of the *main chain* before the rest: for
   peptides the backbone atoms of every phi/psi torsion, otherwise the longest heavy-atom path.
2. Atoms are placed in breadth-first order from the main chain's first atom; an atom's parent
   ``c`` is the placed neighbour it was reached from, ``b`` is ``c``'s parent.
3. The first atom placed on ``c`` (seen from ``b``) gets the proper chain torsion
   ``parent(b)-b-c-d``. With ``torsions="relative"`` (default) every further atom on ``c`` takes
   the first one as its torsion reference, ``first-b-c-d``: that torsion is the rotation of
   ``d`` about the ``b-c`` axis relative to its sibling (about +-120 degrees for sp3 centres,
   180 for sp2) and is nearly constant, where the proper torsion would move with the first one.
   ``torsions="chain"`` uses proper chain torsions for every atom.
4. A torsion is *circular* when it is a proper chain torsion about a bond that is not in a ring
   (rotatable bonds, and also amide bonds, whose narrow distribution a circular flow handles);
   sibling-relative and ring torsions are narrow and are standardised instead.

For peptides the backbone phi (C-N-CA-C) and psi (N-CA-C-N) torsions are explicit coordinates;
`ZMatrix.named_dihedrals` maps ``"phi_<n>"``/``"psi_<n>"`` (``n`` the residue number of the
structure file, PDB resSeq; see `backbone_torsions`; plain ``"phi"`` and ``"psi"`` when a
molecule has one of each, as alanine dipeptide) to their torsion position.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from boltzgen.errors import ZMatrixError

__all__ = [
    "ChiralCentre",
    "MolecularGraph",
    "ZMatrix",
    "ZMatrixError",
    "backbone_torsions",
    "chiral_centres",
    "molecular_graph",
]


@dataclass(frozen=True)
class MolecularGraph:
    """Atoms and bonds of a molecule, independent of the topology library.

    Attributes:
        names: Atom names.
        elements: Element symbols (``""`` where unknown).
        residue_names: Residue name of each atom.
        residue_indices: Residue index of each atom (0-based, topology order).
        bonds: Bonded atom pairs, shape ``(n_bonds, 2)``.
        residue_numbers: Residue number of each atom as the structure file gives it (PDB
            resSeq, AMBER residue number; 1-based in the shipped systems), or ``()`` where the
            topology has none that are integers.
    """

    names: tuple[str, ...]
    elements: tuple[str, ...]
    residue_names: tuple[str, ...]
    residue_indices: tuple[int, ...]
    bonds: tuple[tuple[int, int], ...]
    residue_numbers: tuple[int, ...] = ()

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.names)

    def neighbours(self) -> list[list[int]]:
        """Sorted neighbour lists."""
        adj: list[list[int]] = [[] for _ in range(self.n_atoms)]
        for i, j in self.bonds:
            adj[i].append(j)
            adj[j].append(i)
        return [sorted(set(a)) for a in adj]


def molecular_graph(topology: Any) -> MolecularGraph:
    """Read atoms and bonds from an `openmm.app.Topology`, an `mdtraj.Topology` or a graph.

    Raises:
        ZMatrixError: when the object is none of these.
    """
    if isinstance(topology, MolecularGraph):
        return topology
    if hasattr(topology, "mdtraj_topology"):  # a MolecularSystem
        topology = topology.mdtraj_topology
    if not hasattr(topology, "atoms") or not hasattr(topology, "bonds"):
        raise ZMatrixError(
            f"expected an openmm.app.Topology or mdtraj.Topology, got {type(topology).__name__}"
        )
    openmm_style = callable(topology.atoms)  # openmm: methods; mdtraj: properties
    atoms = list(topology.atoms() if openmm_style else topology.atoms)
    bonds = list(topology.bonds() if openmm_style else topology.bonds)
    try:  # openmm: residue.id, a string ("2"); mdtraj: residue.resSeq, an int
        numbers = tuple(int(a.residue.id if openmm_style else a.residue.resSeq) for a in atoms)
    except (TypeError, ValueError):  # insertion codes ("12A"), missing numbers
        numbers = ()
    return MolecularGraph(
        names=tuple(a.name for a in atoms),
        elements=tuple(a.element.symbol if a.element is not None else "" for a in atoms),
        residue_names=tuple(a.residue.name for a in atoms),
        residue_indices=tuple(int(a.residue.index) for a in atoms),
        bonds=tuple((int(b[0].index), int(b[1].index)) for b in bonds),
        residue_numbers=numbers,
    )


def _residue_labels(g: MolecularGraph) -> dict[int, int]:
    """Residue index -> the number that names its torsions: the structure file's residue number
    (resSeq) when every residue has one and they are unique, else the 0-based residue index."""
    index = {r: r for r in g.residue_indices}
    if len(g.residue_numbers) != g.n_atoms:
        return index
    numbers = dict(zip(g.residue_indices, g.residue_numbers))
    return numbers if len(set(numbers.values())) == len(numbers) else index


def backbone_torsions(topology: Any) -> dict[str, tuple[int, int, int, int]]:
    """Peptide backbone torsions found by atom names (N, CA, C) and inter-residue bonds.

    Returns:
        ``{"phi_<n>": (C_prev, N, CA, C), "psi_<n>": (N, CA, C, N_next)}`` for the residue whose
        N-CA-C carries the torsion, in residue order; ``n`` is its residue number in the
        structure file (PDB resSeq: ``phi_2`` of trpzip2 is Trp2's phi, ``phi_2`` of alanine
        dipeptide, ACE1-ALA2-NME3, the alanine's), or its 0-based residue index when the
        numbers are missing or not unique (several chains). Plus ``"phi"`` and ``"psi"``
        aliases when there is exactly one of each (alanine dipeptide). Empty for non-peptides.
    """
    g = molecular_graph(topology)
    label = _residue_labels(g)
    adj = g.neighbours()
    by_res: dict[int, dict[str, int]] = {}
    for i, (name, res) in enumerate(zip(g.names, g.residue_indices)):
        by_res.setdefault(res, {}).setdefault(name, i)
    out: dict[str, tuple[int, int, int, int]] = {}
    for res in sorted(by_res):
        atoms = by_res[res]
        if not {"N", "CA", "C"} <= atoms.keys():
            continue
        n, ca, c = atoms["N"], atoms["CA"], atoms["C"]
        if ca not in adj[n] or c not in adj[ca]:
            continue
        prev = [j for j in adj[n] if g.names[j] == "C" and g.residue_indices[j] != res]
        nxt = [j for j in adj[c] if g.names[j] == "N" and g.residue_indices[j] != res]
        if prev:
            out[f"phi_{label[res]}"] = (prev[0], n, ca, c)
        if nxt:
            out[f"psi_{label[res]}"] = (n, ca, c, nxt[0])
    for kind in ("phi", "psi"):
        keys = [k for k in out if k.startswith(kind + "_")]
        if len(keys) == 1:
            out[kind] = out[keys[0]]
    return out


@dataclass(frozen=True)
class ChiralCentre:
    """An atom with four constitutionally distinct substituents.

    Attributes:
        centre: Atom index.
        neighbours: The four bonded atoms, heaviest element first (ties by graph class).
        name: ``"<residue><index>:<atom>"``.
    """

    centre: int
    neighbours: tuple[int, int, int, int]
    name: str


_ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9, "P": 15, "S": 16, "Cl": 17, "Br": 35}


def _graph_classes(g: MolecularGraph, adj: list[list[int]]) -> list[int]:
    """Colour refinement (Weisfeiler-Lehman) of atoms, starting from their elements."""
    labels = [hash(e) for e in g.elements]
    n_classes = len(set(labels))
    for _ in range(g.n_atoms):
        new = [hash((labels[i], tuple(sorted(labels[j] for j in adj[i])))) for i in range(len(adj))]
        ranks = {v: k for k, v in enumerate(sorted(set(new)))}
        new = [ranks[v] for v in new]
        if len(set(new)) == n_classes:
            return new
        labels, n_classes = new, len(set(new))
    return labels


def chiral_centres(topology: Any) -> list[ChiralCentre]:
    """Atoms bonded to four constitutionally distinct neighbours (stereocentres).

    Neighbours are told apart by colour refinement of the bond graph, so two substituents count
    as equal when they are the same constitution (three methyl hydrogens, the two HA of glycine).
    Alanine dipeptide has exactly one: the alpha carbon (atom 8; neighbours N 6, C 14, CB 10,
    HA 9).
    """
    g = molecular_graph(topology)
    adj = g.neighbours()
    classes = _graph_classes(g, adj)
    out = []
    for i, nb in enumerate(adj):
        if len(nb) != 4 or len({classes[j] for j in nb}) != 4:
            continue
        order = sorted(nb, key=lambda j: (-_ATOMIC_NUMBER.get(g.elements[j], 0), classes[j], j))
        name = f"{g.residue_names[i]}{g.residue_indices[i]}:{g.names[i]}"
        out.append(ChiralCentre(i, (order[0], order[1], order[2], order[3]), name))
    return out


def _components(n: int, adj: list[list[int]]) -> list[list[int]]:
    seen = [False] * n
    comps = []
    for s in range(n):
        if seen[s]:
            continue
        comp, queue = [], deque([s])
        seen[s] = True
        while queue:
            i = queue.popleft()
            comp.append(i)
            for j in adj[i]:
                if not seen[j]:
                    seen[j] = True
                    queue.append(j)
        comps.append(sorted(comp))
    return comps


def _bfs(adj: list[list[int]], start: int, skip: tuple[int, int] | None = None) -> list[int]:
    """Graph distances from ``start`` (-1 unreachable), optionally without bond ``skip``."""
    dist = [-1] * len(adj)
    dist[start] = 0
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in adj[i]:
            if dist[j] < 0 and (i, j) != skip and (j, i) != skip:
                dist[j] = dist[i] + 1
                queue.append(j)
    return dist


def _path(adj: list[list[int]], start: int, end: int) -> list[int]:
    parent = {start: start}
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in adj[i]:
            if j not in parent:
                parent[j] = i
                queue.append(j)
    path = [end]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


class ZMatrix:
    """A Z-matrix: how to place every atom from already placed ones.

    Args:
        rows: ``(atom, bond_ref, angle_ref, torsion_ref)`` per placed atom, in placement order.
            Without ``cartesian_atoms`` the first three rows are the seed, written ``(z0,)``,
            ``(z1, z0)``, ``(z2, c, b)`` (or padded with -1) where ``c`` is ``z0`` or ``z1``.
        n_atoms: Number of atoms (default: every atom appears in ``rows``/``cartesian_atoms``).
        cartesian_atoms: Atoms placed by Cartesian coordinates (at least three; the first three
            fix the frame), or empty.
        circular: Per torsion row, whether the torsion is treated as circular (default: all).
        named_dihedrals: Names for torsion positions (``{"phi": 3}``).

    Raises:
        ZMatrixError: rows that do not place each atom once from distinct, already placed atoms.
    """

    def __init__(
        self,
        rows: Sequence[Sequence[int]],
        n_atoms: int | None = None,
        cartesian_atoms: Sequence[int] = (),
        circular: Sequence[bool] | None = None,
        named_dihedrals: Mapping[str, int] | None = None,
    ) -> None:
        table = np.full((len(rows), 4), -1, dtype=np.int64)
        for k, row in enumerate(rows):
            vals = [int(v) for v in row if v is not None and int(v) >= 0]
            if not 1 <= len(vals) <= 4:
                raise ZMatrixError(f"Z-matrix row {k} = {list(row)} needs 1 to 4 atom indices")
            table[k, : len(vals)] = vals
        cart = tuple(int(i) for i in cartesian_atoms)
        n = len(rows) + len(cart) if n_atoms is None else int(n_atoms)
        if n < 3:
            raise ZMatrixError(f"a Z-matrix needs at least 3 atoms, got {n}")
        if 0 < len(cart) < 3:
            raise ZMatrixError("give at least three Cartesian atoms (they fix the frame), or none")
        placed = list(cart)
        if sorted(placed + table[:, 0].tolist()) != list(range(n)):
            raise ZMatrixError(
                f"rows and Cartesian atoms must name each of the {n} atoms exactly once"
            )
        done = set(cart)
        for k, row in enumerate(table):
            need = 3 if cart else min(k, 3)
            refs = [int(r) for r in row[1:] if r >= 0]
            if len(refs) != need:
                raise ZMatrixError(
                    f"Z-matrix row {k} (atom {row[0]}) needs {need} reference atoms, has {refs}"
                )
            if len(set(refs) | {int(row[0])}) != need + 1 or not set(refs) <= done:
                raise ZMatrixError(
                    f"Z-matrix row {k} (atom {row[0]}) must reference {need} distinct, already "
                    f"placed atoms, got {refs}"
                )
            done.add(int(row[0]))
        self.rows = table
        self.n_atoms = n
        self.cartesian_atoms = cart
        n_tors = int((table[:, 3] >= 0).sum())
        circ = [True] * n_tors if circular is None else [bool(c) for c in circular]
        if len(circ) != n_tors:
            raise ZMatrixError(f"circular has {len(circ)} entries for {n_tors} torsions")
        self.circular = np.array(circ, dtype=bool)
        self.named_dihedrals = dict(named_dihedrals or {})
        for name, pos in self.named_dihedrals.items():
            if not 0 <= pos < n_tors:
                raise ZMatrixError(f"named dihedral {name!r} points to torsion {pos} of {n_tors}")

    def __repr__(self) -> str:
        return (
            f"ZMatrix(n_atoms={self.n_atoms}, cartesian_atoms={len(self.cartesian_atoms)}, "
            f"torsions={self.n_torsions} ({int(self.circular.sum())} circular))"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly description; `ZMatrix.from_dict` restores it."""
        return {
            "rows": [[int(v) for v in r if v >= 0] for r in self.rows],
            "n_atoms": self.n_atoms,
            "cartesian_atoms": list(self.cartesian_atoms),
            "circular": [bool(c) for c in self.circular],
            "named_dihedrals": dict(self.named_dihedrals),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZMatrix:
        """Rebuild a Z-matrix from `ZMatrix.to_dict` output (validated again)."""
        return cls(
            data["rows"],
            n_atoms=data.get("n_atoms"),
            cartesian_atoms=data.get("cartesian_atoms", ()),
            circular=data.get("circular"),
            named_dihedrals=data.get("named_dihedrals"),
        )

    @property
    def n_torsions(self) -> int:
        """Number of torsion coordinates."""
        return int((self.rows[:, 3] >= 0).sum())

    @property
    def bonds(self) -> np.ndarray:
        """``(atom, bond_ref)`` pairs of the bond coordinates, shape ``(n, 2)``."""
        return self.rows[self.rows[:, 1] >= 0][:, :2]

    @property
    def angles(self) -> np.ndarray:
        """``(atom, bond_ref, angle_ref)`` triples (angle at the middle), shape ``(n, 3)``."""
        return self.rows[self.rows[:, 2] >= 0][:, :3]

    @property
    def torsions(self) -> np.ndarray:
        """``(atom, bond_ref, angle_ref, torsion_ref)`` quadruples, shape ``(n, 4)``."""
        return self.rows[self.rows[:, 3] >= 0]

    def torsion_position(self, quad: Sequence[int]) -> int:
        """Position of the torsion ``a-b-c-d`` (either direction) among the torsions.

        Raises:
            ZMatrixError: when no row has that torsion.
        """
        q = tuple(int(i) for i in quad)
        for k, row in enumerate(self.torsions.tolist()):
            if tuple(row) in (q, q[::-1]):
                return k
        raise ZMatrixError(f"torsion {q} is not a coordinate of this Z-matrix")

    def dihedral_index(self, name: str) -> int:
        """Position of a named torsion (``"phi"``, ``"psi_3"``) among the torsions."""
        if name not in self.named_dihedrals:
            raise ZMatrixError(f"no dihedral named {name!r}; known: {sorted(self.named_dihedrals)}")
        return self.named_dihedrals[name]

    @classmethod
    def from_topology(
        cls,
        topology: Any,
        cartesian_atoms: Sequence[int] = (),
        torsions: str = "relative",
    ) -> ZMatrix:
        """Build a Z-matrix from a bond graph (see the module docstring for the rules).

        Args:
            topology: `openmm.app.Topology`, `mdtraj.Topology` or `MolecularGraph`.
            cartesian_atoms: Atoms to place by Cartesian coordinates (for `MixedCoordinates`);
                reordered so that the first three are a bonded chain where possible.
            torsions: ``"relative"`` or ``"chain"`` (rule 3 of the module docstring).

        Raises:
            ZMatrixError: fewer than 3 atoms, a disconnected molecule, bad arguments.
        """
        if torsions not in ("relative", "chain"):
            raise ZMatrixError(f"torsions must be 'relative' or 'chain', got {torsions!r}")
        g = molecular_graph(topology)
        n = g.n_atoms
        if n < 3:
            raise ZMatrixError(f"internal coordinates need at least 3 atoms, the molecule has {n}")
        adj = g.neighbours()
        comps = _components(n, adj)
        if len(comps) > 1:
            sizes = ", ".join(f"{len(c)} atoms from {c[0]}" for c in comps)
            raise ZMatrixError(
                f"the bond graph has {len(comps)} disconnected parts ({sizes}); internal "
                "coordinates need one connected molecule (check the topology's bonds)"
            )
        heavy = [e != "H" for e in g.elements]
        if sum(heavy) < 2:
            heavy = [True] * n
        named = backbone_torsions(g)
        quads = [q for k, q in named.items() if "_" in k]
        if quads:
            main = {i for q in quads for i in q}
            root = quads[0][0]
        else:
            root, main = _main_chain(adj, heavy)
        cart = _order_cartesian(adj, [int(i) for i in cartesian_atoms], n)
        order, parent = _placement_order(adj, heavy, main, root, cart)
        rows, circular = _rows(adj, order, parent, cart, torsions)
        z = cls(rows, n_atoms=n, cartesian_atoms=cart, circular=circular)
        names = {}
        for name, quad in named.items():
            try:
                names[name] = z.torsion_position(quad)
            except ZMatrixError:
                continue  # e.g. a backbone torsion inside the Cartesian block
        z.named_dihedrals = names
        return z


def _main_chain(adj: list[list[int]], heavy: list[bool]) -> tuple[int, set[int]]:
    """The longest shortest path between heavy atoms (endpoints of lowest index on ties)."""
    candidates = [i for i in range(len(adj)) if heavy[i]]

    def farthest(start: int) -> int:
        dist = _bfs(adj, start)
        return max(candidates, key=lambda i: (dist[i], -i))

    u = farthest(candidates[0])
    v = farthest(u)
    return min(u, v), set(_path(adj, min(u, v), max(u, v)))


def _order_cartesian(adj: list[list[int]], cart: list[int], n: int) -> tuple[int, ...]:
    if not cart:
        return ()
    if len(set(cart)) != len(cart) or min(cart) < 0 or max(cart) >= n:
        raise ZMatrixError(f"cartesian_atoms must be distinct atom indices in [0, {n}), got {cart}")
    if len(cart) < 3:
        raise ZMatrixError("give at least three Cartesian atoms (they fix the frame), or none")
    inside = set(cart)
    # frame (centre, nb1, nb2): the most central Cartesian atom with two Cartesian neighbours,
    # so that the frame's own fluctuations move the other Cartesian atoms least
    best: tuple[int, list[int]] | None = None
    for c in cart:
        nbs = [j for j in adj[c] if j in inside]
        if len(nbs) >= 2:
            dist = _bfs(adj, c)
            ecc = max(dist[i] for i in cart)
            if best is None or ecc < best[0]:
                best = (ecc, [c, nbs[0], nbs[1]])
    if best is None:
        return tuple(cart)
    head = best[1]
    return tuple(head + [i for i in cart if i not in head])


def _placement_order(
    adj: list[list[int]],
    heavy: list[bool],
    main: set[int],
    root: int,
    cart: tuple[int, ...],
) -> tuple[list[int], dict[int, int]]:
    """Best-first traversal: heavy before hydrogen, main chain first, then discovery order."""
    placed = list(cart) if cart else [root]
    done = set(placed)
    parent: dict[int, int] = {}
    heap: list[tuple[int, int, int, int]] = []
    seq = 0
    queued: set[int] = set()

    def discover(i: int) -> None:
        nonlocal seq
        for j in adj[i]:
            if j not in done and j not in queued:
                queued.add(j)
                parent[j] = i
                heapq.heappush(heap, (0 if heavy[j] else 1, 0 if j in main else 1, seq, j))
                seq += 1

    for i in placed:
        discover(i)
    order: list[int] = []
    while heap:
        *_, j = heapq.heappop(heap)
        order.append(j)
        done.add(j)
        discover(j)
    return ([] if cart else [root]) + order, parent


def _rows(
    adj: list[list[int]],
    order: list[int],
    parent: dict[int, int],
    cart: tuple[int, ...],
    mode: str,
) -> tuple[list[list[int]], list[bool]]:
    n = len(adj)
    rank = {i: k for k, i in enumerate(list(cart) + order)}
    ring_cache: dict[tuple[int, int], bool] = {}

    def in_ring(i: int, j: int) -> bool:
        key = (min(i, j), max(i, j))
        if key not in ring_cache:
            ring_cache[key] = _bfs(adj, i, skip=(i, j))[j] >= 0
        return ring_cache[key]

    def placed_neighbours(i: int, before: int, exclude: set[int]) -> list[int]:
        out = [j for j in adj[i] if j in rank and rank[j] < before and j not in exclude]
        return sorted(out, key=rank.__getitem__)

    def nearest(i: int, before: int, exclude: set[int]) -> int:
        dist = _bfs(adj, i)
        cands = [j for j in range(n) if j in rank and rank[j] < before and j not in exclude]
        return min(cands, key=lambda j: (dist[j], rank[j]))

    rows: list[list[int]] = []
    circular: list[bool] = []
    start = 0
    if not cart:
        z0, z1, z2 = order[:3]
        c2 = parent[z2]
        rows = [[z0], [z1, z0], [z2, c2, z1 if c2 == z0 else z0]]
        start = 3
    for d in order[start:]:
        before = rank[d]
        c = parent[d]
        b = parent.get(c, -1)
        if b < 0:
            nb = placed_neighbours(c, before, {d})
            b = nb[0] if nb else nearest(c, before, {c, d})
        proper = False
        a = -1
        if mode == "relative":
            sib = placed_neighbours(c, before, {b, d})
            a = sib[0] if sib else -1
        if a < 0:
            pb = parent.get(b, -1)
            if pb >= 0 and pb not in (c, d) and rank[pb] < before:
                a, proper = pb, True
            else:
                nb = placed_neighbours(b, before, {c, d})
                if nb:
                    a, proper = nb[0], True
                else:
                    nb = placed_neighbours(c, before, {b, d})
                    a = nb[0] if nb else nearest(b, before, {b, c, d})
        rows.append([d, c, b, a])
        circular.append(proper and b in adj[c] and not in_ring(b, c))
    return rows, circular
