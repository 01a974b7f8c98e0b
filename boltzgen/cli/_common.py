"""Helpers shared by the subcommands: the ``--threads`` option and the training summary."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from boltzgen.errors import ConfigError

if TYPE_CHECKING:
    from boltzgen.pipeline import TrainResult

__all__ = ["DEFAULT_THREADS", "add_threads_argument", "print_train_summary", "set_threads"]


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


def set_threads(n: int | None) -> int:
    """Apply ``--threads`` (None: `DEFAULT_THREADS`); returns the count, which the commands
    print with their first line of progress."""
    if n is not None and n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch

    chosen = DEFAULT_THREADS if n is None else n
    torch.set_num_threads(chosen)
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
