"""Generalised-Born implicit solvent (OBC) in torch: `GBSAOBCTerm`.

Compiles OpenMM's ``GBSAOBCForce`` and the app-layer OBC1/OBC2 ``CustomGBForce`` (recognised by
their expression templates) into one batched term with analytic gradients.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from boltzgen.energy._common import ONE_4PI_EPS0, _analytic, _f64, _val
from boltzgen.errors import UnsupportedForceError

__all__ = ["GBSAOBCTerm"]


class GBSAOBCTerm(nn.Module):
    """Onufriev-Bashford-Case generalised Born implicit solvent with ACE surface area.

    Born radii ``B_i = 1 / (1/or_i - tanh(a psi - b psi^2 + c psi^3) / R_i)``, ``psi = I_i or_i``,
    with ``or = R - offset`` and the pairwise descreening integral ``I_i`` over ``j != i``
    (Onufriev, Bashford & Case, Proteins 55, 383 (2004)); energy
    ``-0.5 k_e (1/eps_in - 1/eps_out) [sum_i q_i^2 / B_i + 2 sum_{i<j} q_i q_j / f_ij]``
    with ``f_ij = sqrt(r^2 + B_i B_j exp(-r^2 / (4 B_i B_j)))`` plus the ACE non-polar term
    ``sa (R_i + 0.14)^2 (R_i / B_i)^6``.

    ``engulfed_term`` adds OpenMM's ``GBSAOBCForce`` correction for an atom buried inside a
    neighbour's scaled sphere; the CustomGBForce versions (app layer, OBC1) omit it.
    """

    def __init__(
        self,
        charge: Tensor,
        radius: Tensor,
        scale: Tensor,
        *,
        alpha: float,
        beta: float,
        gamma: float,
        offset: float = 0.009,
        solute_dielectric: float = 1.0,
        solvent_dielectric: float = 78.5,
        surface_area_energy: float = 4 * math.pi * 2.25936,
        probe_radius: float = 0.14,
        coulomb_constant: float = ONE_4PI_EPS0,
        engulfed_term: bool = True,
    ) -> None:
        super().__init__()
        n = charge.shape[0]
        self.register_buffer("charge", charge)
        self.register_buffer("radius", radius)
        self.register_buffer("offset_radius", radius - offset)
        self.register_buffer("scaled_radius", scale * (radius - offset))
        self.register_buffer("qq", charge[:, None] * charge[None, :])
        self.register_buffer("eye", torch.eye(n, dtype=charge.dtype))
        # pair (i, j) descreens i iff r_ij > or_i - sr_j (never on the diagonal); inactive pairs
        # are evaluated at a harmless r (the threshold itself, 1 nm on the diagonal), masked out
        threshold = self.offset_radius[:, None] - self.scaled_radius[None, :]
        self.register_buffer("threshold", threshold + torch.diag(torch.full((n,), math.inf)))
        self.register_buffer("r_floor", threshold * (1 - self.eye) + self.eye)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.prefactor = -0.5 * coulomb_constant * (1 / solute_dielectric - 1 / solvent_dielectric)
        self.surface_area_energy = surface_area_energy  # includes the 4 pi
        self.probe_radius = probe_radius
        self.engulfed_term = engulfed_term
        # derived constants, prepared once (not saved: they follow from the buffers above)
        orad, srad = self.offset_radius, self.scaled_radius
        derived = {
            "or_col": orad[:, None],
            "sr_row": srad[None, :],
            "neg_sr2_row": -(srad**2)[None, :],
            "two_inv_or_col": 2 / orad[:, None],
            "half_or": 0.5 * orad,
            "inv_or": 1 / orad,
            "inv_radius": 1 / radius,
            "or_over_radius": orad / radius,
            "sa_coef": surface_area_energy * (radius + probe_radius) ** 2 * radius**6,
        }
        for name, value in derived.items():
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_openmm(cls, force: Any) -> GBSAOBCTerm:
        """Compile an `openmm.GBSAOBCForce` (OBC2 parameters a=1, b=0.8, c=4.85)."""
        import openmm as mm

        if force.getNonbondedMethod() != mm.GBSAOBCForce.NoCutoff:
            raise UnsupportedForceError(
                "GBSAOBCForce with a cutoff is not supported (NoCutoff only)"
            )
        n = force.getNumParticles()
        p = np.array([[_val(v) for v in force.getParticleParameters(i)] for i in range(n)])
        p = p.reshape(n, 3)
        return cls(
            _f64(p[:, 0]),
            _f64(p[:, 1]),
            _f64(p[:, 2]),
            alpha=1.0,
            beta=0.8,
            gamma=4.85,
            solute_dielectric=force.getSoluteDielectric(),
            solvent_dielectric=force.getSolventDielectric(),
            surface_area_energy=4 * math.pi * _val(force.getSurfaceAreaEnergy()),
            engulfed_term=True,
        )

    @classmethod
    def from_custom_gb(cls, force: Any) -> GBSAOBCTerm:
        """Compile the `openmm.CustomGBForce` that OpenMM's app layer builds for OBC1/OBC2.

        The expressions must match OpenMM's templates exactly up to their numeric constants
        (kappa = 0, no cutoff); anything else raises `UnsupportedForceError`.
        """
        consts = _parse_obc_custom_gb(force)
        n = force.getNumParticles()
        p = np.array([list(force.getParticleParameters(i)) for i in range(n)]).reshape(n, 3)
        charge, offset_radius, scaled = p[:, 0], p[:, 1], p[:, 2]
        offset = consts["offset"]
        radius = offset_radius + offset
        return cls(
            _f64(charge),
            _f64(radius),
            _f64(scaled / offset_radius),
            alpha=consts["alpha"],
            beta=consts["beta"],
            gamma=consts["gamma"],
            offset=offset,
            solute_dielectric=consts["soluteDielectric"],
            solvent_dielectric=consts["solventDielectric"],
            surface_area_energy=consts.get("sa", 0.0),
            probe_radius=consts.get("probe", 0.14),
            coulomb_constant=consts["coulomb"],
            engulfed_term=False,
        )

    def born_radii(self, x: Tensor, r2: Tensor | None = None) -> Tensor:
        """Effective Born radii, shape ``(B, n_atoms)``, nm (``r2``: squared distances)."""
        if r2 is None:
            r2 = _pair_matrix(x)[1]
        return self._born(r2)[0]

    def _born(self, r2: Tensor) -> tuple[Tensor, ...]:
        """Born radii from squared distances, with the intermediates the analytic gradient uses."""
        r = torch.sqrt(r2 + self.eye)  # no infinite sqrt'(0) on the diagonal under autograd
        active = r > self.threshold
        r = torch.maximum(r, self.r_floor)
        or_i = self.or_col
        sr_j = self.sr_row
        inv_u = torch.reciprocal(r + sr_j)
        diff = r - sr_j
        abs_diff = diff.abs()
        use_diff = abs_diff > or_i
        lower = torch.maximum(abs_diff, or_i)
        inv_l, inv_r = torch.reciprocal(lower), torch.reciprocal(r)
        inv_l2, inv_u2 = inv_l * inv_l, inv_u * inv_u
        diff_ul = inv_u2 - inv_l2
        a = torch.addcmul(r, self.neg_sr2_row, inv_r)  # r - sr_j^2 / r
        log_lu = torch.log(lower * inv_u)
        term = torch.addcmul(inv_l - inv_u, a, diff_ul, value=0.25)
        term = torch.addcmul(term, log_lu, inv_r, value=0.5)
        engulfed = None
        if self.engulfed_term:
            engulfed = (or_i < sr_j - r) & active
            term = term + torch.where(engulfed, self.two_inv_or_col - 2 * inv_l, 0.0)
        active_f = active.to(r2.dtype)
        psi = self.half_or * (term * active_f).sum(-1)
        t = torch.tanh(psi * (self.alpha + psi * (self.gamma * psi - self.beta)))
        born = torch.reciprocal(torch.addcmul(self.inv_or, t, self.inv_radius, value=-1.0))
        return (
            born,
            psi,
            t,
            active_f,
            diff,
            use_diff,
            engulfed,
            inv_l,
            inv_l2,
            inv_u,
            inv_u2,
            inv_r,
            a,
            log_lu,
            diff_ul,
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _analytic(x, _gb_energy_and_grad, self)


def _pair_matrix(x: Tensor) -> tuple[Tensor, Tensor]:
    """Centred positions ``(B, N, 3)`` and squared distances ``(B, N, N)`` (0 on the diagonal)."""
    xc = x - x.mean(1, keepdim=True)
    # |x_i|^2 + |x_j|^2 - 2 x_i.x_j on centred positions (rounding ~eps |x|^2), diagonal exact
    n2 = (xc * xc).sum(-1)
    r2 = torch.baddbmm(n2[:, :, None] + n2[:, None, :], xc, xc.transpose(1, 2), alpha=-2.0)
    r2 = r2.clamp_min_(0.0) * _off_diagonal(x)
    return xc, r2


def _off_diagonal(x: Tensor) -> Tensor:
    n = x.shape[1]
    return 1 - torch.eye(n, dtype=x.dtype, device=x.device)


def _grad_from_r2(xc: Tensor, g: Tensor) -> Tensor:
    """``dE/dx`` ``(B, N, 3)`` of an energy with ``dE/d r2_ij = g`` ``(B, N, N)``."""
    gs = g + g.transpose(1, 2)
    return 2 * (gs.sum(-1, keepdim=True) * xc - gs @ xc)


def _gb_energy_and_grad(
    term: GBSAOBCTerm, x: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """OBC energy ``(B,)`` and, if ``need_grad``, its analytic gradient ``(B, N, 3)``."""
    if x.shape[0] > _GB_CHUNK:  # keep the (chunk, N, N) temporaries cache-sized
        parts = [_gb_energy_and_grad(term, xs, need_grad) for xs in x.split(_GB_CHUNK)]
        energy = torch.cat([e for e, _ in parts])
        return energy, torch.cat([g for _, g in parts]) if need_grad else None
    xc, r2 = _pair_matrix(x)
    energy, g = _gb_from_r2(term, r2, need_grad)
    return energy, None if g is None else _grad_from_r2(xc, g)


def _gb_from_r2(term: GBSAOBCTerm, r2: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """OBC energy ``(B,)`` from squared distances ``(B, N, N)`` and, if ``need_grad``, dE/dr2."""
    (
        born,
        psi,
        t,
        active_f,
        diff,
        use_diff,
        engulfed,
        inv_l,
        inv_l2,
        inv_u,
        inv_u2,
        inv_r,
        a,
        log_lu,
        diff_ul,
    ) = term._born(r2)
    # polar energy over the full matrix: the diagonal (r = 0, f = B_i) is the Born self
    # energy, each off-diagonal pair appears twice
    inv_born = torch.reciprocal(born)
    bb = born[:, :, None] * born[:, None, :]
    neg_q = r2 * ((-0.25 * inv_born)[:, :, None] * inv_born[:, None, :])  # -r^2 / (4 B_i B_j)
    e = torch.exp(neg_q)
    inv_f = torch.rsqrt(torch.addcmul(r2, bb, e))
    pair = term.qq * inv_f
    energy = term.prefactor * pair.sum((-1, -2))
    sa = None
    if term.surface_area_energy:
        sa = term.sa_coef * inv_born**6
        energy = energy + sa.sum(-1)
    if not need_grad:
        return energy, None
    # h = qq / f^3: dE/d f^2 = -0.5 prefactor h
    h = pair * inv_f
    h.mul_(inv_f)
    he = h * e
    g_bb = torch.addcmul(he, he, neg_q, value=-1.0)  # h e (1 + q): dE/d(B_i B_j) / (-P/2)
    d_born = (-term.prefactor) * torch.bmm(g_bb, born[..., None]).squeeze(-1)
    if sa is not None:
        d_born = d_born - 6 * sa * inv_born
    d_psi = term.alpha + psi * (3 * term.gamma * psi - 2 * term.beta)
    d_integral = d_born * born**2 * (1 - t * t) * d_psi * term.or_over_radius
    # d(term)/dr with lower' = sign(diff) where lower = |diff|, else 0; inv_d = lower' / lower
    inv_d = torch.where(use_diff, torch.reciprocal(diff), 0.0)
    lp_inv_l2 = inv_d * inv_l
    d_term = inv_u2 - lp_inv_l2
    # 1 + sr^2 / r^2 = 2 - a / r
    d_term = torch.addcmul(d_term, 2 - a * inv_r, diff_ul, value=0.25)
    d_term = torch.addcmul(d_term, a, lp_inv_l2 * inv_l - inv_u2 * inv_u, value=0.5)
    d_term = torch.addcmul(
        d_term, inv_r, torch.addcmul(inv_d - inv_u, log_lu, inv_r, value=-1.0), value=0.5
    )
    if engulfed is not None:
        d_term = d_term + torch.where(engulfed, 2 * lp_inv_l2, 0.0)
    # explicit dE/dr^2 = -0.5 P h (1 - e/4); via I_i: dI_i/dr_ij = 0.5 d_term, dr/dr^2 = 1/(2r)
    g = torch.add(h, he, alpha=-0.25).mul_(-0.5 * term.prefactor)
    d_term.mul_(active_f).mul_(inv_r)
    g = torch.addcmul(g, d_term, (0.25 * d_integral)[:, :, None])
    return energy, g


#: batch chunk of the dense GB pair maths (~128 x 22 x 22 temporaries stay in cache)
_GB_CHUNK = 128


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def _normalise(expr: str) -> str:
    return re.sub(r"(?<![\w.])(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", "#", expr.replace(" ", ""))


_OBC_I = (
    "select(step(r+sr2-or1),#*(#/L-#/U+#*(r-sr2^#/r)*(#/(U^#)-#/(L^#))+#*log(L/U)/r),#);"
    "U=r+sr2;L=max(or1,D);D=abs(r-sr2)"
)


def _parse_obc_custom_gb(force: Any) -> dict[str, float]:
    """Constants of an app-layer OBC CustomGBForce; raises if the force has another form."""
    import openmm as mm

    def fail(why: str) -> UnsupportedForceError:
        return UnsupportedForceError(
            f"CustomGBForce is supported only in the OBC1/OBC2 form OpenMM's app layer builds "
            f"(implicitSolvent=OBC1/OBC2, no cutoff, no salt): {why}"
        )

    if force.getNonbondedMethod() != mm.CustomGBForce.NoCutoff:
        raise fail("it uses a cutoff")
    names = [
        force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters())
    ]
    if (
        names != ["charge", "or", "sr"]
        or force.getNumGlobalParameters()
        or force.getNumExclusions()
    ):
        raise fail(f"per-particle parameters {names}")
    if force.getNumComputedValues() != 2 or force.getNumTabulatedFunctions():
        raise fail("unexpected computed values")
    name_i, expr_i, type_i = force.getComputedValueParameters(0)
    name_b, expr_b, type_b = force.getComputedValueParameters(1)
    if (
        name_i != "I"
        or _normalise(expr_i) != _OBC_I
        or type_i != mm.CustomGBForce.ParticlePairNoExclusions
    ):
        raise fail(f"descreening integral {expr_i!r}")
    m = re.fullmatch(
        rf"1/\(1/or-tanh\({_NUM}\*psi(?:-{_NUM}\*psi\^2)?\+{_NUM}\*psi\^3\)/radius\);"
        rf"psi=I\*or;radius=or\+offset;offset={_NUM}",
        expr_b.replace(" ", "").replace("tanh(psi", "tanh(1*psi"),
    )
    if name_b != "B" or m is None or type_b != mm.CustomGBForce.SingleParticle:
        raise fail(f"Born radius {expr_b!r}")
    consts = {
        "alpha": float(m.group(1)),
        "beta": float(m.group(2) or 0.0),
        "gamma": float(m.group(3)),
        "offset": float(m.group(4)),
    }
    dielectric = r"\(1/soluteDielectric-1/solventDielectric\)"
    self_re = rf"-{_NUM}\*{_NUM}\*{dielectric}\*charge\^2/B"
    sa_re = rf"{_NUM}\*\(radius\+{_NUM}\)\^2\*\(radius/B\)\^6"
    pair_re = rf"-{_NUM}\*{dielectric}\*charge1\*charge2/f"
    f_re = r"f=sqrt\(r\^2\+B1\*B2\*exp\(-r\^2/\(4\*B1\*B2\)\)\)"
    seen = set()
    for k in range(force.getNumEnergyTerms()):
        expr, kind = force.getEnergyTermParameters(k)
        body, _, params = expr.replace(" ", "").partition(";")
        values = dict(re.findall(rf"(\w+)={_NUM}", params))
        if float(values.get("kappa", 0.0)) != 0.0:
            raise fail("salt screening (kappa != 0)")
        for key in ("soluteDielectric", "solventDielectric"):
            if key in values:
                consts[key] = float(values[key])
        single = kind == mm.CustomGBForce.SingleParticle
        pair = kind == mm.CustomGBForce.ParticlePairNoExclusions
        if single and (m := re.fullmatch(self_re, body)):
            consts["coulomb"] = 2 * float(m.group(1)) * float(m.group(2))
            seen.add("self")
        elif single and (m := re.fullmatch(sa_re, body)):
            consts["sa"], consts["probe"] = float(m.group(1)), float(m.group(2))
            seen.add("sa")
        elif pair and (m := re.fullmatch(pair_re, body)) and re.search(f_re, params):
            consts["coulomb_pair"] = float(m.group(1))
            seen.add("pair")
        else:
            raise fail(f"energy term {expr!r}")
    if {"self", "pair"} - seen or not math.isclose(consts["coulomb"], consts["coulomb_pair"]):
        raise fail("missing or inconsistent Born self and pair energy terms")
    return consts
