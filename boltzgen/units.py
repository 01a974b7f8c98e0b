"""Units and physical constants: nm, kJ/mol, K, ps throughout boltzgen."""

__all__ = ["MOLAR_GAS_CONSTANT", "thermal_energy"]

#: Boltzmann constant times Avogadro's number in kJ/(mol K) (CODATA 2018, as OpenMM uses).
MOLAR_GAS_CONSTANT = 8.314462618e-3


def thermal_energy(temperature: float) -> float:
    """k_B T in kJ/mol at ``temperature`` K."""
    return MOLAR_GAS_CONSTANT * temperature
