"""Energy targets: OpenMM reference energies, the torch-native force field, Boltzmann targets.

Every energy is an `Energy` module: positions ``(B, n_atoms, 3)`` in nm -> ``(B,)`` kJ/mol.
"""

from boltzgen.energy.base import Energy
from boltzgen.energy.openmm_energy import OpenMMEnergy
from boltzgen.energy.target import BoltzmannTarget, TorsionRestraint, regularize_energy
from boltzgen.energy.torch_energy import TorchEnergy

__all__ = [
    "BoltzmannTarget",
    "Energy",
    "OpenMMEnergy",
    "TorchEnergy",
    "TorsionRestraint",
    "regularize_energy",
]
