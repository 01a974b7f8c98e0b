"""``boltzgen reweight``: ESS, k-hat, state populations and free energies of a samples file."""

from __future__ import annotations

import argparse
from pathlib import Path

from boltzgen.analysis import load_samples
from boltzgen.analysis.reports import load_states, print_report, reweight_report
from boltzgen.cli._common import check_analysis_args
from boltzgen.files import write_json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``reweight``: ESS, k-hat, state populations and free energies of samples."""
    p = subparsers.add_parser(
        "reweight",
        help="importance-reweight samples: ESS, k-hat, state free energies with errors",
        description="Reweight samples to the Boltzmann distribution and report free energies.",
    )
    p.add_argument("samples", help="samples .npz")
    p.add_argument(
        "--states", default=None, help="states YAML (default: systems/<system>/states.yaml)"
    )
    p.add_argument(
        "--cv",
        default=None,
        help="one or two CVs (comma-separated) of the free-energy surface written to JSON: "
        "backbone torsions (phi, psi; phi_<n>, psi_<n> by residue number for longer peptides) "
        "or CVs of the states file (default: phi,psi where the molecule has them, else the "
        "states file's first two; '' for none)",
    )
    p.add_argument("--bins", type=int, default=60)
    p.add_argument("--n-bootstrap", type=int, default=200)
    p.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="bootstrap block in samples (default 1; n/20 for MD trajectories)",
    )
    p.add_argument(
        "--target-temperature",
        type=float,
        default=None,
        help="also reweight to this temperature (K) and report f(T2) - f(T)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default <samples>.reweight.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen reweight``."""
    check_analysis_args(args)
    samples = load_samples(args.samples)
    states = load_states(args.states, samples.system)
    report = reweight_report(
        samples,
        states,
        cv=args.cv,
        bins=args.bins,
        n_bootstrap=args.n_bootstrap,
        block_length=args.block_length,
        target_temperature=args.target_temperature,
        seed=args.seed,
    )
    print_report(report)
    out = args.out or str(Path(args.samples).with_suffix("")) + ".reweight.json"
    write_json(report, out)
    print(f"wrote {out}")
    return 0
