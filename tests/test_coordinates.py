"""boltzgen.coordinates / boltzgen.coordinates.zmatrix against independent oracles.

Oracles: mdtraj (bond lengths, angles, dihedrals, phi/psi), torch.autograd (log|det J| of the
reduced map, float64), the shipped L-alanine structure (chirality) and OpenMM molecular dynamics
frames at 300 K and 1000 K (realistic and strained inputs).
"""

import math

import mdtraj as md
import numpy as np
import pytest
import torch
from helpers import md_frames

from boltzgen import systems
from boltzgen.coordinates import (
    DEFAULT_SCALES,
    InternalCoordinates,
    MixedCoordinates,
    ZMatrix,
    ZMatrixError,
    alpha_carbons,
    backbone_cvs,
    backbone_torsions,
    chiral_centres,
    chirality,
    geometry,
    is_l_form,
    named_dihedrals,
    phi_psi,
)
from boltzgen.coordinates.zmatrix import MolecularGraph
from boltzgen.flows.base import Circular, Unbounded

ALDP_BACKBONE = [1, 4, 6, 8, 10, 14, 16, 18]  # heavy atoms of ACE-ALA-NME but the two O


@pytest.fixture(scope="session")
def aldp():
    return systems.load("aldp")


@pytest.fixture(scope="session")
def aldp_frames(aldp):
    """ALDP MD frames: 300 K, 1000 K and randomly perturbed ones (float64, nm)."""
    cold = md_frames(aldp, 300.0, 200)
    hot = md_frames(aldp, 1000.0, 200, seed=2)
    g = torch.Generator().manual_seed(3)
    noisy = cold[:100] + 0.02 * torch.randn(100, 22, 3, generator=g, dtype=torch.float64)
    return {"300K": cold, "1000K": hot, "perturbed": noisy}


@pytest.fixture(scope="session")
def aldp_ic(aldp, aldp_frames):
    return InternalCoordinates.from_topology(
        aldp.topology, aldp.positions, data=aldp_frames["300K"]
    )


@pytest.fixture(scope="session")
def others():
    """Two further molecules: p-xylene (ring + methyl branches) and trpzip2 (12 residues)."""
    out = {}
    for name in ("xylene", "trpzip2"):
        s = systems.load(name)
        g = torch.Generator().manual_seed(4)
        ref = torch.tensor(s.positions)
        x = ref + 0.01 * torch.randn(20, s.n_atoms, 3, generator=g, dtype=torch.float64)
        out[name] = (s, x)
    return out


def _random_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _angle_diff(a, b):
    return geometry.wrap_angle(a - b)


def _z_diff(transform, z1, z2):
    """Differences of flat vectors in raw units (nm, rad; torsions compared on the circle)."""
    d = (z1 - z2) * transform.scale.to(z1.dtype)
    tors = transform.dihedral_indices
    d[:, tors] = geometry.wrap_angle(d[:, tors])
    return d


def _free_components(transform):
    """Mask of the Cartesian components left free in the transform's frame, (N, 3)."""
    o, a, p = transform.frame_atoms
    mask = torch.ones(transform.n_atoms, 3, dtype=torch.bool)
    mask[o] = False
    mask[a, 1:] = False
    mask[p, 2] = False
    return mask.flatten()


def _autograd_log_dets(transform, x):
    """log|det| of the reduced maps z -> x and x -> z from autograd Jacobians (one frame)."""
    mask = _free_components(transform)
    x0 = transform.canonical(x)[0]
    z0 = transform.to_internal(x0[None])[0]

    def fwd(z):
        return transform.to_cartesian(z[None])[0].flatten()[mask]

    def inv(q):
        full = x0.flatten().clone()
        full = full.masked_scatter(mask, q)
        return transform.to_internal(full.reshape(1, -1, 3))[0]

    jf = torch.autograd.functional.jacobian(fwd, z0, vectorize=True)
    ji = torch.autograd.functional.jacobian(inv, x0.flatten()[mask], vectorize=True)
    assert jf.shape == ji.shape == (transform.dim, transform.dim)
    return torch.linalg.slogdet(jf)[1], torch.linalg.slogdet(ji)[1]


# -- Z-matrix ------------------------------------------------------------------------------------


def test_aldp_zmatrix_structure(aldp):
    zm = ZMatrix.from_topology(aldp.topology)
    assert zm.n_atoms == 22
    assert (len(zm.bonds), len(zm.angles), len(zm.torsions)) == (21, 20, 19)
    # the same Z-matrix from the mdtraj topology
    np.testing.assert_array_equal(ZMatrix.from_topology(aldp.mdtraj_topology).rows, zm.rows)
    bonds = {tuple(sorted((a.index, b.index))) for a, b in aldp.topology.bonds()}
    hydrogens = {a.index for a in aldp.topology.atoms() if a.element.symbol == "H"}
    order = zm.rows[:, 0].tolist()
    first_h = min(order.index(h) for h in hydrogens)
    assert all(i in hydrogens for i in order[first_h:]), "heavy atoms come before hydrogens"
    for d, c, b, a in zm.rows.tolist():
        if c >= 0:
            assert tuple(sorted((d, c))) in bonds
        if b >= 0:
            assert tuple(sorted((c, b))) in bonds
        if a >= 0:  # a chain a-b-c-d, or a sibling of d on c
            assert tuple(sorted((a, b))) in bonds or tuple(sorted((a, c))) in bonds
    # phi and psi are explicit torsions
    phi = zm.torsions[zm.dihedral_index("phi")].tolist()
    psi = zm.torsions[zm.dihedral_index("psi")].tolist()
    assert phi in ([14, 8, 6, 4], [4, 6, 8, 14])
    assert psi in ([16, 14, 8, 6], [6, 8, 14, 16])
    assert zm.circular[zm.dihedral_index("phi")] and zm.circular[zm.dihedral_index("psi")]


def test_chain_torsions_option_uses_proper_chains_only(aldp):
    zm = ZMatrix.from_topology(aldp.topology, torsions="chain")
    bonds = {tuple(sorted((a.index, b.index))) for a, b in aldp.topology.bonds()}
    for d, c, b, a in zm.torsions.tolist():
        assert {tuple(sorted(p)) for p in ((d, c), (c, b), (b, a))} <= bonds
    assert "phi" in zm.named_dihedrals and "psi" in zm.named_dihedrals


def test_ring_torsions_are_not_circular(others):
    s, _ = others["xylene"]
    zm = ZMatrix.from_topology(s.topology)
    ring = {0, 1, 2, 4, 5, 6}
    for (_, c, b, _), circ in zip(zm.torsions.tolist(), zm.circular):
        if {b, c} <= ring:
            assert not circ
    assert zm.circular.sum() == 2  # the two methyl rotors


def test_trpzip2_backbone_torsions_are_explicit(others):
    s, _ = others["trpzip2"]
    zm = ZMatrix.from_topology(s.mdtraj_topology)
    tors = backbone_torsions(s.topology)
    assert sum(k.startswith("phi_") for k in tors) == 11
    assert sum(k.startswith("psi_") for k in tors) == 11
    for name, quad in tors.items():
        row = zm.torsions[zm.dihedral_index(name)].tolist()
        assert row in (list(quad), list(quad)[::-1])
        assert zm.circular[zm.dihedral_index(name)]


def test_explicit_zmatrix(aldp, aldp_ic, aldp_frames):
    zm = ZMatrix.from_topology(aldp.topology)
    explicit = ZMatrix([r[r >= 0].tolist() for r in zm.rows], circular=zm.circular.tolist())
    ic = InternalCoordinates(explicit, aldp.positions, data=aldp_frames["300K"])
    x = aldp_frames["300K"][:5]
    torch.testing.assert_close(ic.to_internal(x), aldp_ic.to_internal(x))
    # a round trip through a plain dict (for checkpoints and configs)
    again = ZMatrix.from_dict(zm.to_dict())
    np.testing.assert_array_equal(again.rows, zm.rows)
    np.testing.assert_array_equal(again.circular, zm.circular)
    assert again.named_dihedrals == zm.named_dihedrals
    # a hand-written Z-matrix for a 4-atom chain
    zm4 = ZMatrix([[0], [1, 0], [2, 1, 0], [3, 2, 1, 0]])
    x4 = torch.tensor([[[0.0, 0, 0], [0.15, 0, 0], [0.2, 0.14, 0], [0.35, 0.15, 0.1]]]).double()
    ic4 = InternalCoordinates(zm4, reference_positions=x4[0])
    torch.testing.assert_close(ic4.to_cartesian(ic4.to_internal(x4)), ic4.canonical(x4))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([[0], [1, 0], [2, 1, 0], [3, 2, 1, 3]], "distinct"),
        ([[0], [1, 0], [2, 1, 0], [3, 2, 1, 4]], "already placed"),
        ([[0], [1, 0], [2, 1], [3, 2, 1, 0]], "needs 2 reference"),
        ([[0], [1, 0]], "at least 3 atoms"),
        ([[0], [1, 0], [2, 1, 0], [2, 1, 0, 3]], "exactly once"),
    ],
)
def test_invalid_explicit_zmatrix_raises(rows, match):
    with pytest.raises(ZMatrixError, match=match):
        ZMatrix(rows)


def _graph(n, bonds):
    return MolecularGraph(
        names=tuple(f"C{i}" for i in range(n)),
        elements=("C",) * n,
        residue_names=("MOL",) * n,
        residue_indices=(0,) * n,
        bonds=tuple(bonds),
    )


def test_disconnected_and_too_small_molecules_raise():
    with pytest.raises(ZMatrixError, match="disconnected"):
        ZMatrix.from_topology(_graph(6, [(0, 1), (1, 2), (3, 4), (4, 5)]))
    with pytest.raises(ZMatrixError, match="at least 3 atoms"):
        ZMatrix.from_topology(_graph(2, [(0, 1)]))
    with pytest.raises(ZMatrixError, match="relative"):
        ZMatrix.from_topology(_graph(3, [(0, 1), (1, 2)]), torsions="zigzag")
    with pytest.raises(ZMatrixError, match="Topology"):
        ZMatrix.from_topology("not a topology")


# -- InternalCoordinates -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["300K", "1000K", "perturbed"])
def test_aldp_round_trips(aldp_ic, aldp_frames, kind, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    x = aldp_frames[kind].to(dtype)
    z, log_det_inv = aldp_ic.inverse_and_log_det(x)
    assert z.shape == (len(x), 60) and z.dtype == dtype and log_det_inv.shape == (len(x),)
    xr, log_det_fwd = aldp_ic.forward_and_log_det(z)
    target = aldp_ic.canonical(aldp_frames[kind])  # the input without its rigid motion
    assert (xr.double() - target).abs().max() < tol
    assert (log_det_inv + log_det_fwd).abs().max() < (1e-3 if dtype == torch.float32 else 1e-10)
    zr = aldp_ic.to_internal(xr)
    assert _z_diff(aldp_ic, zr.double(), z.double()).abs().max() < tol
    # internal -> Cartesian -> internal from random internal coordinates around the data
    g = torch.Generator().manual_seed(11)
    zn = z.double() + 0.5 * torch.randn(z.shape, generator=g, dtype=torch.float64)
    circ = aldp_ic.circular_indices
    u = torch.rand(len(z), len(circ), generator=g, dtype=torch.float64)
    zn[:, circ] = (2 * u - 1) * math.pi
    zn = zn.to(dtype)
    assert _z_diff(aldp_ic, aldp_ic.to_internal(aldp_ic.to_cartesian(zn)), zn).abs().max() < tol


def test_aldp_geometry_matches_mdtraj(aldp, aldp_ic, aldp_frames):
    x = torch.cat(list(aldp_frames.values())).float().double()  # exactly representable in mdtraj
    t = md.Trajectory(x.numpy().astype(np.float32), aldp.mdtraj_topology)
    raw = aldp_ic.to_internal(x) * aldp_ic.scale + aldp_ic.shift
    zm = aldp_ic.zmatrix
    bonds, angles, tors = (
        raw[:, aldp_ic.bond_indices],
        raw[:, aldp_ic.angle_indices],
        raw[:, aldp_ic.dihedral_indices],
    )
    np.testing.assert_allclose(bonds, md.compute_distances(t, zm.bonds), atol=1e-6, rtol=0)
    # mdtraj takes acos in float32, which loses digits near pi (error ~ 1e-7 / sin): the
    # strongly perturbed frames have a few such angles; compare where mdtraj is accurate
    ok = angles.sin().abs() > 0.3
    assert ok.float().mean() > 0.99
    md_angles = torch.tensor(md.compute_angles(t, zm.angles), dtype=torch.float64)
    assert (angles - md_angles)[ok].abs().max() < 1e-6
    ref = torch.tensor(md.compute_dihedrals(t, zm.torsions), dtype=torch.float64)
    assert _angle_diff(tors, ref).abs().max() < 1e-6
    # phi and psi sit where the Z-matrix says and equal mdtraj's compute_phi/psi
    _, phi = md.compute_phi(t)
    _, psi = md.compute_psi(t)
    z = aldp_ic.to_internal(x)
    assert _angle_diff(z[:, aldp_ic.index_of("phi")], torch.tensor(phi[:, 0])).abs().max() < 1e-6
    assert _angle_diff(z[:, aldp_ic.index_of("psi")], torch.tensor(psi[:, 0])).abs().max() < 1e-6


def test_aldp_log_det_matches_autograd(aldp_ic, aldp_frames):
    for kind in ("300K", "1000K"):
        x = aldp_frames[kind][7:8]
        _, ld_inv = aldp_ic.inverse_and_log_det(x)
        ld_fwd = aldp_ic.forward_and_log_det(aldp_ic.to_internal(x))[1]
        ref_fwd, ref_inv = _autograd_log_dets(aldp_ic, x)
        assert abs(ld_fwd.item() - ref_fwd.item()) < 1e-8
        assert abs(ld_inv.item() - ref_inv.item()) < 1e-8


def test_invariant_under_rigid_motion(aldp_ic, aldp_frames):
    x = aldp_frames["1000K"][:20]
    z, ld = aldp_ic.inverse_and_log_det(x)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        shift = torch.randn(1, 1, 3, dtype=torch.float64, generator=g)
        moved = x @ _random_rotation(seed).T + 3 * shift
        z2, ld2 = aldp_ic.inverse_and_log_det(moved)
        assert _z_diff(aldp_ic, z2, z).abs().max() < 1e-9
        assert (ld2 - ld).abs().max() < 1e-10


def test_domains_and_indices(aldp_ic):
    ic = aldp_ic
    assert len(ic.domains) == ic.dim == 60
    parts = torch.cat([ic.bond_indices, ic.angle_indices, ic.dihedral_indices])
    assert sorted(parts.tolist()) == list(range(60))
    assert (len(ic.bond_indices), len(ic.angle_indices), len(ic.dihedral_indices)) == (21, 20, 19)
    assert set(ic.circular_indices.tolist()) <= set(ic.dihedral_indices.tolist())
    for i, dom in enumerate(ic.domains):
        assert isinstance(dom, Circular) == (i in ic.circular_indices.tolist())
        assert isinstance(dom, Circular | Unbounded)
    assert {ic.index_of("phi"), ic.index_of("psi")} <= set(ic.circular_indices.tolist())


def test_normalisation(aldp, aldp_frames):
    zm = ZMatrix.from_topology(aldp.topology)
    data = aldp_frames["300K"]
    ic = InternalCoordinates(zm, data=data)
    z = ic.to_internal(data)
    plain = [i for i in range(ic.dim) if i not in ic.circular_indices.tolist()]
    torch.testing.assert_close(
        z[:, plain].mean(0), torch.zeros(len(plain), dtype=torch.float64), atol=0.15, rtol=0
    )
    torch.testing.assert_close(
        z[:, plain].std(0), torch.ones(len(plain), dtype=torch.float64), atol=1e-6, rtol=0
    )
    # circular torsions stay angles: phi is phi
    phi, _ = phi_psi(data, aldp.topology)
    assert _angle_diff(z[:, ic.index_of("phi")], phi[:, 0]).abs().max() < 1e-12
    # from a reference structure alone: the reference maps to 0, default scales
    ref = InternalCoordinates(zm, reference_positions=aldp.positions)
    zr = ref.to_internal(torch.tensor(aldp.positions)[None])[0]
    assert zr[plain].abs().max() < 1e-12
    assert ref.scale[ref.bond_indices].eq(DEFAULT_SCALES["bond"]).all()
    # overriding the circular torsions
    every = InternalCoordinates(zm, reference_positions=aldp.positions, circular="all")
    assert every.circular_indices.tolist() == every.dihedral_indices.tolist()
    with pytest.raises(ValueError, match="reference_positions or data"):
        InternalCoordinates(zm)
    with pytest.raises(ValueError, match="circular"):
        InternalCoordinates(zm, aldp.positions, circular="some")


def test_bad_inputs_raise(aldp_ic):
    with pytest.raises(ValueError, match=r"\(batch, 22, 3\)"):
        aldp_ic.to_internal(torch.zeros(2, 21, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(batch, 60\)"):
        aldp_ic.to_cartesian(torch.zeros(2, 59, dtype=torch.float64))


def test_chunked_batches_equal_unchunked(aldp_ic, aldp_frames):
    x = aldp_frames["1000K"]
    z, ld = aldp_ic.inverse_and_log_det(x)
    old = aldp_ic.chunk_size
    try:
        aldp_ic.chunk_size = 7
        z2, ld2 = aldp_ic.inverse_and_log_det(x)
        x2, _ = aldp_ic.forward_and_log_det(z2)
    finally:
        aldp_ic.chunk_size = old
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld2, ld, atol=1e-12, rtol=0)
    torch.testing.assert_close(x2, aldp_ic.to_cartesian(z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["xylene", "trpzip2"])
def test_other_molecules(others, name):
    s, x = others[name]
    zm = ZMatrix.from_topology(s.topology)
    ic = InternalCoordinates(zm, s.positions, data=x)
    assert ic.dim == 3 * s.n_atoms - 6
    z, ld_inv = ic.inverse_and_log_det(x)
    xr, ld_fwd = ic.forward_and_log_det(z)
    assert (xr - ic.canonical(x)).abs().max() < 1e-10
    assert (ld_inv + ld_fwd).abs().max() < 1e-10
    x32 = ic.to_cartesian(ic.to_internal(x.float()))
    assert (x32.double() - ic.canonical(x)).abs().max() < 1e-5
    t = md.Trajectory(x.numpy().astype(np.float32), s.mdtraj_topology)
    raw = ic.to_internal(x.float().double()) * ic.scale + ic.shift
    np.testing.assert_allclose(
        raw[:, ic.angle_indices], md.compute_angles(t, zm.angles), atol=1e-6, rtol=0
    )
    ref = torch.tensor(md.compute_dihedrals(t, zm.torsions), dtype=torch.float64)
    assert _angle_diff(raw[:, ic.dihedral_indices], ref).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["xylene", "trpzip2"])
def test_other_molecules_log_det_matches_autograd(others, name):
    s, x = others[name]  # trpzip2: a 648 x 648 Jacobian
    ic = InternalCoordinates(ZMatrix.from_topology(s.topology), s.positions, data=x)
    ref_fwd, ref_inv = _autograd_log_dets(ic, x[:1])
    z, ld_inv = ic.inverse_and_log_det(x[:1])
    _, ld_fwd = ic.forward_and_log_det(z)
    assert abs(ld_inv.item() - ref_inv.item()) < 1e-8
    assert abs(ld_fwd.item() - ref_fwd.item()) < 1e-8


# -- MixedCoordinates ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def aldp_mixed(aldp, aldp_frames):
    return MixedCoordinates.from_topology(
        aldp.topology, ALDP_BACKBONE, data=aldp_frames["300K"], reference_positions=aldp.positions
    )


def test_mixed_round_trip_and_whitening(aldp_mixed, aldp_frames):
    mc = aldp_mixed
    assert mc.dim == 60 and mc.n_cartesian == 3 * len(ALDP_BACKBONE) - 6
    assert set(mc.cartesian_atoms) == set(ALDP_BACKBONE)
    for kind, x in aldp_frames.items():
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            z, ld_inv = mc.inverse_and_log_det(x.to(dtype))
            xr, ld_fwd = mc.forward_and_log_det(z)
            assert (xr.double() - mc.canonical(x)).abs().max() < tol, kind
            if dtype == torch.float64:
                assert (ld_inv + ld_fwd).abs().max() < 1e-10
                zr = mc.to_internal(xr)
                assert _z_diff(mc, zr, z).abs().max() < 1e-8
    w = mc.to_internal(aldp_frames["300K"])[:, mc.cartesian_indices]
    torch.testing.assert_close(torch.cov(w.T), torch.eye(mc.n_cartesian, dtype=torch.float64))
    assert all(isinstance(mc.domains[i], Unbounded) for i in mc.cartesian_indices.tolist())
    assert "phi" not in mc.zmatrix.named_dihedrals  # the backbone is Cartesian here


def test_mixed_log_det_matches_autograd(aldp_mixed, aldp_frames):
    x = aldp_frames["1000K"][3:4]
    ref_fwd, ref_inv = _autograd_log_dets(aldp_mixed, x)
    z, ld_inv = aldp_mixed.inverse_and_log_det(x)
    _, ld_fwd = aldp_mixed.forward_and_log_det(z)
    assert abs(ld_fwd.item() - ref_fwd.item()) < 1e-8
    assert abs(ld_inv.item() - ref_inv.item()) < 1e-8


def test_mixed_invariant_and_errors(aldp, aldp_mixed, aldp_frames):
    x = aldp_frames["300K"][:10]
    z = aldp_mixed.to_internal(x)
    moved = x @ _random_rotation(5).T - 2.0
    assert _z_diff(aldp_mixed, aldp_mixed.to_internal(moved), z).abs().max() < 1e-8
    zm = ZMatrix.from_topology(aldp.topology, cartesian_atoms=ALDP_BACKBONE)
    with pytest.raises(ValueError, match="frames"):
        MixedCoordinates(zm, data=x)
    with pytest.raises(ZMatrixError, match="MixedCoordinates"):
        InternalCoordinates(zm, aldp.positions)
    with pytest.raises(ZMatrixError, match="three"):
        ZMatrix.from_topology(aldp.topology, cartesian_atoms=[6, 8])


# -- chirality and peptide helpers ---------------------------------------------------------------


def test_aldp_has_one_chiral_centre_the_alpha_carbon(aldp):
    centres = chiral_centres(aldp.topology)
    assert [c.centre for c in centres] == [8]
    assert set(centres[0].neighbours) == {6, 9, 10, 14}
    assert alpha_carbons(aldp.topology) == [(8, 6, 14, 10)]


def test_l_form_detection(aldp, aldp_ic, aldp_frames):
    x = torch.cat([aldp_frames["300K"], aldp_frames["1000K"]])  # MD never inverts C-alpha
    assert is_l_form(torch.tensor(aldp.positions)[None], aldp.topology).all()
    assert is_l_form(x, aldp.topology).all()
    assert not is_l_form(-x, aldp.topology).any()  # mirror images are D
    mirrored = x.clone()
    mirrored[:, :, 2] *= -1
    assert not is_l_form(mirrored, aldp.topology).any()
    # from internal coordinates
    z = aldp_ic.to_internal(torch.cat([x[:5], -x[:5]]))
    assert is_l_form(z, aldp.topology, transform=aldp_ic).tolist() == [True] * 5 + [False] * 5
    # generic chirality flags flip with the mirror image
    centres = chiral_centres(aldp.topology)
    torch.testing.assert_close(chirality(-x, centres), ~chirality(x, centres))


def test_trpzip2_chirality(others):
    s, x = others["trpzip2"]
    centres = chiral_centres(s.topology)
    names = sorted(c.name for c in centres)
    assert sum(n.endswith(":CA") for n in names) == 11  # every residue but glycine
    assert sorted(n for n in names if n.endswith(":CB")) == ["THR2:CB", "THR9:CB"]
    assert is_l_form(x, s.topology).all()  # a natural peptide
    assert not is_l_form(-x, s.topology).any()


def test_phi_psi_match_mdtraj(aldp, aldp_frames, others):
    x = aldp_frames["1000K"].float().double()
    t = md.Trajectory(x.numpy().astype(np.float32), aldp.mdtraj_topology)
    phi, psi = phi_psi(x, aldp.topology)
    assert phi.shape == psi.shape == (len(x), 1)
    assert _angle_diff(phi, torch.tensor(md.compute_phi(t)[1])).abs().max() < 1e-6
    assert _angle_diff(psi, torch.tensor(md.compute_psi(t)[1])).abs().max() < 1e-6
    s, y = others["trpzip2"]
    ty = md.Trajectory(y.numpy().astype(np.float32), s.mdtraj_topology)
    named = named_dihedrals(y.float().double(), backbone_torsions(s.topology))
    idx, ref = md.compute_phi(ty)
    for k, quad in enumerate(idx.tolist()):
        res = s.mdtraj_topology.atom(quad[1]).residue.resSeq  # named by the PDB's numbers
        assert _angle_diff(named[f"phi_{res}"], torch.tensor(ref[:, k])).abs().max() < 1e-6
    with pytest.raises(ZMatrixError):
        phi_psi(y[:, :18], others["xylene"][0].topology)


def test_backbone_cvs_are_named_by_residue_number_as_mdtraj_finds_them(aldp, others):
    # mdtraj's own backbone search is the oracle for the atoms; resSeq (S1 ... K12) for names
    s, _ = others["trpzip2"]
    t = s.mdtraj_topology
    cvs = backbone_cvs(s.topology)
    expected = {}
    for kind, compute in (("phi", md.compute_phi), ("psi", md.compute_psi)):
        idx, _ = compute(md.Trajectory(s.positions[None].astype(np.float32), t))
        for quad in idx.tolist():
            expected[f"{kind}_{t.atom(quad[1]).residue.resSeq}"] = tuple(quad)
    assert cvs == expected and len(cvs) == 22
    assert "phi_2" in cvs and "psi_12" not in cvs and "phi" not in cvs
    assert backbone_cvs(s.mdtraj_topology) == cvs  # the same from either topology library
    # one phi and one psi (alanine dipeptide, ACE1-ALA2-NME3): the plain names only
    idx_phi, _ = md.compute_phi(aldp.to_mdtraj())
    idx_psi, _ = md.compute_psi(aldp.to_mdtraj())
    assert backbone_cvs(aldp.topology) == {
        "phi": tuple(idx_phi[0].tolist()),
        "psi": tuple(idx_psi[0].tolist()),
    }
    assert backbone_torsions(aldp.topology)["phi_2"] == tuple(idx_phi[0].tolist())
    assert backbone_cvs(others["xylene"][0].topology) == {}


def test_gradients_flow_through_both_directions(aldp_ic, aldp_frames):
    x = aldp_frames["300K"][:4].clone().requires_grad_(True)
    z, ld = aldp_ic.inverse_and_log_det(x)
    (z.square().sum() + ld.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert math.isfinite(float(ld.detach().sum()))


def test_trpzip2_system_loads_in_both_solvents():
    import openmm
    import openmm.unit as u

    for solvent in ("implicit", "vacuum"):
        s = systems.load("trpzip2", solvent=solvent)
        assert s.n_atoms == 218 and s.mdtraj_topology.n_residues == 12
        ctx = openmm.Context(
            s.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU")
        )
        ctx.setPositions(s.positions)
        energy = ctx.getState(getEnergy=True).getPotentialEnergy()
        energy = energy.value_in_unit(u.kilojoule_per_mole)
        assert np.isfinite(energy) and energy < 0  # the shipped structure is minimised


# ------------------------------------------------------------ compiled Z-matrix kernels
def _native_vs_torch(ic, z, seed=0):
    """Positions, log-dets and gradients (random upstream gradients) of ``z`` through the
    compiled kernels and through the torch evaluation."""
    from boltzgen.coordinates import internal

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, fn in (("native", ic.forward_and_log_det), ("torch", ic._forward_torch)):
        zz = z.clone().requires_grad_(True)
        x, ld = fn(zz)
        if name == "native":
            assert internal._native_applies(z)
            assert type(x.grad_fn).__name__.startswith("_NativeZMatrix")
        g_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
        g_ld = torch.linspace(-1.0, 2.0, ld.numel(), dtype=z.dtype)
        (g_z,) = torch.autograd.grad((x, ld), zz, (g_x, g_ld))
        out[name] = (x.detach(), ld.detach(), g_z)
    del g
    return out


@pytest.mark.parametrize("molecule", ["aldp", "trpzip2"])
def test_native_zmatrix_matches_torch_float64(molecule, aldp_ic, aldp_frames, others):
    """The compiled forward map, log-det and analytic backward equal the torch evaluation and
    its autograd gradients (float64) on MD frames and on hot, far-from-reference ones."""
    from boltzgen import native

    if not native.enabled("zmatrix"):
        pytest.skip(f"compiled kernels not built here: {native.status()}")
    if molecule == "aldp":
        ic, x = aldp_ic, torch.cat([aldp_frames["300K"][:50], aldp_frames["1000K"][:50]])
    else:
        s, x = others["trpzip2"]
        ic = InternalCoordinates.from_topology(s.topology, s.positions)
    z = ic.to_internal(x)
    z = torch.cat([z, z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1),
                                            dtype=z.dtype)])  # fmt: skip
    res = _native_vs_torch(ic, z)
    for got, want in zip(res["native"], res["torch"]):
        scale = want.abs().max().clamp_min(1.0)
        assert ((got - want).abs().max() / scale) < 1e-12


def test_native_zmatrix_float32_error_as_torch(aldp_ic, aldp_frames):
    """In float32 the kernels are no less accurate than the torch evaluation, both held
    against float64."""
    from boltzgen import native

    if not native.enabled("zmatrix"):
        pytest.skip(f"compiled kernels not built here: {native.status()}")
    z64 = aldp_ic.to_internal(aldp_frames["1000K"][:100])
    ref = _native_vs_torch(aldp_ic, z64)["torch"]
    got = _native_vs_torch(aldp_ic, z64.float())
    for k in range(3):
        err_native = (got["native"][k].double() - ref[k]).abs()
        err_torch = (got["torch"][k].double() - ref[k]).abs()
        assert err_native.mean() <= 1.5 * err_torch.mean() + 1e-12
        assert err_native.max() <= 10 * err_torch.max() + 1e-12


def test_native_zmatrix_second_derivatives_and_fallback(aldp_ic, aldp_frames):
    """create_graph=True differentiates the torch evaluation (exact second derivatives), and
    with the kernels switched off the map is the torch evaluation."""
    from boltzgen import native

    z = aldp_ic.to_internal(aldp_frames["300K"][:8])

    def hvp(fn):
        zz = z.clone().requires_grad_(True)
        x, ld = fn(zz)
        (g,) = torch.autograd.grad((x * x).sum() + ld.sum(), zz, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), zz)
        return g.detach(), h

    g_ref, h_ref = hvp(aldp_ic._forward_torch)
    g_nat, h_nat = hvp(aldp_ic.forward_and_log_det)
    assert torch.allclose(g_nat, g_ref, rtol=0, atol=1e-10)
    assert torch.allclose(h_nat, h_ref, rtol=0, atol=1e-8)
    with native.disabled():
        x, _ = aldp_ic.forward_and_log_det(z.clone().requires_grad_(True))
        assert not type(x.grad_fn).__name__.startswith("_NativeZMatrix")


def test_native_zmatrix_follows_loaded_normalisation(aldp, aldp_frames):
    """The kernels' cached shifts and scales, and the log-det constant derived from the scales,
    follow a state dict loaded into the transform."""
    a = InternalCoordinates.from_topology(aldp.topology, aldp.positions, data=aldp_frames["300K"])
    b = InternalCoordinates.from_topology(aldp.topology, aldp.positions, data=aldp_frames["1000K"])
    z = a.to_internal(aldp_frames["300K"][:5])
    b.forward_and_log_det(z)  # fills b's cache with its own normalisation
    b.load_state_dict(a.state_dict())
    for got, want in zip(b.forward_and_log_det(z), a.forward_and_log_det(z)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
