"""``boltzgen train``: train a Boltzmann generator from a YAML run config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from boltzgen.cli._common import (
    add_nproc_argument,
    add_threads_argument,
    print_train_summary,
    set_threads,
)
from boltzgen.errors import BoltzgenError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from boltzgen.config import RunConfig

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
    add_nproc_argument(p, "data-parallel training processes")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen train``; returns the exit code (128 + signal number when stopped by
    SIGINT or SIGTERM, after writing the checkpoint)."""
    from boltzgen import pipeline
    from boltzgen.config import load_config
    from boltzgen.train import distributed

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    threads = set_threads(args.threads)
    config = pipeline.with_overrides(
        load_config(args.config),
        device=args.device,
        max_iter=args.max_iter,
        progress=False if args.no_progress else None,
        output_dir=args.output_dir,
    )
    ckpt = Path(config.output_dir) / "checkpoint.pt"
    start = (
        "from scratch" if config.init_from is None else f"from the weights of {config.init_from}"
    )
    pipeline.check_device(config.train.device)
    if args.resume:
        from boltzgen.train import load_checkpoint

        if not ckpt.is_file():
            raise CheckpointError(
                f"--resume: there is no checkpoint {ckpt} to resume (drop --resume to start)"
            )
        start = f"resuming at iteration {load_checkpoint(ckpt)['iteration']}"
    if args.nproc > 1:
        return _launch(args, config, start, threads)
    with distributed.process_group(config.train.device) as device:
        return _train(args, pipeline.with_overrides(config, device=device), start, threads)


def _train(args: argparse.Namespace, config: RunConfig, start: str, threads: int) -> int:
    """Train in this process (one rank of a data-parallel run under torchrun)."""
    from boltzgen import pipeline
    from boltzgen.train import TrainingInterrupted
    from boltzgen.train.distributed import rank_and_world

    rank, world = rank_and_world()
    procs = f" x {world} processes" if world > 1 else ""
    if rank == 0:
        splines = ""
        if config.train.device == "cpu":
            from boltzgen import native

            splines = ", " + native.status()
        print(
            f"training {args.config} -> {config.output_dir} ({start}, {config.train.max_iter} "
            f"iterations, {threads} torch CPU thread{'s' * (threads > 1)}{procs}{splines})",
            flush=True,
        )
    try:
        result = pipeline.train(config, resume=args.resume)
    except TrainingInterrupted as stop:
        if rank == 0:
            print(
                f"\n{stop}: checkpoint {stop.checkpoint} written; continue with --resume",
                file=sys.stderr,
            )
        return stop.exit_code
    if rank == 0:
        print_train_summary(result)
    return 0


def _launch(args: argparse.Namespace, config: RunConfig, start: str, threads: int) -> int:
    """Run ``boltzgen train`` in ``--nproc`` processes with torch's launcher."""
    from boltzgen.train.distributed import check_world, launch

    check_world(config.train.batch_size, config.train.shards, args.nproc)
    ckpt = Path(config.output_dir) / "checkpoint.pt"
    if not args.resume and ckpt.exists():
        raise BoltzgenError(
            f"{ckpt} exists; pass --resume to continue it or choose another --output-dir"
        )
    argv = ["train", args.config, "--threads", threads]
    for flag, value in (("--device", args.device), ("--max-iter", args.max_iter),
                        ("--output-dir", args.output_dir)):  # fmt: skip
        argv += [flag, value] if value is not None else []
    argv += ["--resume"] * args.resume + ["--no-progress"] * args.no_progress
    print(f"launching {args.nproc} training processes ({start})", flush=True)
    launch(argv, args.nproc)
    return 0
