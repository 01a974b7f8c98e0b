"""``boltzgen md``: Langevin MD or replica exchange of a system (`boltzgen.sampling.md`).

The run is checkpointed (``--checkpoint``, by default ``<out>.checkpoint.npz``, which is removed
once the outputs of a finished run are written). SIGINT or SIGTERM stops it after the chunk in
progress with the checkpoint and the frames so far written; the same command resumes it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from boltzgen.errors import BoltzgenError

__all__ = ["register", "run"]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``md``: Langevin MD or replica exchange of a shipped or user system."""
    p = subparsers.add_parser(
        "md",
        help="run OpenMM Langevin MD (optionally replica exchange) of a system",
        description="Langevin MD of a system with OpenMM; writes <out>.dcd, <out>.pdb, <out>.npz.",
    )
    p.add_argument("system", help="system name (e.g. aldp) or directory with config.yaml")
    p.add_argument("--solvent", default="implicit", choices=["implicit", "vacuum"])
    p.add_argument("--temperature", type=float, default=None, help="K (default: the system's)")
    p.add_argument("--length-ns", type=float, required=True, help="length per replica, ns")
    p.add_argument("--timestep-fs", type=float, default=1.0, help="time step, fs (default 1)")
    p.add_argument("--friction", type=float, default=1.0, help="collision rate, 1/ps")
    p.add_argument("--save-interval-ps", type=float, default=0.1, help="ps between frames")
    p.add_argument(
        "--replica-temperatures",
        type=_floats,
        default=None,
        help="comma-separated ladder in K containing the sampled temperature (replica exchange)",
    )
    p.add_argument(
        "--bias-torsion",
        default=None,
        help="Hamiltonian replica exchange: four atom indices (e.g. 4,6,8,14 = ALDP phi) of a "
        "torsion that gets a well -H exp(kappa (cos(theta - center) - 1))",
    )
    p.add_argument("--bias-height", type=float, default=20.0, help="H, kJ/mol")
    p.add_argument("--bias-center-deg", type=float, default=30.0, help="center, degrees")
    p.add_argument("--bias-kappa", type=float, default=1.5, help="kappa (concentration)")
    p.add_argument(
        "--bias-scales",
        type=_floats,
        default=None,
        help="comma-separated bias scale of each replica, 0 (unbiased, kept) to 1",
    )
    p.add_argument("--exchange-interval-ps", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default="CPU")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint .npz, resumed if it exists (default: <out>.checkpoint.npz, kept only "
        "while the run is unfinished)",
    )
    p.add_argument("--checkpoint-interval-ps", type=float, default=100.0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output prefix")
    p.set_defaults(func=run)


def _steps(ps: float, timestep_ps: float, what: str) -> int:
    n = round(ps / timestep_ps)
    if n <= 0 or abs(n * timestep_ps - ps) > 1e-6 * max(ps, 1.0):
        raise BoltzgenError(f"{what} ({ps} ps) must be a positive multiple of the time step")
    return int(n)


def _check_args(args: argparse.Namespace) -> None:
    """Every option of ``boltzgen md`` that needs no system, before anything runs."""
    from pathlib import Path

    from boltzgen.sampling.md import platform_names

    if not args.timestep_fs > 0:
        raise BoltzgenError(f"--timestep-fs must be positive, got {args.timestep_fs}")
    if not args.friction >= 0:
        raise BoltzgenError(f"--friction must be >= 0 (1/ps), got {args.friction}")
    if args.temperature is not None and not args.temperature > 0:
        raise BoltzgenError(f"--temperature must be positive (K), got {args.temperature}")
    if args.threads < 1:
        raise BoltzgenError(f"--threads must be at least 1, got {args.threads}")
    if args.replica_temperatures is not None and not all(t > 0 for t in args.replica_temperatures):
        raise BoltzgenError(
            f"--replica-temperatures must be positive K, got {args.replica_temperatures}"
        )
    if args.bias_scales is not None and not all(0 <= b <= 1 for b in args.bias_scales):
        raise BoltzgenError(f"--bias-scales must lie in [0, 1], got {args.bias_scales}")
    if not args.bias_kappa >= 0:
        raise BoltzgenError(f"--bias-kappa must be >= 0, got {args.bias_kappa}")
    names = platform_names()
    if args.platform not in names:
        raise BoltzgenError(
            f"--platform {args.platform!r} is not available; OpenMM has {', '.join(names)}"
        )
    for option, path in (("--out", args.out), ("--checkpoint", args.checkpoint)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise BoltzgenError(f"{option}: folder {Path(path).absolute().parent} does not exist")


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen md``; returns the exit code (128 + signal number when stopped by SIGINT or
    SIGTERM, after writing the checkpoint and the frames so far)."""
    from boltzgen import systems
    from boltzgen.sampling import md

    _check_args(args)
    system = systems.load(args.system, solvent=args.solvent)
    if args.temperature is not None:
        system = system.with_temperature(args.temperature)
    dt = args.timestep_fs * 1e-3
    bias = None
    if args.bias_torsion is not None:
        atoms = tuple(int(a) for a in _floats(args.bias_torsion))
        if len(atoms) != 4 or not all(0 <= a < system.n_atoms for a in atoms):
            raise BoltzgenError(f"--bias-torsion needs 4 atom indices < {system.n_atoms}")
        bias = md.TorsionBias(
            atoms, args.bias_height, math.radians(args.bias_center_deg), args.bias_kappa
        )
    elif args.bias_scales is not None:
        raise BoltzgenError("--bias-scales needs --bias-torsion")
    n_steps = _steps(args.length_ns * 1000.0, dt, "--length-ns")
    save_interval = _steps(args.save_interval_ps, dt, "--save-interval-ps")
    exchange_interval = _steps(args.exchange_interval_ps, dt, "--exchange-interval-ps")
    checkpoint_interval = _steps(args.checkpoint_interval_ps, dt, "--checkpoint-interval-ps")
    ckpt = Path(args.checkpoint if args.checkpoint else args.out + ".checkpoint.npz")
    if ckpt.exists():
        print(f"resuming {ckpt}", flush=True)
    try:
        result = md.run_md(
            system,
            n_steps,
            save_interval=save_interval,
            timestep=dt,
            friction=args.friction,
            temperatures=args.replica_temperatures,
            bias=bias,
            bias_scales=args.bias_scales,
            exchange_interval=exchange_interval,
            seed=args.seed,
            platform=args.platform,
            threads=args.threads,
            checkpoint=ckpt,
            checkpoint_interval=checkpoint_interval,
            progress=not args.no_progress,
        )
    except md.MDInterrupted as stop:
        paths = md.write_outputs(system, stop.result, args.out)
        print(
            f"\n{stop}: checkpoint {ckpt} and the {stop.result.positions.shape[0]} frames so far "
            f"({', '.join(paths.values())}) written; run the same command again to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    paths = md.write_outputs(system, result, args.out)
    if args.checkpoint is None:
        ckpt.unlink()
    print(f"{result.positions.shape[0]} frames at {result.temperature} K; wrote")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    if len(result.temperatures) > 1:
        acc = ", ".join(f"{a:.3f}" for a in result.acceptance)
        print(f"exchange acceptance per neighbour pair: {acc}")
    return 0
