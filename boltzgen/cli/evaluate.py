"""``boltzgen evaluate``: metrics (KL, ESS, free energies) and plots against a reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from boltzgen.analysis import load_samples
from boltzgen.analysis.reports import evaluate_samples, load_states, reference_path
from boltzgen.cli._common import check_analysis_args
from boltzgen.files import write_json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``evaluate``: metrics and plots of samples against a reference."""
    p = subparsers.add_parser(
        "evaluate",
        help="compare (reweighted) samples with an MD reference: KL, ESS, free energies, plots",
        description="Metrics JSON and plots of samples against a reference samples file.",
    )
    p.add_argument("samples", help="samples .npz")
    p.add_argument(
        "--reference",
        required=True,
        help="reference .npz, or a directory holding reference.npz (e.g. systems/aldp/reference)",
    )
    p.add_argument(
        "--states", default=None, help="states YAML (default: systems/<system>/states.yaml)"
    )
    p.add_argument("--bins", type=int, default=60, help="Ramachandran bins per angle")
    p.add_argument("--n-bootstrap", type=int, default=100)
    p.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="bootstrap block of the samples (default 1; n/20 for MD)",
    )
    p.add_argument("--training-log", default=None, help="CSV training log to plot as well")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default <samples>_eval/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen evaluate``."""
    check_analysis_args(args)
    samples = load_samples(args.samples)
    reference = load_samples(reference_path(args.reference))
    states = load_states(args.states, samples.system)
    out_dir = Path(args.out_dir or str(Path(args.samples).with_suffix("")) + "_eval")
    metrics = evaluate_samples(
        samples,
        reference,
        states,
        None if args.no_plots else out_dir,
        bins=args.bins,
        n_bootstrap=args.n_bootstrap,
        block_length=args.block_length,
        seed=args.seed,
        training_log=args.training_log,
    )
    write_json(metrics, out_dir / "metrics.json")
    print(f"ESS {100 * metrics['ess_fraction']:.1f} %, k-hat {metrics['khat']:.2f}")
    if "ramachandran_kl_reweighted" in metrics:
        pair = ", ".join(metrics["ramachandran_cvs"])
        print(
            f"Ramachandran KL(reference || samples) over ({pair}): raw "
            f"{metrics['ramachandran_kl_raw']:.4f}, reweighted "
            f"{metrics['ramachandran_kl_reweighted']:.4f} nats"
        )
    if "torsion_marginal_kl" in metrics:
        t = metrics["torsion_marginal_kl"]
        print(f"torsion marginal KLs: mean {t['mean']:.4f}, max {t['max']:.4f} nats")
    for row in metrics.get("states", []):
        print(
            f"  {row['name']:<16} dF sample {row['sample']['dF_kJ_per_mol']:7.2f} +- "
            f"{row['sample']['dF_kJ_per_mol_error']:.2f}, reference "
            f"{row['reference']['dF_kJ_per_mol']:7.2f} +- "
            f"{row['reference']['dF_kJ_per_mol_error']:.2f} kJ/mol"
        )
    print(f"wrote {out_dir / 'metrics.json'}")
    return 0
