"""``boltzgen pipeline``: the main job, train -> sample -> reweight -> compare, in one command.

With the defaults it trains ``systems/<system>/reverse_kl_quick.yaml`` (minutes on a laptop
CPU), draws 10,000 samples (flow samples refined by annealed importance sampling toward the
Boltzmann density through 8 intermediate distributions), prints the effective sample size and
the fraction of samples in each state of the system's ``states.yaml`` (raw and reweighted,
with bootstrap errors) next to the shipped MD reference, and writes plots (without a shipped
reference, as for xylene and trpzip2, it says so and skips the comparison). Every shipped
system has a ``reverse_kl_quick.yaml`` and a ``states.yaml``. A finished
checkpoint in the output folder is reused and an unfinished one resumed, so an interrupted
pipeline continues where it stopped, in training or in sampling (``samples.partial.npz``).
Every step is a `boltzgen.pipeline` or `boltzgen.analysis.reports` call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from boltzgen.cli._common import add_threads_argument, print_train_summary, set_threads
from boltzgen.errors import BoltzgenError, ConfigError

if TYPE_CHECKING:
    from boltzgen.analysis import SampleSet
    from boltzgen.analysis.cvs import StatesFile

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen pipeline [SYSTEM] [--config C] [--max-iter N] [-n N] ...``."""
    p = subparsers.add_parser(
        "pipeline",
        help="the main job: train the quick config, sample, report ESS and basin populations",
        description="Train a Boltzmann generator from a run config (default: the system's "
        "reverse_kl_quick.yaml), sample from it, and report ESS, k-hat and the fraction of "
        "samples in each state (raw and reweighted), next to the MD reference if shipped.",
    )
    p.add_argument("system", nargs="?", default="aldp", help="shipped system (default aldp)")
    p.add_argument(
        "--config",
        default=None,
        help="run config (default: systems/<system>/reverse_kl_quick.yaml)",
    )
    p.add_argument("--max-iter", type=int, default=None, help="override train.max_iter")
    p.add_argument("-n", "--n-samples", type=int, default=10000, help="samples to draw")
    p.add_argument("--output-dir", default=None, help="default: the config's output_dir")
    p.add_argument("--device", default=None, help="torch device (default: the config's)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed")
    p.add_argument(
        "--ais",
        type=int,
        default=8,
        metavar="K",
        help="refine samples by AIS toward the Boltzmann density with K intermediate "
        "distributions (default 8; 0: plain flow samples)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the evaluation plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _basin_table(
    samples: SampleSet, report: dict[str, Any], states: StatesFile, system: str
) -> dict[str, Any]:
    """Print raw and reweighted state fractions (next to the MD reference, if the system ships
    one); return them."""
    from boltzgen.analysis.cvs import sample_cvs
    from boltzgen.analysis.reports import reference_populations

    cvs = sample_cvs(samples, states.cvs)
    ref = reference_populations(system)
    rows = {r["name"]: r for r in report.get("states", [])}  # none: reference state empty
    head = f"  {'state':<16} {'raw fraction':>12} {'reweighted':>20}"
    print(head + (f" {'MD reference':>20}" if ref else ""))
    basins = {}
    for st in states.states:
        raw = float(np.mean(st.contains(cvs)))
        r = rows.get(st.name, {"population": float("nan"), "population_error": float("nan")})
        pop, err = r["population"], r["population_error"]
        line = f"  {st.name:<16} {raw:>12.4f} {pop:>11.4f} +- {err:<6.4f}"
        if st.name in ref:
            line += f" {ref[st.name][0]:>11.4f} +- {ref[st.name][1]:<6.4f}"
        print(line)
        basins[st.name] = {
            "raw_fraction": raw,
            "population": pop,
            "population_error": err,
            "md_reference": ref.get(st.name),
        }
    outside = 1.0 - sum(b["raw_fraction"] for b in basins.values())
    if outside > 1e-9:
        print(f"  {'(no state)':<16} {outside:>12.4f}")
    return basins


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen pipeline``; returns the exit code."""
    from boltzgen import pipeline
    from boltzgen.analysis import load_samples
    from boltzgen.analysis.reports import (
        evaluate_samples,
        load_states,
        print_report,
        reweight_report,
    )
    from boltzgen.config import load_config
    from boltzgen.files import write_json
    from boltzgen.systems import system_dir
    from boltzgen.train import TrainingInterrupted, load_checkpoint

    if args.ais < 0:
        raise BoltzgenError(f"--ais must be >= 0, got {args.ais}")
    if args.n_samples < 10:
        raise BoltzgenError(f"-n must be at least 10, got {args.n_samples}")
    sdir = system_dir(args.system)
    config_path = Path(args.config) if args.config else sdir / "reverse_kl_quick.yaml"
    if not config_path.is_file():
        raise ConfigError(f"run config {config_path} does not exist (pass --config)")
    config = pipeline.with_overrides(
        load_config(config_path),
        device=args.device,
        max_iter=args.max_iter,
        progress=False if args.no_progress else None,
        output_dir=args.output_dir,
    )
    states = load_states(None, config.system.name)  # a bad states file stops before training
    threads = set_threads(args.threads)
    pipeline.check_device(config.train.device)
    out = Path(config.output_dir)
    max_iter = config.train.max_iter
    ckpt = out / "checkpoint.pt"
    t_start = time.perf_counter()

    # 1. train (or reuse / resume)
    if ckpt.is_file() and load_checkpoint(ckpt)["iteration"] >= max_iter:
        print(f"[1/3] reusing the trained checkpoint {ckpt} (delete it to train again)")
    else:
        resume = ckpt.is_file()
        verb = "resuming" if resume else "training"
        print(
            f"[1/3] {verb} {config_path} -> {out} ({max_iter} iterations, {threads} torch CPU "
            f"thread{'s' * (threads > 1)}; --threads N to change)",
            flush=True,
        )
        try:
            print_train_summary(pipeline.train(config, resume=resume))
        except TrainingInterrupted as stop:
            print(
                f"\n{stop}: checkpoint {stop.checkpoint} written; run the same command again "
                "to resume",
                file=sys.stderr,
            )
            return stop.exit_code

    # 2. sample
    samples_path = out / "samples.npz"
    how = f"flow + AIS with {args.ais} intermediate distributions" if args.ais else "flow"
    partial = out / "samples.partial.npz"
    resume = partial.is_file()
    verb = f"resuming {partial}:" if resume else "drawing"
    print(f"[2/3] {verb} {args.n_samples} samples ({how}) -> {samples_path}", flush=True)
    t0 = time.perf_counter()
    trained = pipeline.load_run(ckpt)
    try:
        drawn = pipeline.draw_samples(
            trained,
            args.n_samples,
            1000,
            ais=args.ais,
            device=args.device or "cpu",
            seed=args.seed,
            partial=partial,
            resume=resume,
            progress=not args.no_progress,
        )
    except pipeline.SamplingInterrupted as stop:
        print(
            f"\n{stop}: they are in {partial}; run the same command again to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    drawn.save(samples_path)
    partial.unlink(missing_ok=True)
    print(
        f"      {drawn.n} samples in {time.perf_counter() - t0:.1f} s; dropped non-finite "
        f"{drawn.n_nonfinite}, D-form {drawn.n_filtered}"
    )

    # 3. reweight and compare
    print("[3/3] reweighting", flush=True)
    samples = load_samples(samples_path)
    report = reweight_report(samples, states, n_bootstrap=200, seed=0)
    print_report(report)
    write_json(report, out / "reweight.json")
    summary: dict[str, Any] = {
        "config": str(config_path),
        "checkpoint": str(ckpt),
        "samples": str(samples_path),
        "reweight": str(out / "reweight.json"),
        "n_samples": samples.n,
        "ais_intermediate": args.ais,
        "ess_fraction": report["ess_fraction"],
        "khat": report["khat"],
    }
    if states.states:
        summary["states"] = _basin_table(samples, report, states, samples.system)
    ref_npz = sdir / "reference" / "reference.npz"
    if not ref_npz.is_file():
        print(
            f"  no MD reference shipped for {args.system} ({ref_npz} does not exist): "
            "comparison with a reference and its plots skipped"
        )
    elif not args.no_plots:
        eval_dir = out / "evaluation"
        log = out / "log.csv"
        metrics = evaluate_samples(
            samples,
            load_samples(ref_npz),
            states,
            eval_dir,
            n_bootstrap=50,
            seed=0,
            training_log=log if log.is_file() else None,
        )
        write_json(metrics, eval_dir / "metrics.json")
        if "ramachandran_kl_reweighted" in metrics:
            pair = ", ".join(metrics["ramachandran_cvs"])
            print(
                f"  Ramachandran KL(reference || samples) over ({pair}): raw "
                f"{metrics['ramachandran_kl_raw']:.4f}, reweighted "
                f"{metrics['ramachandran_kl_reweighted']:.4f} nats"
            )
        print(f"plots: {eval_dir}")
    summary["wall_s"] = time.perf_counter() - t_start
    write_json(summary, out / "pipeline.json")
    print(f"pipeline finished in {summary['wall_s']:.0f} s; summary: {out / 'pipeline.json'}")
    return 0
