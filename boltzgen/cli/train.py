"""``boltzgen train``: train a Boltzmann generator from a YAML run config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from boltzgen.cli._common import add_threads_argument, print_train_summary, set_threads
from boltzgen.errors import CheckpointError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen train CONFIG.yaml [--resume] [--device D] [--max-iter N]``."""
    p = subparsers.add_parser("train", help="train a Boltzmann generator from a YAML run config")
    p.add_argument("config", help="run config (e.g. systems/aldp/reverse_kl_quick.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--device", default=None, help="torch device (overrides train.device)")
    p.add_argument("--max-iter", type=int, default=None, help="overrides train.max_iter")
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen train``; returns the exit code (128 + signal number when stopped by
    SIGINT or SIGTERM, after writing the checkpoint)."""
    from boltzgen import pipeline
    from boltzgen.config import load_config
    from boltzgen.train import TrainingInterrupted

    threads = set_threads(args.threads)
    config = pipeline.with_overrides(
        load_config(args.config),
        device=args.device,
        max_iter=args.max_iter,
        progress=False if args.no_progress else None,
        output_dir=args.output_dir,
    )
    ckpt = Path(config.output_dir) / "checkpoint.pt"
    start = "from scratch"
    pipeline.check_device(config.train.device)
    if args.resume:
        from boltzgen.train import load_checkpoint

        if not ckpt.is_file():
            raise CheckpointError(
                f"--resume: there is no checkpoint {ckpt} to resume (drop --resume to start)"
            )
        start = f"resuming at iteration {load_checkpoint(ckpt)['iteration']}"
    print(
        f"training {args.config} -> {config.output_dir} ({start}, {config.train.max_iter} "
        f"iterations, {threads} torch CPU thread{'s' * (threads > 1)})",
        flush=True,
    )
    try:
        result = pipeline.train(config, resume=args.resume)
    except TrainingInterrupted as stop:
        print(
            f"\n{stop}: checkpoint {stop.checkpoint} written; continue with --resume",
            file=sys.stderr,
        )
        return stop.exit_code
    print_train_summary(result)
    return 0
