"""``boltzgen pipeline``: the main job, train -> sample -> reweight -> compare, in one command.

With the defaults it trains ``systems/<system>/reverse_kl_quick.yaml`` (minutes on a laptop
CPU), draws 10,000 samples (flow samples refined by annealed importance sampling toward the
Boltzmann density through 8 intermediate distributions), prints the effective sample size and
the fraction of samples in each state of ``systems/<system>/states.yaml`` (raw and reweighted,
with bootstrap errors) next to the shipped MD reference, and writes plots. A finished
checkpoint in the output folder is reused and an unfinished one resumed, so an interrupted
pipeline continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.cli_train import add_threads_argument
from boltzgen.errors import BoltzgenError

__all__ = ["add_pipeline_parser", "run_pipeline"]


def add_pipeline_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``boltzgen pipeline [SYSTEM] [--config C] [--max-iter N] [-n N] ...``."""
    p = sub.add_parser(
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
    p.set_defaults(func=run_pipeline)


def _reference_populations(directory: Path) -> dict[str, tuple[float, float]]:
    """State populations ``{name: (p, error)}`` of the shipped MD reference (empty if none)."""
    path = directory / "reference" / "summary.json"
    if not path.is_file():
        return {}
    try:
        states = json.loads(path.read_text())["whole"]["states"]
        return {k: (v["population"], v["population_error"]) for k, v in states.items()}
    except (OSError, KeyError, ValueError):
        return {}


def run_pipeline(args: argparse.Namespace) -> int:
    """Run ``boltzgen pipeline``; returns the exit code."""
    from boltzgen.analysis import load_samples
    from boltzgen.cli_results import _cvs, _load_states, print_report, reweight_report
    from boltzgen.cli_train import run_sample, run_train
    from boltzgen.config import load_config
    from boltzgen.train import load_checkpoint

    if args.ais < 0:
        raise BoltzgenError(f"--ais must be >= 0, got {args.ais}")
    if args.n_samples < 10:
        raise BoltzgenError(f"-n must be at least 10, got {args.n_samples}")
    from boltzgen.systems import system_dir

    sdir = system_dir(args.system)
    config_path = Path(args.config) if args.config else sdir / "reverse_kl_quick.yaml"
    if not config_path.is_file():
        raise BoltzgenError(f"run config {config_path} does not exist (pass --config)")
    config = load_config(config_path)
    out = Path(args.output_dir or config.output_dir)
    max_iter = args.max_iter if args.max_iter is not None else config.train.max_iter
    ckpt = out / "checkpoint.pt"
    t_start = time.perf_counter()

    # 1. train (or reuse / resume)
    done = ckpt.is_file() and load_checkpoint(ckpt)["iteration"] >= max_iter
    if done:
        print(f"[1/3] reusing the trained checkpoint {ckpt} (delete it to train again)")
    else:
        resume = ckpt.is_file()
        verb = "resuming" if resume else "training"
        print(f"[1/3] {verb} {config_path} -> {out} ({max_iter} iterations)", flush=True)
        train_args = argparse.Namespace(
            config=str(config_path),
            resume=resume,
            device=args.device,
            max_iter=max_iter,
            output_dir=str(out),
            no_progress=args.no_progress,
            threads=args.threads,
        )
        code = run_train(train_args)
        if code != 0:
            return code

    # 2. sample
    samples_path = out / "samples.npz"
    how = f"flow + AIS with {args.ais} intermediate distributions" if args.ais else "flow"
    print(f"[2/3] drawing {args.n_samples} samples ({how}) -> {samples_path}", flush=True)
    t0 = time.perf_counter()
    sample_args = argparse.Namespace(
        checkpoint=str(ckpt),
        n_samples=args.n_samples,
        output=str(samples_path),
        batch_size=1000,
        device=args.device or "cpu",
        seed=args.seed,
        threads=args.threads,
        ais=args.ais,
    )
    run_sample(sample_args)
    print(f"      sampled in {time.perf_counter() - t0:.1f} s")

    # 3. reweight and compare
    print("[3/3] reweighting", flush=True)
    samples = load_samples(samples_path)
    states = _load_states(None, samples.system)
    report = reweight_report(samples, states, n_bootstrap=200, seed=0)
    print_report(report)
    summary: dict[str, Any] = {
        "config": str(config_path),
        "checkpoint": str(ckpt),
        "samples": str(samples_path),
        "n_samples": samples.n,
        "ais_intermediate": args.ais,
        "ess_fraction": report["ess_fraction"],
        "khat": report["khat"],
    }
    if states:
        cvs = _cvs(samples)
        ref = _reference_populations(sdir)
        rows = {r["name"]: r for r in report["states"]}
        print(f"  {'state':<16} {'raw fraction':>12} {'reweighted':>20} {'MD reference':>20}")
        basins = {}
        for st in states:
            raw = float(np.mean(st.contains(cvs)))
            r = rows[st.name]
            pop, err = r["population"], r["population_error"]
            line = f"  {st.name:<16} {raw:>12.4f} {pop:>11.4f} +- {err:<6.4f}"
            if st.name in ref:
                line += f" {ref[st.name][0]:>11.4f} +- {ref[st.name][1]:<6.4f}"
            print(line)
            basins[st.name] = {
                "raw_fraction": raw,
                "population": r["population"],
                "population_error": r["population_error"],
                "md_reference": ref.get(st.name),
            }
        summary["states"] = basins
        outside = 1.0 - sum(b["raw_fraction"] for b in basins.values())
        if outside > 1e-9:
            print(f"  {'(no state)':<16} {outside:>12.4f}")
    if not args.no_plots:
        ref_npz = sdir / "reference" / "reference.npz"
        if ref_npz.is_file():
            from boltzgen.cli_results import run_evaluate

            eval_args = argparse.Namespace(
                samples=str(samples_path),
                reference=str(ref_npz),
                states=None,
                bins=60,
                n_bootstrap=50,
                block_length=None,
                training_log=str(out / "log.csv") if (out / "log.csv").is_file() else None,
                no_plots=False,
                seed=0,
                out_dir=str(out / "evaluation"),
            )
            run_evaluate(eval_args)
            print(f"plots: {out / 'evaluation'}")
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"pipeline finished in {summary['wall_s']:.0f} s; summary: {out / 'pipeline.json'}")
    return 0
