"""The ``boltzgen`` command line (also ``python -m boltzgen``).

Subcommands:
    systems    list the shipped molecular systems
    md         OpenMM Langevin MD / replica exchange of a system (trajectory + samples npz)
    reweight   ESS, k-hat, state populations and free-energy differences of a samples file
    evaluate   metrics against a reference (KL, ESS) and plots
    pipeline   the main job: train the quick config, sample, report ESS and basin populations
    train      train a Boltzmann generator from a YAML run config
    sample     draw weighted samples from a checkpoint (.npz, .pdb, .dcd)
    check-energy  short MD of a system; OpenMM vs torch-native energies and forces on it

Bad input ends with one ``boltzgen: error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from boltzgen.cli_pipeline import add_pipeline_parser
from boltzgen.cli_train import add_sample_parser, add_train_parser
from boltzgen.errors import BoltzgenError

__all__ = ["main"]


def _add_systems_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("systems", help="list the shipped molecular systems")
    p.set_defaults(func=_run_systems)


def _run_systems(args: argparse.Namespace) -> int:
    from boltzgen import systems

    for name in systems.available_systems():
        print(name)
    return 0


def _add_check_energy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
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
    p.set_defaults(func=_run_check_energy)


def _run_check_energy(args: argparse.Namespace) -> int:
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
    from boltzgen.md import run_md

    n_equil = 10  # frames dropped: 1 ps from the minimised structure
    result = run_md(s, (n_frames + n_equil) * 100, save_interval=100, seed=seed, progress=False)
    return result.positions[n_equil:]


def _add_result_parsers(sub: argparse._SubParsersAction) -> None:
    from boltzgen import cli_md, cli_results

    cli_md.add_md_parser(sub).set_defaults(func=cli_md.run_md)
    cli_results.add_reweight_parser(sub).set_defaults(func=cli_results.run_reweight)
    cli_results.add_evaluate_parser(sub).set_defaults(func=cli_results.run_evaluate)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_pipeline_parser,
    _add_check_energy_parser,
    _add_result_parsers,
    _add_systems_parser,
    add_train_parser,
    add_sample_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from boltzgen import __version__

    parser = argparse.ArgumentParser(
        prog="boltzgen",
        description="Boltzmann generators for molecules: learn, sample, reweight.",
    )
    parser.add_argument("--version", action="version", version=f"boltzgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``boltzgen`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BoltzgenError as exc:
        print(f"boltzgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("boltzgen: interrupted", file=sys.stderr)
        return 130
