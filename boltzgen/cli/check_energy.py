"""``boltzgen check-energy``: short MD, then OpenMM vs torch-native energies and forces on it."""

from __future__ import annotations

import argparse
import time

from boltzgen.errors import BoltzgenError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen check-energy [SYSTEM] [--frames N]``."""
    p = subparsers.add_parser(
        "check-energy",
        help="short MD, then OpenMM vs torch-native energies and forces on its frames",
        description="Load a system, run a short OpenMM MD, evaluate the OpenMM and torch-native "
        "energies and forces on its frames and report agreement and throughput.",
    )
    p.add_argument("system", nargs="?", default="aldp", help="system name or directory")
    p.add_argument("--solvent", default="implicit", choices=["implicit", "vacuum"])
    p.add_argument("--temperature", type=float, default=None, help="K (default: the config's)")
    p.add_argument("--frames", type=int, default=256, help="MD frames to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen check-energy``; exit code 1 when the energies disagree."""
    import numpy as np
    import torch

    from boltzgen import systems
    from boltzgen.energy import OpenMMEnergy, TorchEnergy

    if args.frames < 1:
        raise BoltzgenError(f"--frames must be at least 1, got {args.frames}")
    s = systems.load(args.system, solvent=args.solvent, temperature=args.temperature)
    print(f"system      {s.name}: {s.n_atoms} atoms, {args.solvent} solvent", end="")
    print(f" ({s.implicit_model})" if s.implicit_model else "", end="")
    print(f", T = {s.temperature:g} K, kT = {s.kT:.4f} kJ/mol")
    print(f"forces      {', '.join(type(f).__name__ for f in s.system.getForces())}")
    t0 = time.perf_counter()
    frames = _short_md(s, args.frames, args.seed)
    print(f"md          {len(frames)} frames x 100 fs in {time.perf_counter() - t0:.1f} s")
    x = torch.as_tensor(frames, dtype=torch.float64)
    reference = TorchEnergy.from_openmm(s.system)
    with OpenMMEnergy(s.system) as openmm_energy:
        t0 = time.perf_counter()
        e_mm, f_mm = openmm_energy.energy_and_forces(x)
        t_mm = time.perf_counter() - t0
    reference.energy_and_forces(x[:8])  # warm-up
    t0 = time.perf_counter()
    e_t, f_t = reference.energy_and_forces(x)
    t_t = time.perf_counter() - t0
    rel = ((e_t - e_mm).abs() / e_mm.abs().clamp(min=1.0)).max().item()
    f_rel = ((f_t - f_mm).pow(2).mean() / f_mm.pow(2).mean()).sqrt().item()
    e = e_mm.numpy()
    print(
        f"energy      mean {e.mean():.2f} kJ/mol, std {e.std():.2f}, "
        f"range [{e.min():.2f}, {e.max():.2f}]; <U>/kT = {e.mean() / s.kT:.2f}"
    )
    print(f"agreement   TorchEnergy vs OpenMM: energy max rel {rel:.1e}, force rel RMS {f_rel:.1e}")
    n = len(x)
    print(
        f"speed       OpenMM {1e6 * t_mm / n:.0f} us/sample, TorchEnergy {1e6 * t_t / n:.0f} "
        f"us/sample (float64, batch {n}, energy + forces; benchmarks/energy.py for more)"
    )
    terms = reference.energy_terms(x)
    print("terms       " + ", ".join(f"{k} {v.mean():.2f}" for k, v in terms.items()))
    return 0 if rel < 1e-5 and np.isfinite(e).all() else 1


def _short_md(s: object, n_frames: int, seed: int) -> object:
    """MD frames ``(n_frames, n_atoms, 3)`` nm: 100 fs apart after 1 ps of equilibration."""
    from boltzgen.sampling.md import run_md

    n_equil = 10  # frames dropped: 1 ps from the minimised structure
    result = run_md(s, (n_frames + n_equil) * 100, save_interval=100, seed=seed, progress=False)
    return result.positions[n_equil:]
