"""Helpers shared by the subcommands: the ``--threads`` option and the training summary."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from boltzgen.errors import ConfigError

if TYPE_CHECKING:
    from boltzgen.pipeline import TrainResult

__all__ = [
    "DEFAULT_THREADS",
    "add_nproc_argument",
    "add_threads_argument",
    "check_analysis_args",
    "print_train_summary",
    "set_threads",
]


#: torch CPU threads when ``--threads`` is not given. One thread trains the quick ALDP config as
#: fast as two on a quiet 2-core CPU and keeps 97 % of its speed when another CPU-bound process
#: runs; two threads dropped to 39 % (see the README, "More than one core").
DEFAULT_THREADS = 1


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads (default `DEFAULT_THREADS`)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: robust when other jobs share the "
        "cores; more can pay for large flows and batches on an otherwise idle machine)",
    )


def add_nproc_argument(p: argparse.ArgumentParser, what: str) -> None:
    """``--nproc N``: start N processes on this machine with torch's launcher (default 1)."""
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help=f"{what} on this machine, started with torch's launcher (default 1; each runs "
        "--threads threads; for several machines run torchrun, see the README)",
    )


def set_threads(n: int | None) -> int:
    """Apply ``--threads`` (None: `DEFAULT_THREADS`) and `boltzgen.machine.keep_freed_memory`;
    returns the thread count, which the commands print with their first line of progress."""
    if n is not None and n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch

    from boltzgen.machine import keep_freed_memory

    chosen = DEFAULT_THREADS if n is None else n
    torch.set_num_threads(chosen)
    keep_freed_memory()  # the commands that call this train or sample: see its docstring
    return chosen


def print_train_summary(result: TrainResult) -> None:
    """One paragraph on a finished `boltzgen.pipeline.train` call (a `TrainResult`)."""
    c = result.counters
    ess = result.last.get("ess_fraction", float("nan"))
    print(
        f"trained {result.iterations} iterations in {result.wall_s:.1f} s; last batch ESS "
        f"{100 * ess:.2f}%; target evaluations {c['target_evals']}; dropped non-finite "
        f"{c['nonfinite']}, D-form {c['filtered']}; skipped steps {c['skipped_steps']}\n"
        f"checkpoint: {result.checkpoint}\nlog: {result.log}"
    )
    if "compile_s" in result.last:
        print(f"torch.compile: the first step, compiling, took {result.last['compile_s']:.1f} s")


def check_analysis_args(args: argparse.Namespace) -> None:
    """The numeric and path options of ``reweight`` / ``evaluate``, before any work."""
    from pathlib import Path

    from boltzgen.errors import BoltzgenError

    if args.bins < 2:
        raise BoltzgenError(f"--bins must be at least 2, got {args.bins}")
    if args.n_bootstrap < 2:
        raise BoltzgenError(f"--n-bootstrap must be at least 2, got {args.n_bootstrap}")
    if args.block_length is not None and args.block_length < 1:
        raise BoltzgenError(f"--block-length must be at least 1, got {args.block_length}")
    target = getattr(args, "target_temperature", None)
    if target is not None and not target > 0:
        raise BoltzgenError(f"--target-temperature must be positive (K), got {target}")
    for option in ("states", "training_log"):
        path = getattr(args, option, None)
        if path is not None and not Path(path).is_file():
            flag = "--" + option.replace("_", "-")
            raise BoltzgenError(f"{flag}: file {path} does not exist")
    for option in ("out", "out_dir"):
        path = getattr(args, option, None)
        if path is not None and not Path(path).absolute().parent.is_dir():
            flag = "--" + option.replace("_", "-")
            raise BoltzgenError(f"{flag}: folder {Path(path).absolute().parent} does not exist")


def split_fraction(text: str) -> tuple[str, float | None]:
    """``CHECKPOINT:FRACTION`` -> ``(CHECKPOINT, FRACTION)``; the fraction is None without a
    ``:`` and NaN if it is not a number (the caller checks the range and the path)."""
    path, sep, fraction = text.rpartition(":")
    if not sep:
        return text, None
    try:
        return path, float(fraction)
    except ValueError:
        return path, float("nan")
