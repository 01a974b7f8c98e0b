"""OpenMM evaluation kept free of torch, so that spawned pool workers start quickly.

Used by `boltzgen.energy.OpenMMEnergy`; not public API.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__: list[str] = []

#: Positions beyond this magnitude (nm) are treated as exploded: energy +inf, force 0.
MAX_ABS_POSITION = 1.0e4

_context: Any = None


def make_context(system_xml: str, platform: str, properties: dict[str, str]) -> Any:
    """An `openmm.Context` for a serialised system (the integrator is never stepped)."""
    import openmm as mm

    system = mm.XmlSerializer.deserialize(system_xml)
    plat = mm.Platform.getPlatformByName(platform)
    props = {k: v for k, v in properties.items() if k in plat.getPropertyNames()}
    return mm.Context(system, mm.VerletIntegrator(1.0e-3), plat, props)


def evaluate(context: Any, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``(B,)`` kJ/mol and forces ``(B, N, 3)`` kJ/mol/nm of positions ``(B, N, 3)`` nm.

    Non-finite or exploded positions and non-finite energies give ``+inf`` and zero forces.
    """
    n = positions.shape[0]
    energies = np.full(n, np.inf)
    forces = np.zeros(positions.shape, dtype=np.float64)
    for k in range(n):
        xyz = positions[k]
        if not np.all(np.isfinite(xyz)) or np.abs(xyz).max() > MAX_ABS_POSITION:
            continue
        context.setPositions(xyz)
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy()._value  # kJ/mol
        if not np.isfinite(energy):
            continue
        f = state.getForces(asNumpy=True)._value  # kJ/mol/nm
        energies[k] = energy
        forces[k] = np.where(np.isfinite(f), f, 0.0)
    return energies, forces


def init_worker(system_xml: str, platform: str, properties: dict[str, str]) -> None:
    """Pool initializer: pin threads and build this worker's context."""
    global _context
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    _context = make_context(system_xml, platform, properties)


def evaluate_in_worker(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate a chunk with this worker's context."""
    return evaluate(_context, positions)
