"""A torch-native, batched, differentiable re-implementation of an `openmm.System`'s energy.

`TorchEnergy.from_openmm(system)` compiles the supported forces into `torch.nn.Module` terms:

============================  ==========================================================
OpenMM force                  torch term
============================  ==========================================================
HarmonicBondForce             ``0.5 k (r - r0)^2``
HarmonicAngleForce            ``0.5 k (theta - theta0)^2``
PeriodicTorsionForce          ``k (1 + cos(n phi - phi0))``
NonbondedForce (NoCutoff)     Coulomb + Lennard-Jones (Lorentz-Berthelot), exceptions/1-4
GBSAOBCForce                  OBC generalised Born + ACE surface area (OBC2 in prmtop files)
CustomGBForce (OBC form)      the OBC1/OBC2 forces OpenMM's app layer builds as CustomGBForce
CMMotionRemover               ignored (no energy)
============================  ==========================================================

Anything else raises `UnsupportedForceError` naming the force. Positions are ``(B, n_atoms, 3)``
in nm; energies ``(B,)`` in kJ/mol. Parameters are buffers, so ``.to(device, dtype)`` moves them.
Pairwise terms are dense over all ``N (N - 1) / 2`` pairs: right for small molecules in implicit
solvent (the use case), quadratic in memory for large ones.

`TorchEnergy` evaluates all terms in one fused pass (`_FusedEnergy`): the bonded terms share one
product for their bond/angle/torsion vectors and one for the gradient, and Coulomb + LJ + GB share
one ``(B, N, N)`` squared-distance matrix and one position gradient; the term modules themselves
still work on their own (``energy.terms[name](x)``) and give the same numbers.
"""

from __future__ import annotations

import copy
import ctypes
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from boltzgen import native
from boltzgen.energy._common import ONE_4PI_EPS0, _analytic, _f64, _i64, _val
from boltzgen.energy.base import Energy
from boltzgen.energy.gb import GBSAOBCTerm, _gb_from_r2, _grad_from_r2, _pair_matrix
from boltzgen.errors import UnsupportedForceError

__all__ = [
    "GBSAOBCTerm",
    "HarmonicAngleTerm",
    "HarmonicBondTerm",
    "NonbondedTerm",
    "PeriodicTorsionTerm",
    "TorchEnergy",
]

_IGNORED_FORCES = ("CMMotionRemover",)


class HarmonicBondTerm(nn.Module):
    """``sum 0.5 k (r - r0)^2`` over bonds; k in kJ/mol/nm^2, r0 in nm."""

    def __init__(self, pairs: Tensor, r0: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("pairs", pairs.reshape(-1, 2))
        self.register_buffer("r0", r0)
        self.register_buffer("k", k)

    @classmethod
    def from_openmm(cls, force: Any) -> HarmonicBondTerm:
        """Compile an `openmm.HarmonicBondForce`."""
        rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
        return cls(
            _i64([r[:2] for r in rows], (-1, 2)),
            _f64([_val(r[2]) for r in rows]),
            _f64([_val(r[3]) for r in rows]),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _analytic(x, _bond_energy_and_grad, self)


class HarmonicAngleTerm(nn.Module):
    """``sum 0.5 k (theta - theta0)^2`` over angles; k in kJ/mol/rad^2, theta0 in rad."""

    def __init__(self, triples: Tensor, theta0: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("triples", triples.reshape(-1, 3))
        self.register_buffer("theta0", theta0)
        self.register_buffer("k", k)

    @classmethod
    def from_openmm(cls, force: Any) -> HarmonicAngleTerm:
        """Compile an `openmm.HarmonicAngleForce`."""
        rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
        return cls(
            _i64([r[:3] for r in rows], (-1, 3)),
            _f64([_val(r[3]) for r in rows]),
            _f64([_val(r[4]) for r in rows]),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _analytic(x, _angle_energy_and_grad, self)


class PeriodicTorsionTerm(nn.Module):
    """``sum k (1 + cos(n phi - phi0))`` over torsions; k in kJ/mol, phi0 in rad."""

    def __init__(self, quads: Tensor, periodicity: Tensor, phase: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("quads", quads.reshape(-1, 4))
        # each distinct quadruple's dihedral is computed once
        unique, index = torch.unique(self.quads, dim=0, return_inverse=True)
        self.register_buffer("unique_quads", unique)
        self.register_buffer("quad_index", index)
        self.register_buffer("periodicity", periodicity)
        self.register_buffer("phase", phase)
        self.register_buffer("k", k)

    @classmethod
    def from_openmm(cls, force: Any) -> PeriodicTorsionTerm:
        """Compile an `openmm.PeriodicTorsionForce`."""
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        return cls(
            _i64([r[:4] for r in rows], (-1, 4)),
            _f64([r[4] for r in rows]),
            _f64([_val(r[5]) for r in rows]),
            _f64([_val(r[6]) for r in rows]),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _analytic(x, _torsion_energy_and_grad, self)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product of component-major vectors ``(3, ...)``."""
    return torch.stack(
        (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])
    )


def _incidence(term: nn.Module, x: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
    """``(N, K)`` matrix mapping positions to the ``K`` vectors ``x[plus] - x[minus]``.

    Gathers and gradient scatters then become small matrix products. Cached per shape/dtype.
    """
    cache = term.__dict__.setdefault("_incidence_cache", {})
    key = (x.shape[1], x.dtype, x.device)  # one incidence matrix per term
    if key not in cache:
        cols = torch.arange(plus.shape[0], device=x.device)
        m = torch.zeros(x.shape[1], plus.shape[0], dtype=x.dtype, device=x.device)
        m.index_put_((plus, cols), torch.ones_like(cols, dtype=x.dtype), accumulate=True)
        m.index_put_((minus, cols), -torch.ones_like(cols, dtype=x.dtype), accumulate=True)
        cache[key] = m
    return cache[key]


def _vectors(x: Tensor, m: Tensor) -> Tensor:
    """Difference vectors ``(3, B, K)`` (component-major) of positions ``(B, N, 3)``."""
    b, n = x.shape[0], x.shape[1]
    return torch.mm(x.transpose(1, 2).reshape(b * 3, n), m).view(b, 3, -1).transpose(0, 1)


def _vectors_grad(g: Tensor, m: Tensor) -> Tensor:
    """Gradient ``(B, N, 3)`` from ``dE/dvector`` ``(3, B, K)`` (the adjoint of `_vectors`)."""
    b, k = g.shape[1], g.shape[2]
    return torch.mm(g.transpose(0, 1).reshape(b * 3, k), m.T).view(b, 3, -1).transpose(1, 2)


def _bond_energy_and_grad(
    term: HarmonicBondTerm, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    m = _incidence(term, x, *_bond_vectors(term))
    energy, g = _bond_from_vectors(term, _vectors(x, m), need_grad)
    return energy, None if g is None else _vectors_grad(torch.cat(g, -1), m)


def _bond_vectors(term: HarmonicBondTerm) -> tuple[Tensor, Tensor]:
    """Atom indices ``(plus, minus)`` of the bond vectors ``x[plus] - x[minus]``."""
    return term.pairs[:, 1], term.pairs[:, 0]


def _bond_from_vectors(
    term: HarmonicBondTerm, d: Tensor, need_grad: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Bond energy ``(B,)`` from bond vectors ``(3, B, K)`` and, if ``need_grad``, dE/dvector
    (as a tuple of consecutive pieces, like the other ``*_from_vectors``)."""
    r = torch.sqrt((d * d).sum(0))
    k_dr = term.k * (r - term.r0)
    energy = (0.5 * k_dr * (r - term.r0)).sum(-1)
    if not need_grad:
        return energy, None
    return energy, ((k_dr / r) * d,)


def _angle_energy_and_grad(
    term: HarmonicAngleTerm, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    m = _incidence(term, x, *_angle_vectors(term))
    energy, g = _angle_from_vectors(term, _vectors(x, m), need_grad)
    return energy, None if g is None else _vectors_grad(torch.cat(g, -1), m)


def _angle_vectors(term: HarmonicAngleTerm) -> tuple[Tensor, Tensor]:
    t = term.triples
    return torch.cat([t[:, 0], t[:, 2]]), torch.cat([t[:, 1], t[:, 1]])


def _angle_from_vectors(
    term: HarmonicAngleTerm, v: Tensor, need_grad: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    a, b = v.chunk(2, dim=-1)
    ab = (a * b).sum(0)
    cn = torch.sqrt((_cross(a, b) ** 2).sum(0))
    dtheta = torch.atan2(cn, ab) - term.theta0
    energy = (0.5 * term.k * dtheta * dtheta).sum(-1)
    if not need_grad:
        return energy, None
    # d theta / d a = -(b - (a.b / a.a) a) / |a x b|, and likewise for b
    s = -(term.k * dtheta) / cn.clamp_min(torch.finfo(v.dtype).tiny)
    ga = s * (b - (ab / (a * a).sum(0)) * a)
    gb = s * (a - (ab / (b * b).sum(0)) * b)
    return energy, (ga, gb)


def _torsion_energy_and_grad(
    term: PeriodicTorsionTerm, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    m = _incidence(term, x, *_torsion_vectors(term))
    energy, g = _torsion_from_vectors(term, _vectors(x, m), need_grad)
    return energy, None if g is None else _vectors_grad(torch.cat(g, -1), m)


def _torsion_vectors(term: PeriodicTorsionTerm) -> tuple[Tensor, Tensor]:
    q = term.unique_quads
    return torch.cat([q[:, 0], q[:, 1], q[:, 3]]), torch.cat([q[:, 1], q[:, 2], q[:, 2]])


def _torsion_from_vectors(
    term: PeriodicTorsionTerm, v: Tensor, need_grad: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    f, g, h = v.chunk(3, dim=-1)
    a, b = _cross(f, g), _cross(h, g)
    g2 = (g * g).sum(0)
    g_norm = torch.sqrt(g2)
    # IUPAC sign convention, as OpenMM (Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996))
    phi = torch.atan2(-g_norm * (f * b).sum(0), (a * b).sum(0))
    arg = term.periodicity * phi[:, term.quad_index] - term.phase
    energy = (term.k * (1 + torch.cos(arg))).sum(-1)
    if not need_grad:
        return energy, None
    d_phi = v.new_zeros(phi.shape).index_add_(
        1, term.quad_index, -(term.k * term.periodicity) * torch.sin(arg)
    )
    s0 = d_phi * g_norm / (a * a).sum(0)
    s3 = d_phi * g_norm / (b * b).sum(0)
    fg, hg = (f * g).sum(0) / g2, (h * g).sum(0) / g2
    sa, sb = s0 * a, s3 * b
    # dE/df, dE/dg, dE/dh (the atom gradients are -sa, (1 + fg) sa - hg sb, ..., sb)
    return energy, (-sa, fg * sa - hg * sb, sb)


class NonbondedTerm(nn.Module):
    """Coulomb + Lennard-Jones without cutoff, over all non-excluded pairs plus exceptions.

    Regular pairs use Lorentz-Berthelot combination (``sigma = (s_i + s_j) / 2``,
    ``eps = sqrt(e_i e_j)``); exceptions (1-4 pairs, exclusions) carry their own
    ``chargeProd``, ``sigma``, ``epsilon``. All pairs are folded into one list.
    """

    def __init__(self, pairs: Tensor, qq: Tensor, sigma: Tensor, epsilon: Tensor) -> None:
        super().__init__()
        self.register_buffer("pairs", pairs.reshape(-1, 2))
        self.register_buffer("qq", qq)
        self.register_buffer("sigma", sigma)
        self.register_buffer("epsilon", epsilon)

    @classmethod
    def from_openmm(cls, force: Any) -> NonbondedTerm:
        """Compile an `openmm.NonbondedForce` that uses ``NoCutoff``."""
        import openmm as mm

        if force.getNonbondedMethod() != mm.NonbondedForce.NoCutoff:
            raise UnsupportedForceError(
                "NonbondedForce with a cutoff or periodic method is not supported by TorchEnergy "
                "(only NoCutoff); build the system with nonbondedMethod=NoCutoff"
            )
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise UnsupportedForceError("NonbondedForce parameter offsets are not supported")
        n = force.getNumParticles()
        params = np.array(
            [[_val(v) for v in force.getParticleParameters(i)] for i in range(n)], dtype=np.float64
        ).reshape(n, 3)
        q, s, e = params.T
        iu, ju = np.triu_indices(n, k=1)
        keep = np.ones(len(iu), dtype=bool)
        pair_index = {(a, b): k for k, (a, b) in enumerate(zip(iu.tolist(), ju.tolist()))}
        ex_pairs, ex_qq, ex_s, ex_e = [], [], [], []
        for k in range(force.getNumExceptions()):
            a, b, qq, sig, eps = force.getExceptionParameters(k)
            a, b = min(a, b), max(a, b)
            keep[pair_index[(a, b)]] = False
            qq, sig, eps = _val(qq), _val(sig), _val(eps)
            if qq != 0.0 or eps != 0.0:
                ex_pairs.append((a, b))
                ex_qq.append(qq)
                ex_s.append(sig)
                ex_e.append(eps)
        iu, ju = iu[keep], ju[keep]
        pairs = np.concatenate([np.stack([iu, ju], 1), np.array(ex_pairs, dtype=np.int64)])
        pairs = pairs.reshape(-1, 2)
        qq = np.concatenate([q[iu] * q[ju], ex_qq])
        sigma = np.concatenate([0.5 * (s[iu] + s[ju]), ex_s])
        epsilon = np.concatenate([np.sqrt(e[iu] * e[ju]), ex_e])
        return cls(_i64(pairs, (-1, 2)), _f64(qq), _f64(sigma), _f64(epsilon))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _analytic(x, _nonbonded_energy_and_grad, self)


def _nonbonded_energy_and_grad(
    term: NonbondedTerm, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Coulomb + LJ energy ``(B,)`` and, if ``need_grad``, its analytic gradient ``(B, N, 3)``."""
    m = _incidence(term, x, term.pairs[:, 1], term.pairs[:, 0])
    d = _vectors(x, m)
    inv_r2 = 1 / (d * d).sum(0)
    coulomb = (ONE_4PI_EPS0 * term.qq) * torch.sqrt(inv_r2)
    sr6 = (term.sigma**2 * inv_r2) ** 3
    eps4 = 4.0 * term.epsilon
    lj12, lj6 = eps4 * sr6 * sr6, eps4 * sr6
    energy = (coulomb + lj12 - lj6).sum(-1)
    if not need_grad:
        return energy, None
    g = inv_r2 * (-0.5 * coulomb - 6 * lj12 + 3 * lj6)  # dE / d r^2
    return energy, _vectors_grad((2 * g) * d, m)


class TorchEnergy(Energy):
    """Potential energy of an `openmm.System`, in torch: ``(B, n_atoms, 3)`` nm -> ``(B,)`` kJ/mol.

    Differentiable (forces by autograd), batched, device- and dtype-agnostic (the terms follow
    the input's dtype; parameters are float64 buffers, cast copies cached per dtype/device).
    The fused evaluator is built from the terms at construction: changing a term's buffers
    afterwards is not seen by `forward`.

    Example:
        >>> energy = TorchEnergy.from_openmm(boltzgen.systems.load("aldp").system)
        >>> u = energy(x)                     # (B,) kJ/mol
        >>> u, f = energy.energy_and_forces(x)
    """

    def __init__(self, terms: dict[str, nn.Module], n_atoms: int) -> None:
        super().__init__(n_atoms)
        self.terms = nn.ModuleDict(terms)
        self._compiled: Any = None
        self._analytic = True
        # the fused evaluator keeps its own float64 master (not a submodule: no state_dict
        # entries, and `.to()` leaves it alone); cast copies are cached per (dtype, device)
        fused = None
        if terms and all(isinstance(t, _FUSABLE) for t in terms.values()):
            fused = _FusedEnergy(terms, n_atoms)
        self.__dict__["_fused"] = fused
        self.__dict__["_fused_cache"] = {}

    def set_analytic_gradients(self, enabled: bool = True) -> TorchEnergy:
        """Choose analytic, once-differentiable gradients (default, fast) or plain autograd.

        Plain autograd (``enabled=False``) is needed for second derivatives, e.g. training
        through MALA/HMC proposals that use forces. Returns ``self``.
        """
        self._analytic = bool(enabled)
        for term in self.terms.values():
            term.analytic_gradients = bool(enabled)
            for cached in term.__dict__.get("_cast_cache", {}).values():
                cached.analytic_gradients = bool(enabled)
        return self

    def compile_energy(self, **kwargs: Any) -> TorchEnergy:
        """Use `torch.compile` for the total energy and its analytic gradient.

        The whole fused evaluation (all terms, energy and forces) is one compiled function, so
        it compiles once per input shape/dtype (and once more for the plain-autograd path of
        `set_analytic_gradients(False)`, if used). Keyword arguments go to `torch.compile`
        (``dynamic=False`` suits a fixed batch size). Returns ``self``.
        """
        if self._fused is None:
            self._compiled = torch.compile(self._total, **kwargs)
            return self
        self._compiled = {
            True: torch.compile(_evaluate_whole, **kwargs),
            False: torch.compile(_plain_total, **kwargs),
        }
        return self

    @classmethod
    def from_openmm(cls, system: Any) -> TorchEnergy:
        """Compile every force of ``system`` (an `openmm.System`) into a torch term.

        Term names are the OpenMM class names, suffixed with ``_<k>`` when a class repeats.
        """
        compilers = {
            "HarmonicBondForce": HarmonicBondTerm.from_openmm,
            "HarmonicAngleForce": HarmonicAngleTerm.from_openmm,
            "PeriodicTorsionForce": PeriodicTorsionTerm.from_openmm,
            "NonbondedForce": NonbondedTerm.from_openmm,
            "GBSAOBCForce": GBSAOBCTerm.from_openmm,
            "CustomGBForce": GBSAOBCTerm.from_custom_gb,
        }
        if system.usesPeriodicBoundaryConditions():
            raise UnsupportedForceError("periodic systems are not supported by TorchEnergy")
        if any(system.isVirtualSite(i) for i in range(system.getNumParticles())):
            raise UnsupportedForceError("virtual sites are not supported by TorchEnergy")
        terms: dict[str, nn.Module] = {}
        for k, force in enumerate(system.getForces()):
            kind = type(force).__name__
            if kind in _IGNORED_FORCES:
                continue
            if kind not in compilers:
                raise UnsupportedForceError(
                    f"force {k} ({kind}) is not supported by TorchEnergy; supported: "
                    f"{', '.join(compilers)} (and {', '.join(_IGNORED_FORCES)}, which has no "
                    "energy). Use OpenMMEnergy for this system."
                )
            name = kind if kind not in terms else f"{kind}_{k}"
            terms[name] = compilers[kind](force)
        return cls(terms, system.getNumParticles())

    def energy_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-force energies, each ``(B,)`` kJ/mol, keyed like `terms`.

        Without a gradient to track, one fused evaluation gives them all; when ``x`` requires
        grad, each term is evaluated on its own so that each energy is differentiable.
        """
        x = self._check_positions(x)
        if self._fused is not None and not (torch.is_grad_enabled() and x.requires_grad):
            energies, _ = self._fused_for(x).evaluate(x, False)
            return dict(zip(self.terms, energies.unbind(-1)))
        return {name: _run_term(term, x) for name, term in self.terms.items()}

    def forward(self, x: Tensor) -> Tensor:
        """Total potential energy ``(B,)`` in kJ/mol of positions ``(B, n_atoms, 3)`` in nm."""
        x = self._check_positions(x)
        if self._compiled is not None and self._fused is None:
            return self._compiled(x)
        return self._total(x)

    def _fused_for(self, x: Tensor) -> _FusedEnergy:
        """The fused evaluator with its parameters in ``x``'s dtype and device (cached)."""
        key = (x.dtype, x.device)
        if key not in self._fused_cache:
            self._fused_cache[key] = copy.deepcopy(self._fused).to(device=x.device, dtype=x.dtype)
        return self._fused_cache[key]

    def _total(self, x: Tensor) -> Tensor:
        if self._fused is not None:
            fused = self._fused_for(x)
            compiled = self._compiled
            if not self._analytic or torch.compiler.is_compiling():
                if compiled is not None:
                    return compiled[False](fused, x)
                return _plain_total(fused, x)
            if compiled is not None:
                return _FusedTotal.apply(x, lambda x, need: compiled[True](fused, x, need))
            return _FusedTotal.apply(x, fused.evaluate)
        total = x.new_zeros(x.shape[0])
        for term in self.terms.values():
            total = total + _run_term(term, x)
        return total


def _run_term(term: nn.Module, x: Tensor) -> Tensor:
    """Evaluate a term with its (float64 master) buffers cast to the input's dtype and device.

    The cast copies are cached per (dtype, device), so the float64 parameters are never rounded.
    """
    master = next(iter(b for b in term.buffers() if b.is_floating_point()))
    if master.dtype == x.dtype and master.device == x.device:
        return term(x)
    cache = term.__dict__.setdefault("_cast_cache", {})
    key = (x.dtype, x.device)
    if key not in cache:
        cache[key] = copy.deepcopy(term).to(device=x.device, dtype=x.dtype)
    return cache[key](x)


class _DenseNonbonded(nn.Module):
    """A `NonbondedTerm` as symmetric ``(N, N)`` parameter matrices for the fused pair pass.

    Each pair's parameters sit at ``(i, j)`` and ``(j, i)`` with half weight, so sums over the
    full matrix count each pair once; excluded pairs and the diagonal are zero and padded to
    ``r^2 + 1`` (finite even where two excluded atoms coincide).
    """

    def __init__(self, term: NonbondedTerm, n_atoms: int) -> None:
        super().__init__()
        i, j = term.pairs[:, 0], term.pairs[:, 1]

        def dense(values: Tensor) -> Tensor:
            m = torch.zeros(n_atoms, n_atoms, dtype=values.dtype)
            m.index_put_((i, j), values, accumulate=True)
            m.index_put_((j, i), values, accumulate=True)
            return m

        qq = dense(0.5 * ONE_4PI_EPS0 * term.qq)
        eps4 = dense(2.0 * term.epsilon)  # half of 4 epsilon
        self.register_buffer("qq", qq)
        self.register_buffer("eps4", eps4)
        self.register_buffer("sigma6", dense(term.sigma**6))
        self.register_buffer("pad", ((qq == 0) & (eps4 == 0)).to(qq.dtype))


def _dense_nonbonded_from_r2(
    term: _DenseNonbonded, r2: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Coulomb + LJ energy ``(B,)`` from squared distances ``(B, N, N)``; dE/dr2 if asked."""
    inv_r2 = torch.reciprocal(r2 + term.pad)
    coulomb = term.qq * torch.sqrt(inv_r2)
    sr6 = term.sigma6 * inv_r2 * inv_r2 * inv_r2
    lj6 = term.eps4 * sr6
    lj12 = lj6 * sr6
    energy = (coulomb + lj12 - lj6).sum((-1, -2))
    if not need_grad:
        return energy, None
    # dE/dr2 = (-coulomb / 2 - 6 lj12 + 3 lj6) / r2
    g = torch.add(lj6, lj12, alpha=-2.0).mul_(3.0).sub_(coulomb, alpha=0.5).mul_(inv_r2)
    return energy, g


_FUSABLE = (HarmonicBondTerm, HarmonicAngleTerm, PeriodicTorsionTerm, NonbondedTerm, GBSAOBCTerm)

#: batch chunk of the bonded terms' ``(3, chunk, n_vectors)`` temporaries
_BONDED_CHUNK = 256
#: bytes of one ``(chunk, N, N)`` pair temporary (128 x 22 x 22 float32 for alanine dipeptide)
_PAIR_BYTES = 1 << 18
#: the same on a GPU: chunks there only bound memory (each costs ~60 kernel launches; with the
#: CPU's cache-sized chunks a batch of 8,192 launched 15,744 kernels per training step on an
#: H200 against 4,980 at 512, the device busy 14-29 % of the step: benchmarks/device_step.py)
_PAIR_BYTES_GPU = 1 << 28
_BONDED_CHUNK_GPU = 1 << 16


class _FusedEnergy(nn.Module):
    """All terms of a `TorchEnergy` in one evaluation, returning every term's energy.

    Bonded terms share one incidence product for their bond/angle/torsion vectors and one for
    the gradient; pair terms (Coulomb + LJ, GB) share one ``(B, N, N)`` squared-distance matrix
    and sum their ``dE/dr^2`` before a single position gradient. Parameters are prepared once
    (float64 master here; `TorchEnergy` caches cast copies per dtype/device).
    """

    def __init__(self, terms: dict[str, nn.Module], n_atoms: int) -> None:
        super().__init__()
        self.n_terms = len(terms)
        self.bonded = nn.ModuleList()
        self.pair = nn.ModuleList()
        self.bonded_fn: list[Any] = []
        self.pair_fn: list[Any] = []
        self.bonded_slot: list[int] = []
        self.pair_slot: list[int] = []
        self.sizes: list[int] = []
        plus, minus = [], []
        bonded = {
            HarmonicBondTerm: (_bond_vectors, _bond_from_vectors),
            HarmonicAngleTerm: (_angle_vectors, _angle_from_vectors),
            PeriodicTorsionTerm: (_torsion_vectors, _torsion_from_vectors),
        }
        for k, term in enumerate(terms.values()):
            term = copy.deepcopy(term)
            for cache in ("_incidence_cache", "_cast_cache"):
                term.__dict__.pop(cache, None)
            if type(term) in bonded:
                vectors, fn = bonded[type(term)]
                p, m = vectors(term)
                plus.append(p)
                minus.append(m)
                self.sizes.append(p.shape[0])
                self.bonded.append(term)
                self.bonded_fn.append(fn)
                self.bonded_slot.append(k)
            elif isinstance(term, NonbondedTerm):
                self.pair.append(_DenseNonbonded(term, n_atoms))
                self.pair_fn.append(_dense_nonbonded_from_r2)
                self.pair_slot.append(k)
            else:
                self.pair.append(term)
                self.pair_fn.append(_gb_from_r2)
                self.pair_slot.append(k)
        m = torch.zeros(n_atoms, sum(self.sizes), dtype=torch.float64)
        if plus:
            p, q = torch.cat(plus), torch.cat(minus)
            cols = torch.arange(p.shape[0])
            m.index_put_((p, cols), torch.ones(p.shape[0], dtype=m.dtype), accumulate=True)
            m.index_put_((q, cols), -torch.ones(p.shape[0], dtype=m.dtype), accumulate=True)
        self.register_buffer("incidence", m)
        # the compiled kernels take any bonded terms, at most one Coulomb + LJ and one GB term
        kinds = [type(t) for t in self.pair]
        self.native_supported = (
            kinds.count(_DenseNonbonded) <= 1
            and kinds.count(GBSAOBCTerm) <= 1
            and len(kinds) == kinds.count(_DenseNonbonded) + kinds.count(GBSAOBCTerm)
        )

    def evaluate(
        self, x: Tensor, need_grad: bool, chunked: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Per-term energies ``(B, n_terms)`` and, if ``need_grad``, the total dE/dx.

        ``chunked`` splits the batch (bonded and pair parts separately) so that temporaries
        stay cache-sized on a CPU (on other devices the chunks only bound memory); the
        compiled evaluation runs unchunked.
        """
        energies: list[Tensor | None] = [None] * self.n_terms
        grad = None
        bonded_chunk = _BONDED_CHUNK if x.device.type == "cpu" else _BONDED_CHUNK_GPU
        bonded, pairs, pair_chunk = self._bonded, self._pairs, self._pair_chunk(x)
        if self._native_applies(x):  # the compiled kernels walk the batch themselves
            bonded, pairs = self._native_bonded, self._native_pairs
            bonded_chunk = pair_chunk = x.shape[0]
        for part, chunk in ((bonded, bonded_chunk), (pairs, pair_chunk)):
            if chunked and x.shape[0] > chunk:
                pieces = [part(xs, need_grad) for xs in x.split(chunk)]
                e = {k: torch.cat([p[0][k] for p in pieces]) for k in pieces[0][0]}
                g = (
                    torch.cat([p[1] for p in pieces])
                    if need_grad and pieces[0][1] is not None
                    else None
                )
            else:
                e, g = part(x, need_grad)
            for k, value in e.items():
                energies[k] = value
            if g is not None:
                grad = g if grad is None else grad + g
        return torch.stack(energies, -1), grad

    def _pair_chunk(self, x: Tensor) -> int:
        """Batch chunk whose ``(chunk, N, N)`` pair temporaries take about `_PAIR_BYTES` (on a
        CPU; `_PAIR_BYTES_GPU` elsewhere)."""
        budget = _PAIR_BYTES if x.device.type == "cpu" else _PAIR_BYTES_GPU
        return max(1, budget // (x.shape[1] ** 2 * x.element_size()))

    def _bonded(self, x: Tensor, need_grad: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        energies: dict[int, Tensor] = {}
        if not self.bonded_slot:
            return energies, None
        v = _vectors(x, self.incidence)
        # dE/dvector of every term goes straight into one (B, 3, K) buffer, the layout the
        # gradient product reads without a copy
        gbuf = x.new_empty(x.shape[0], 3, v.shape[-1]) if need_grad else None
        start = 0
        pieces = v.split(self.sizes, -1)
        for term, fn, k, piece in zip(self.bonded, self.bonded_fn, self.bonded_slot, pieces):
            energies[k], g = fn(term, piece, need_grad)
            for gi in g or ():
                gbuf[:, :, start : start + gi.shape[-1]] = gi.transpose(0, 1)
                start += gi.shape[-1]
        if gbuf is None:
            return energies, None
        b, n = x.shape[0], x.shape[1]
        grad = torch.mm(gbuf.view(b * 3, -1), self.incidence.T).view(b, 3, n).transpose(1, 2)
        return energies, grad

    def _pairs(self, x: Tensor, need_grad: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        energies: dict[int, Tensor] = {}
        if not self.pair_slot:
            return energies, None
        xc, r2 = _pair_matrix(x)
        g_sum = None
        for term, fn, k in zip(self.pair, self.pair_fn, self.pair_slot):
            energies[k], g = fn(term, r2, need_grad)
            if need_grad:
                g_sum = g if g_sum is None else g_sum + g
        if not need_grad:
            return energies, None
        return energies, _grad_from_r2(xc, g_sum)

    def _native_applies(self, x: Tensor) -> bool:
        return (
            self.native_supported
            and x.shape[0] > 0
            and x.device.type == "cpu"
            and native.dtype_supported(x.dtype)
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad)  # plain autograd path
            and native.enabled("energy")
        )

    def _native_pairs(self, x: Tensor, need_grad: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        """`_pairs` through the compiled kernel of `boltzgen.native` (`_native_applies`)."""
        if not self.pair_slot:
            return {}, None
        return _native_pair_call(native.library(), self, x, need_grad)

    def _native_bonded(self, x: Tensor, need_grad: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        """`_bonded` through the compiled kernels of `boltzgen.native` (`_native_applies`)."""
        if not self.bonded_slot:
            return {}, None
        return _native_bonded_call(native.library(), self, x, need_grad)


def _native_pair_call(
    lib: ctypes.CDLL, fused: _FusedEnergy, x: Tensor, need_grad: bool
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Energies of the pair terms ``{slot: (B,)}`` and their gradient ``(B, N, 3)`` (if
    ``need_grad``) from the compiled kernel; ``fused``'s parameters in ``x``'s dtype."""
    x = x.contiguous()
    b, n = x.shape[0], x.shape[1]
    nb = gb = None
    slots: dict[str, int] = {}
    for term, k in zip(fused.pair, fused.pair_slot):
        if isinstance(term, GBSAOBCTerm):
            gb, slots["gb"] = term, k
        else:
            nb, slots["nb"] = term, k
    e_nb = x.new_empty(b) if nb is not None else None
    e_gb = x.new_empty(b) if gb is not None else None
    grad = x.new_zeros(b, n, 3) if need_grad else None  # the kernel adds to it
    nb_args: list[Tensor | None] = [None] * 3
    gb_args: list[Tensor | None] = [None] * 9
    scalars: list[float | int] = [0.0, 0.0, 0.0, 0.0, 0, 0]
    if nb is not None:
        nb_args = [nb.qq.contiguous(), nb.eps4.contiguous(), nb.sigma6.contiguous()]
    if gb is not None:
        gb_args = [
            t.contiguous()
            for t in (gb.qq, gb.threshold, gb.offset_radius, gb.scaled_radius, gb.half_or,
                      gb.inv_or, gb.inv_radius, gb.or_over_radius, gb.sa_coef)
        ]  # fmt: skip
        scalars = [gb.alpha, gb.beta, gb.gamma, gb.prefactor, int(bool(gb.surface_area_energy)),
                   int(bool(gb.engulfed_term))]  # fmt: skip
    ptrs = [None if t is None else t.data_ptr() for t in (*nb_args, *gb_args)]
    outs = [None if t is None else t.data_ptr() for t in (e_nb, e_gb, grad)]
    fn = native.kernel(lib, "pairs_eval", x.dtype)
    rc = fn(b, n, x.data_ptr(), *ptrs, *scalars, *outs)
    if rc:
        raise RuntimeError(f"pair kernel failed ({rc})")
    energies = {}
    if nb is not None:
        energies[slots["nb"]] = e_nb
    if gb is not None:
        energies[slots["gb"]] = e_gb
    return energies, grad


def _native_bonded_call(
    lib: ctypes.CDLL, fused: _FusedEnergy, x: Tensor, need_grad: bool
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Energies of the bonded terms ``{slot: (B,)}`` and their summed gradient ``(B, N, 3)``
    (if ``need_grad``) from the compiled kernel; ``fused``'s parameters in ``x``'s dtype."""
    x = x.contiguous()
    b, n = x.shape[0], x.shape[1]
    grad = x.new_zeros(b, n, 3) if need_grad else None
    fn = native.kernel(lib, "bonded_eval", x.dtype)
    energies = {}
    for term, k in zip(fused.bonded, fused.bonded_slot):
        quad = p2 = None
        if isinstance(term, HarmonicBondTerm):
            kind, idx, p0 = 0, term.pairs, term.r0
        elif isinstance(term, HarmonicAngleTerm):
            kind, idx, p0 = 1, term.triples, term.theta0
        else:
            kind, idx, p0 = 2, term.unique_quads, term.phase
            quad, p2 = term.quad_index.contiguous(), term.periodicity.contiguous()
        idx, p0, p1 = idx.contiguous(), p0.contiguous(), term.k.contiguous()
        energy = x.new_empty(b)
        rc = fn(
            b, n, x.data_ptr(), kind, idx.shape[0], idx.data_ptr(),
            0 if quad is None else quad.shape[0], None if quad is None else quad.data_ptr(),
            p0.data_ptr(), p1.data_ptr(), None if p2 is None else p2.data_ptr(),
            energy.data_ptr(), None if grad is None else grad.data_ptr(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"bonded kernel failed ({rc})")
        energies[k] = energy
    return energies, grad


def _native_pairs_self_check(lib: ctypes.CDLL) -> float:
    """Largest difference (energies and gradients, float64, relative to the largest entry)
    between the compiled pair kernel and the torch evaluation for a random 7-atom system with
    Coulomb + LJ (one excluded pair) and OBC GB (with and without the engulfed-atom term);
    `boltzgen.native` keeps the torch evaluation if it misses by more than 1e-9."""
    g = torch.Generator().manual_seed(0)
    n = 7
    q = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    iu, ju = torch.triu_indices(n, n, 1)
    pairs = torch.stack([iu, ju], 1)
    sig = 0.2 + 0.1 * torch.rand(len(iu), generator=g, dtype=torch.float64)
    eps = 0.5 * torch.rand(len(iu), generator=g, dtype=torch.float64)
    qq = q[iu] * q[ju]
    qq[0], eps[0] = 0.0, 0.0  # an excluded pair
    radius = 0.12 + 0.08 * torch.rand(n, generator=g, dtype=torch.float64)
    scale = 0.7 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    x = 0.5 * torch.rand(5, n, 3, generator=g, dtype=torch.float64)
    x[0, 1] = x[0, 0] + 0.02  # an engulfed atom, inactive pairs
    bonded = {
        "bonds": HarmonicBondTerm(pairs[:5], 0.1 + 0.1 * sig[:5], 1e5 * eps[:5]),
        "angles": HarmonicAngleTerm(torch.tensor([[0, 1, 2], [1, 2, 3], [4, 5, 6]]),
                                    torch.tensor([1.9, 2.0, 1.7], dtype=torch.float64),
                                    torch.tensor([400.0, 300.0, 500.0], dtype=torch.float64)),
        "torsions": PeriodicTorsionTerm(
            torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [3, 4, 5, 6]]),
            torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64),
            torch.tensor([0.0, 3.14159, 0.5], dtype=torch.float64),
            torch.tensor([2.0, 0.7, 1.1], dtype=torch.float64)),
    }  # fmt: skip
    compared = []
    for engulfed in (False, True):
        terms = {
            "nb": NonbondedTerm(pairs, qq, sig, eps),
            "gb": GBSAOBCTerm(
                q, radius, scale, alpha=1.0, beta=0.8, gamma=4.85, engulfed_term=engulfed
            ),  # fmt: skip
        }
        fused = _FusedEnergy({**terms, **bonded}, n)
        for ours, theirs in ((_native_pair_call, fused._pairs),
                             (_native_bonded_call, fused._bonded)):  # fmt: skip
            want_e, want_g = theirs(x, True)
            got_e, got_g = ours(lib, fused, x, True)
            compared += [(got_g, want_g)] + [(got_e[k], want_e[k]) for k in want_e]
    return native.relative_error(compared)


def _evaluate_whole(
    fused: _FusedEnergy, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Unchunked evaluation (what `TorchEnergy.compile_energy` compiles)."""
    return fused.evaluate(x, need_grad, chunked=False)


def _plain_total(fused: _FusedEnergy, x: Tensor) -> Tensor:
    """Total energy through plain autograd (differentiable any number of times)."""
    return fused.evaluate(x, False)[0].sum(-1)


class _FusedTotal(torch.autograd.Function):
    """Total energy with the fused analytic gradient (once-differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, evaluate: Any) -> Tensor:  # noqa: D102
        energies, grad = evaluate(x, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return energies.sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_out[:, None, None] * grad, None
