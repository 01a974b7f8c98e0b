"""TorchEnergy and OpenMMEnergy against OpenMM's Reference platform (double precision).

Oracle: OpenMM itself, per force group, on MD frames at 300 K and 1000 K and on randomly
perturbed frames, for alanine dipeptide (vacuum, OBC1 as CustomGBForce, OBC2 as GBSAOBCForce),
p-xylene (a GAFF non-peptide with a ring) and trpzip2 (amber14 PDB + implicit/obc1.xml).
"""

import copy

import numpy as np
import openmm
import pytest
import torch
from helpers import md_frames

from boltzgen import systems
from boltzgen.energy import BoltzmannTarget, OpenMMEnergy, TorchEnergy, regularize_energy
from boltzgen.errors import UnsupportedForceError

CASES = [
    ("aldp", "implicit", "OBC1"),
    ("aldp", "vacuum", "OBC1"),
    ("aldp", "implicit", "OBC2"),
    ("xylene", "implicit", "OBC1"),
    ("xylene", "vacuum", "OBC1"),
]


def _load(name, solvent, model):
    directory = systems.system_dir(name)
    config = systems._read_config(directory / "config.yaml")
    return systems.from_prmtop(
        directory / config["prmtop"],
        directory / config["positions"],
        solvent=solvent,
        implicit_model=model,
    )


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    """A system and >= 1,000 configurations: 400 at 300 K, 400 at 1000 K, 200 perturbed."""
    s = _load(*request.param)
    cold = md_frames(s, 300.0, 400, steps_per_frame=5, seed=11)
    hot = md_frames(s, 1000.0, 400, steps_per_frame=5, seed=12)
    g = torch.Generator().manual_seed(13)
    noisy = cold[:200] + 0.01 * torch.randn(200, s.n_atoms, 3, generator=g, dtype=torch.float64)
    return s, torch.cat([cold, hot, noisy])


def _reference(system, x):
    """OpenMM Reference-platform total and per-force energies and total forces."""
    system = copy.deepcopy(system)
    for k, f in enumerate(system.getForces()):
        f.setForceGroup(k)
    ctx = openmm.Context(
        system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference")
    )
    n_forces = system.getNumForces()
    total, groups, forces = [], [], []
    for xyz in x.numpy():
        ctx.setPositions(xyz)
        st = ctx.getState(getEnergy=True, getForces=True)
        total.append(st.getPotentialEnergy()._value)
        forces.append(st.getForces(asNumpy=True)._value)
        groups.append(
            [
                ctx.getState(getEnergy=True, groups={k}).getPotentialEnergy()._value
                for k in range(n_forces)
            ]
        )
    return np.array(total), np.array(groups), np.array(forces)


def _rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1.0)


def test_torch_energy_matches_openmm_float64(case):
    s, x = case
    assert x.shape[0] >= 1000
    energy = TorchEnergy.from_openmm(s.system)
    ref_total, ref_groups, ref_forces = _reference(s.system, x)
    total, forces = energy.energy_and_forces(x)
    assert total.dtype == torch.float64 and total.shape == (x.shape[0],)
    # relative to |E| (floored at 1 kJ/mol for terms that pass through zero)
    assert _rel(total.numpy(), ref_total).max() < 1e-6
    terms = energy.energy_terms(x)
    names = [type(f).__name__ for f in s.system.getForces()]
    assert len(terms) == len(names)
    for k, (name, value) in enumerate(terms.items()):
        assert name.startswith(names[k])
        assert _rel(value.numpy(), ref_groups[:, k]).max() < 1e-6, name
    rms = np.sqrt(((forces.numpy() - ref_forces) ** 2).mean(axis=(1, 2)))
    ref_rms = np.sqrt((ref_forces**2).mean(axis=(1, 2)))
    assert (rms / ref_rms).max() < 1e-5


def test_torch_energy_float32(case):
    s, x = case
    energy = TorchEnergy.from_openmm(s.system)
    e64 = energy(x[:100])
    e32 = energy(x[:100].float())
    assert e32.dtype == torch.float32
    assert _rel(e32.double().numpy(), e64.numpy()).max() < 1e-4
    # the float32 call must not have rounded the float64 parameters
    assert torch.equal(energy(x[:100]), e64)


def test_trpzip2_forcefield_xml_system():
    """A 12-residue peptide from a PDB + amber14-all.xml + implicit/obc1.xml."""
    s = systems.load("trpzip2")
    g = torch.Generator().manual_seed(5)
    x = torch.tensor(s.positions) + 0.005 * torch.randn(
        20, s.n_atoms, 3, generator=g, dtype=torch.float64
    )
    energy = TorchEnergy.from_openmm(s.system)
    ref_total, _, ref_forces = _reference(s.system, x)
    total, forces = energy.energy_and_forces(x)
    assert _rel(total.numpy(), ref_total).max() < 1e-6
    rms = np.sqrt(((forces.numpy() - ref_forces) ** 2).mean())
    assert rms / np.sqrt((ref_forces**2).mean()) < 1e-5


def test_unsupported_force_is_named():
    s = systems.load("aldp")
    system = copy.deepcopy(s.system)
    system.addForce(openmm.CustomExternalForce("x^2"))
    with pytest.raises(UnsupportedForceError, match="CustomExternalForce"):
        TorchEnergy.from_openmm(system)


def test_unsupported_custom_gb_expression():
    s = systems.load("aldp")
    system = copy.deepcopy(s.system)
    gb = [f for f in system.getForces() if isinstance(f, openmm.CustomGBForce)][0]
    expr, kind = gb.getEnergyTermParameters(1)
    gb.setEnergyTermParameters(1, expr.replace("^6", "^4"), kind)
    with pytest.raises(UnsupportedForceError, match="energy term"):
        TorchEnergy.from_openmm(system)


@pytest.fixture(scope="module")
def aldp_openmm():
    s = systems.load("aldp")
    energy = OpenMMEnergy(s.system, platform="Reference")
    yield s, energy
    energy.close()


def test_openmm_energy_gradient_is_minus_force(aldp_openmm):
    s, energy = aldp_openmm
    g = torch.Generator().manual_seed(0)
    x = torch.tensor(s.positions) + 0.01 * torch.randn(16, 22, 3, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    e = energy(x)
    weights = torch.rand(16, generator=g, dtype=torch.float64)
    (e * weights).sum().backward()
    e_ref, f_ref = energy.energy_and_forces(x.detach())
    torch.testing.assert_close(e.detach(), e_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, -weights[:, None, None] * f_ref, rtol=1e-12, atol=1e-10)
    # and OpenMM's force is the torch-native energy's -gradient
    torch_e, torch_f = TorchEnergy.from_openmm(s.system).energy_and_forces(x.detach())
    torch.testing.assert_close(e_ref, torch_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_ref, torch_f, rtol=1e-5, atol=1e-4)


def test_openmm_energy_nan_rows(aldp_openmm):
    s, energy = aldp_openmm
    x = torch.tensor(s.positions).repeat(5, 1, 1)
    x[1] += 0.01
    x[2, 3, 0] = float("nan")
    x[3, 0, 0] = 1e9  # exploded
    x.requires_grad_(True)
    e = energy(x)
    e.sum().backward()
    assert torch.isinf(e[2]) and e[2] > 0 and torch.isinf(e[3]) and e[3] > 0
    assert torch.all(x.grad[2] == 0) and torch.all(x.grad[3] == 0)
    good = [0, 1, 4]
    e_ref, f_ref = energy.energy_and_forces(x.detach()[good])
    torch.testing.assert_close(e.detach()[good], e_ref)
    torch.testing.assert_close(x.grad[good], -f_ref)
    assert torch.isfinite(e_ref).all()


def test_openmm_pool_matches_single_context(aldp_openmm):
    s, single = aldp_openmm
    g = torch.Generator().manual_seed(1)
    x = torch.tensor(s.positions) + 0.01 * torch.randn(9, 22, 3, generator=g, dtype=torch.float64)
    x[4, 0, 0] = float("inf")
    with OpenMMEnergy(s.system, n_workers=2, platform="Reference") as pool:
        e, f = pool.energy_and_forces(x.float())
        assert e.dtype == torch.float32
    e_ref, f_ref = single.energy_and_forces(x.float())
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(f, f_ref)
    assert torch.isinf(e[4])


def test_shape_errors(aldp_openmm):
    s, energy = aldp_openmm
    with pytest.raises(ValueError, match=r"\(batch, 22, 3\)"):
        energy(torch.zeros(3, 21, 3))
    with pytest.raises(ValueError, match=r"\(batch, 22, 3\)"):
        TorchEnergy.from_openmm(s.system)(torch.zeros(3, 22, 2))


def test_regularize_energy():
    u = torch.tensor(
        [-5.0, 0.0, 1e3, 1e8, 1e8 + 1e4, 1e30, float("nan"), float("inf")], dtype=torch.float64
    )
    r = regularize_energy(u, energy_cut=1e8, energy_max=1e20)
    assert torch.equal(r[:4], u[:4])  # linear below the cut
    assert r[4] == pytest.approx(1e8 + np.log1p(1e4))  # logarithmic above
    top = 1e8 + np.log1p(1e20 - 1e8)
    assert r[5] == pytest.approx(top) and r[6] == pytest.approx(top) and r[7] == pytest.approx(top)
    assert torch.all(torch.diff(r[:6]) >= 0)  # monotone
    with pytest.raises(ValueError):
        regularize_energy(u, energy_cut=1.0, energy_max=0.5)


def test_boltzmann_target():
    s = systems.load("aldp")
    energy = TorchEnergy.from_openmm(s.system)
    target = BoltzmannTarget(energy, s.kT)
    x = torch.tensor(s.positions).repeat(3, 1, 1)
    x[1] += 0.005
    x[2, 0] = x[2, 1]  # two atoms on top of each other: a huge energy
    x.requires_grad_(True)
    lp = target.log_prob(x)
    assert lp[0].item() == pytest.approx(-energy(x[:1]).item() / s.kT, rel=1e-12)
    assert torch.isfinite(lp).all() and lp[2] < lp[0]
    lp.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert s.kT == pytest.approx(0.0083144626 * 300.0)
    with pytest.raises(ValueError):
        BoltzmannTarget(energy, -1.0)


def test_compiled_energy_equals_eager():
    s = systems.load("aldp")
    g = torch.Generator().manual_seed(7)
    x = torch.tensor(s.positions) + 0.01 * torch.randn(32, 22, 3, generator=g, dtype=torch.float64)
    eager = TorchEnergy.from_openmm(s.system)
    compiled = TorchEnergy.from_openmm(s.system).compile_energy(dynamic=False)
    e0, f0 = eager.energy_and_forces(x.float())
    e1, f1 = compiled.energy_and_forces(x.float())
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-2)


def test_analytic_forces_per_term_in_crowded_geometries():
    """Each term's analytic gradient against OpenMM's per-group forces where the GB integral
    takes its rare branches (inactive and engulfed pairs: two atoms 0.002-0.02 nm apart)."""
    s = _load("aldp", "implicit", "OBC2")  # GBSAOBCForce, with the engulfed-atom correction
    system = copy.deepcopy(s.system)
    for k, f in enumerate(system.getForces()):
        f.setForceGroup(k)
    ctx = openmm.Context(
        system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference")
    )
    g = torch.Generator().manual_seed(3)
    x = torch.tensor(s.positions).repeat(6, 1, 1)
    x = x + 0.003 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    for b, (i, j, r) in enumerate([(0, 1, 0.002), (1, 0, 0.01), (4, 5, 0.02), (8, 6, 0.004)]):
        x[b, i] = x[b, j] + torch.tensor([r, 0.0, 0.0], dtype=torch.float64)
    energy = TorchEnergy.from_openmm(s.system)
    for k, (name, term) in enumerate(energy.terms.items()):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(term(xr).sum(), xr)
        for b in range(x.shape[0]):
            ctx.setPositions(x[b].numpy())
            ref = ctx.getState(getForces=True, groups={k}).getForces(asNumpy=True)._value
            err = np.sqrt(((-grad[b].numpy() - ref) ** 2).mean())
            assert err <= 1e-6 * max(np.sqrt((ref**2).mean()), 1.0), (name, b)


def test_plain_autograd_path_is_twice_differentiable():
    s = systems.load("aldp")
    g = torch.Generator().manual_seed(8)
    x = torch.tensor(s.positions) + 0.01 * torch.randn(4, 22, 3, generator=g, dtype=torch.float64)
    fast = TorchEnergy.from_openmm(s.system)
    plain = TorchEnergy.from_openmm(s.system).set_analytic_gradients(False)
    e0, f0 = fast.energy_and_forces(x)
    e1, f1 = plain.energy_and_forces(x)
    torch.testing.assert_close(e1, e0, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(f1, f0, rtol=1e-9, atol=1e-7)
    # Hessian-vector product by double backward equals a finite difference of the forces
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(plain(xr).sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), xr)
    h = 1e-6
    fd = -(plain.energy_and_forces(x + h * v)[1] - plain.energy_and_forces(x - h * v)[1]) / (2 * h)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "solvent,model", [("implicit", "OBC1"), ("implicit", "OBC2"), ("vacuum", "OBC1")]
)
def test_fused_evaluation_equals_per_term_float64(solvent, model):
    """The fused pass (shared pair distances, one gradient) equals the sum of the per-term
    modules, energies and forces, across batch chunks and on the plain-autograd path."""
    s = _load("aldp", solvent, model)
    g = torch.Generator().manual_seed(21)
    x = torch.tensor(s.positions) + 0.02 * torch.randn(
        300, s.n_atoms, 3, generator=g, dtype=torch.float64
    )
    x[7, 0] = x[7, 1] + 1e-3  # two bonded (excluded) atoms almost on top of each other
    energy = TorchEnergy.from_openmm(s.system)
    assert energy._fused is not None
    total, forces = energy.energy_and_forces(x)
    xr = x.clone().requires_grad_(True)
    per_term = {name: term(xr) for name, term in energy.terms.items()}
    ref_total = sum(per_term.values())
    (ref_grad,) = torch.autograd.grad(ref_total.sum(), xr)
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(forces, -ref_grad, rtol=1e-10, atol=1e-10 * ref_grad.abs().max())
    terms = energy.energy_terms(x)
    assert list(terms) == list(per_term)
    for name, value in terms.items():
        torch.testing.assert_close(value, per_term[name].detach(), rtol=1e-10, atol=1e-10)
    plain = TorchEnergy.from_openmm(s.system).set_analytic_gradients(False)
    e1, f1 = plain.energy_and_forces(x)
    torch.testing.assert_close(e1, total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f1, forces, rtol=1e-10, atol=1e-10 * forces.abs().max())


def test_batch_chunks_are_cache_sized_on_cpu_only():
    """On a CPU the fused pass splits a batch into cache-sized chunks; on another device (a
    meta tensor stands in for a GPU's) a training batch is one chunk: each chunk costs kernel
    launches there, which dominated a GPU training step."""
    s = systems.load("aldp")
    fused = TorchEnergy.from_openmm(s.system)._fused
    cpu = torch.empty(8192, s.n_atoms, 3)
    gpu = torch.empty(8192, s.n_atoms, 3, device="meta")
    assert fused._pair_chunk(cpu) < 1024
    assert fused._pair_chunk(gpu) >= 65536


def test_compiled_energy_compiles_once():
    """The compiled fused evaluation is one graph: no recompiles per term type."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s = systems.load("aldp")
    g = torch.Generator().manual_seed(9)
    x = torch.tensor(s.positions) + 0.01 * torch.randn(16, 22, 3, generator=g, dtype=torch.float64)
    compiled = TorchEnergy.from_openmm(s.system).compile_energy(dynamic=False)
    for _ in range(3):
        e1, f1 = compiled.energy_and_forces(x.float())
    assert counters["stats"]["unique_graphs"] == 1
    e0, f0 = TorchEnergy.from_openmm(s.system).energy_and_forces(x.float())
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-2)


def test_compiled_energy_kernels_equal_torch_evaluation(case, monkeypatch):
    """Bonded and pair terms through the compiled kernels of `boltzgen.native` (what OpenMM is
    compared with above, where they are built) equal the torch evaluation: energies and
    forces, float64 and float32, every shipped solvent model."""
    from boltzgen import native
    from boltzgen.energy import torch_energy

    s, x = case
    x = x[:300]
    energy = TorchEnergy.from_openmm(s.system)
    if not native.enabled("energy"):  # tests/test_flow_ops.py says whether it should be
        pytest.skip(native.status())
    calls = []
    real = torch_energy._native_pair_call
    monkeypatch.setattr(torch_energy, "_native_pair_call", lambda *a: calls.append(1) or real(*a))
    (e, f), (e32, f32) = energy.energy_and_forces(x), energy.energy_and_forces(x.float())
    assert calls and e32.dtype == torch.float32
    calls.clear()
    with native.disabled():
        (e_ref, f_ref), (e32_ref, f32_ref) = [energy.energy_and_forces(v) for v in (x, x.float())]
    assert not calls
    torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10 * float(f_ref.abs().max()))
    # float32: rounded otherwise (distances from differences, not from |x|^2 expansions), so
    # both are held against float64: the kernel's errors are at most torch's own
    for got, mine, truth in ((e32, e32_ref, e), (f32, f32_ref, f)):
        err = (got.double() - truth).abs()
        err_ref = (mine.double() - truth).abs()
        assert float(err.mean()) <= 1.5 * float(err_ref.mean())
        assert float(err.max()) <= 1.5 * float(err_ref.max())
