"""Test data shared by several test modules (imported as a plain module by pytest)."""

import numpy as np
import torch


def md_frames(system, temperature, n_frames, steps_per_frame=10, seed=1):
    """OpenMM Langevin MD frames ``(n_frames, n_atoms, 3)`` float64 nm of a MolecularSystem.

    Minimised first, then 300 steps of equilibration at ``temperature`` (K), 1 fs steps.
    """
    import openmm
    import openmm.unit as u

    integrator = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin, 10.0 / u.picosecond, 0.001 * u.picoseconds
    )
    integrator.setRandomNumberSeed(seed)
    platform = openmm.Platform.getPlatformByName("CPU")
    ctx = openmm.Context(system.system, integrator, platform, {"Threads": "1"})
    ctx.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    ctx.setVelocitiesToTemperature(temperature * u.kelvin, seed)
    integrator.step(300)
    frames = []
    for _ in range(n_frames):
        integrator.step(steps_per_frame)
        pos = ctx.getState(getPositions=True).getPositions(asNumpy=True)
        frames.append(pos.value_in_unit(u.nanometer))
    return torch.tensor(np.array(frames), dtype=torch.float64)
