"""Helpers shared by the subcommands: the ``--threads`` option and the training summary."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from boltzgen.errors import ConfigError

if TYPE_CHECKING:
    from boltzgen.pipeline import TrainResult

__all__ = ["add_threads_argument", "print_train_summary", "set_threads"]


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads (1 is fastest on a busy or 2-core machine)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; use 1 when other jobs share the CPU)",
    )


def set_threads(n: int | None) -> None:
    """Apply ``--threads`` (None: leave torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


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
