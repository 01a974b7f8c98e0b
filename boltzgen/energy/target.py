"""Boltzmann targets: log p(x) = -U(x)/kT, regularised for the huge energies of bad samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzgen.energy.base import Energy

__all__ = ["BoltzmannTarget", "TorsionRestraint", "regularize_energy"]


def regularize_energy(u: Tensor, energy_cut: float = 1.0e8, energy_max: float = 1.0e20) -> Tensor:
    """Tame huge reduced energies while leaving physical ones untouched.

    ``u`` is returned unchanged below ``energy_cut``, grows logarithmically above it
    (``cut + log(1 + u - cut)``) and is clamped at ``energy_max`` first; NaN and +-inf map to
    the regularised ``energy_max`` (as in FAB, Midgley et al. 2023). Shapes are preserved.
    """
    if not energy_cut < energy_max:
        raise ValueError(f"energy_cut ({energy_cut}) must be below energy_max ({energy_max})")
    u = torch.nan_to_num(u, nan=energy_max, posinf=energy_max, neginf=energy_max)
    u = torch.clamp(u, max=energy_max)
    excess = torch.clamp(u - energy_cut, min=0.0)
    return torch.where(u < energy_cut, u, energy_cut + torch.log1p(excess))


class BoltzmannTarget(nn.Module):
    """The unnormalised Boltzmann density of an energy at temperature ``kT``.

    ``log_prob(x) = -regularize_energy(U(x) / kT)`` for positions ``(B, n_atoms, 3)`` nm.

    Args:
        energy: An `Energy` (``OpenMMEnergy`` or ``TorchEnergy``), kJ/mol.
        kT: Thermal energy in kJ/mol (``MolecularSystem.kT``).
        energy_cut: Reduced energy above which growth becomes logarithmic.
        energy_max: Reduced energy clamp (also used for NaN).
    """

    def __init__(
        self,
        energy: Energy,
        kT: float,  # noqa: N803 - the physical symbol
        energy_cut: float = 1.0e8,
        energy_max: float = 1.0e20,
    ) -> None:
        super().__init__()
        if not kT > 0:
            raise ValueError(f"kT must be positive (kJ/mol), got {kT}")
        self.energy = energy
        self.kT = float(kT)
        self.energy_cut = float(energy_cut)
        self.energy_max = float(energy_max)

    def reduced_energy(self, x: Tensor) -> Tensor:
        """Unregularised reduced energy ``U(x)/kT``, shape ``(B,)``."""
        return self.energy(x) / self.kT

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log density ``(B,)`` (nats) of positions ``(B, n_atoms, 3)`` nm.

        NaN-safe: rows whose energy is not finite (NaN positions, overlapping atoms) get the
        regularised ``-energy_max`` and a zero gradient; the other rows are unaffected.
        """
        u = self.reduced_energy(x)
        bad = ~torch.isfinite(u)
        if x.requires_grad and bool(bad.any()):
            # re-evaluate with the bad rows replaced by a good row, so that no NaN or inf
            # enters the backward pass, then put the regularised maximum in their place
            good_row = x.detach()[(~bad).nonzero()[0]] if bool((~bad).any()) else None
            if good_row is not None:
                safe = torch.where(bad[:, None, None], good_row, x)
                u = torch.where(bad, torch.full_like(u, float("inf")), self.reduced_energy(safe))
            else:
                u = u.detach()
        return -regularize_energy(u, self.energy_cut, self.energy_max)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.log_prob(x)


class TorsionRestraint(nn.Module):
    """A Boltzmann target times a flat-bottomed restraint on one torsion, to train a flow on
    one basin (e.g. ALDP's phi > 0 basin for a mixture proposal).

    ``log_prob(x) = target.log_prob(x) - k d(x)^2`` where ``d`` is the circular distance (rad)
    of the torsion ``atoms`` from the interval ``[lo, hi)`` (0 inside). ``energy`` and ``kT``
    are the unrestrained target's, so importance weights of samples stay toward the
    unrestrained Boltzmann density.

    Args:
        target: A `BoltzmannTarget`.
        atoms: Four zero-based atom indices of the torsion.
        lo, hi: The flat bottom, radians, ``hi - lo`` in (0, 2 pi).
        force_constant: ``k`` in kT per rad^2.
    """

    def __init__(
        self,
        target: BoltzmannTarget,
        atoms: Sequence[int],
        lo: float,
        hi: float,
        force_constant: float,
    ) -> None:
        super().__init__()
        if len(atoms) != 4 or len(set(atoms)) != 4:
            raise ValueError(f"a torsion needs four different atoms, got {list(atoms)}")
        if not 0 < hi - lo < 2 * math.pi or not force_constant > 0:
            raise ValueError("need 0 < hi - lo < 2 pi and force_constant > 0")
        self.target = target
        self.atoms = [int(a) for a in atoms]
        self.center, self.half_width = 0.5 * (lo + hi), 0.5 * (hi - lo)
        self.force_constant = float(force_constant)

    @property
    def energy(self) -> nn.Module:
        """The unrestrained energy (kJ/mol)."""
        return self.target.energy

    @property
    def kT(self) -> float:  # noqa: N802 - the physical symbol
        """k_B T in kJ/mol."""
        return self.target.kT

    def distance(self, x: Tensor) -> Tensor:
        """Circular distance ``(B,)`` rad of the torsion of positions ``(B, n_atoms, 3)`` from
        the flat bottom."""
        from boltzgen.coordinates import geometry

        angle = geometry.dihedrals(x, [self.atoms])[:, 0]
        offset = torch.remainder(angle - self.center + math.pi, 2 * math.pi) - math.pi
        return torch.clamp(offset.abs() - self.half_width, min=0.0)

    def log_prob(self, x: Tensor) -> Tensor:
        """Restrained unnormalised log density ``(B,)``, nats."""
        return self.target.log_prob(x) - self.force_constant * self.distance(x) ** 2

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.log_prob(x)
