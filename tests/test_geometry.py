"""boltzgen.coordinates.geometry against mdtraj (the oracle) and its own inverse (NeRF)."""

import math

import mdtraj as md
import numpy as np
import pytest
import torch

from boltzgen.coordinates import geometry


def _random_molecule(n_frames=16, n_atoms=12, seed=0):
    """Float32-representable float64 positions, spread like a small molecule (nm)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n_frames, n_atoms, 3, generator=g, dtype=torch.float64)
    return x.float().double()


def _traj(x):
    top = md.Topology()
    chain = top.add_chain()
    res = top.add_residue("MOL", chain)
    for i in range(x.shape[1]):
        top.add_atom(f"C{i}", md.element.carbon, res)
    return md.Trajectory(x.numpy().astype(np.float32), top)


def _random_index(n_atoms, width, n, seed=1):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_atoms, width, replace=False) for _ in range(n)])


def test_distances_angles_dihedrals_match_mdtraj():
    x = _random_molecule()
    t = _traj(x)
    pairs, triples, quads = (_random_index(12, k, 30, seed=k) for k in (2, 3, 4))
    d = geometry.distances(x, pairs).numpy()
    a = geometry.angles(x, triples).numpy()
    p = geometry.dihedrals(x, quads).numpy()
    assert d.shape == a.shape == p.shape == (16, 30)
    np.testing.assert_allclose(d, md.compute_distances(t, pairs), atol=1e-6, rtol=0)
    # mdtraj takes acos in float32, which loses digits near 0 and pi (error ~ 1e-7 / sin);
    # compare where that is below our tolerance (bond angles in molecules are 1.5 to 2.2 rad)
    ok = np.abs(np.sin(a)) > 0.3
    assert ok.mean() > 0.7
    np.testing.assert_allclose(a[ok], md.compute_angles(t, triples)[ok], atol=1e-6, rtol=0)
    diff = np.angle(np.exp(1j * (p - md.compute_dihedrals(t, quads))))
    assert np.abs(diff).max() < 1e-6
    assert p.min() >= -math.pi and p.max() < math.pi


def test_float32_inputs_give_float32_outputs():
    x = _random_molecule().float()
    for fn, idx in (
        (geometry.distances, [[0, 1]]),
        (geometry.angles, [[0, 1, 2]]),
        (geometry.dihedrals, [[0, 1, 2, 3]]),
    ):
        out = fn(x, idx)
        assert out.dtype == torch.float32 and out.shape == (16, 1)


def test_place_atoms_inverts_internal_coordinates():
    x = _random_molecule(n_frames=64, n_atoms=3, seed=3)
    a, b, c = x[:, 0], x[:, 1], x[:, 2]
    g = torch.Generator().manual_seed(4)
    bond = 0.1 + 0.1 * torch.rand(64, generator=g, dtype=torch.float64)
    angle = 0.2 + 2.7 * torch.rand(64, generator=g, dtype=torch.float64)
    tors = (2 * torch.rand(64, generator=g, dtype=torch.float64) - 1) * math.pi
    d = geometry.place_atoms(a, b, c, bond, angle, tors)
    y = torch.stack([a, b, c, d], dim=1)
    torch.testing.assert_close(geometry.distances(y, [[2, 3]])[:, 0], bond, atol=1e-12, rtol=0)
    torch.testing.assert_close(geometry.angles(y, [[1, 2, 3]])[:, 0], angle, atol=1e-10, rtol=0)
    diff = geometry.wrap_angle(geometry.dihedrals(y, [[0, 1, 2, 3]])[:, 0] - tors)
    assert diff.abs().max() < 1e-10


def test_wrap_angle_range():
    a = torch.linspace(-20, 20, 1001, dtype=torch.float64)
    w = geometry.wrap_angle(a)
    assert w.min() >= -math.pi and w.max() < math.pi
    torch.testing.assert_close(torch.sin(w), torch.sin(a))
    torch.testing.assert_close(torch.cos(w), torch.cos(a))
    assert geometry.wrap_angle(torch.tensor(math.pi, dtype=torch.float64)) == -math.pi


def _random_rotation(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_canonical_frame_fixes_three_atoms_and_keeps_shape():
    x = _random_molecule(n_frames=8, n_atoms=6, seed=5)
    y = geometry.canonical_frame(x, 2, 0, 4)
    assert y[:, 2].abs().max() < 1e-14
    assert y[:, 0, 1:].abs().max() < 1e-14 and (y[:, 0, 0] > 0).all()
    assert y[:, 4, 2].abs().max() < 1e-14 and (y[:, 4, 1] > 0).all()
    torch.testing.assert_close(torch.cdist(y, y), torch.cdist(x, x))
    # rotating and translating the input changes nothing
    moved = x @ _random_rotation(6).T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(geometry.canonical_frame(moved, 2, 0, 4), y)


def test_signed_volumes_flip_under_mirror_only():
    x = _random_molecule(n_frames=8, n_atoms=5, seed=7)
    quads = [[0, 1, 2, 3], [4, 3, 2, 1]]
    v = geometry.signed_volumes(x, quads)
    rotated = x @ _random_rotation(8).T + 1.0
    torch.testing.assert_close(geometry.signed_volumes(rotated, quads), v)
    torch.testing.assert_close(geometry.signed_volumes(-x, quads), -v)
    u = x[:, 1] - x[:, 0]
    w = x[:, 2] - x[:, 0]
    s = x[:, 3] - x[:, 0]
    det = torch.linalg.det(torch.stack([u, w, s], dim=-1))
    torch.testing.assert_close(v[:, 0], det)


def test_gradients_match_finite_differences():
    x = _random_molecule(n_frames=2, n_atoms=4, seed=9).requires_grad_(True)
    for fn, idx in (
        (geometry.distances, [[0, 3]]),
        (geometry.angles, [[0, 1, 2]]),
        (geometry.dihedrals, [[0, 1, 2, 3]]),
        (geometry.signed_volumes, [[0, 1, 2, 3]]),
    ):
        assert torch.autograd.gradcheck(lambda y, fn=fn, idx=idx: fn(y, idx), (x,))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="batch, n_atoms, 3"):
        geometry.distances(torch.zeros(4, 3), [[0, 1]])
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        geometry.dihedrals(torch.zeros(1, 4, 3), [[0, 1, 2]])
