"""The ``boltzgen`` command line (also ``python -m boltzgen``).

Subcommands:
    systems    list the shipped molecular systems
    md         OpenMM Langevin MD / replica exchange of a system (trajectory + samples npz)
    reweight   ESS, k-hat, state populations and free-energy differences of a samples file
    evaluate   metrics against a reference (KL, ESS) and plots
    pipeline   the main job: train the quick config, sample, report ESS and basin populations
    train      train a Boltzmann generator from a YAML run config
    sample     draw weighted samples from a checkpoint or model (.npz, .pdb, .dcd, .xtc)
    info       the model card of a pretrained model, or what a checkpoint holds
    export-model  a model folder (stripped checkpoints + model card) from trained runs
    check-energy  short MD of a system; OpenMM vs torch-native energies and forces on it

Bad input ends with one ``boltzgen: error: ...`` line and exit code 2, never a traceback. SIGINT
(Ctrl-C) or SIGTERM stops train, md, sample and pipeline after the step in progress, with their
state saved, one line saying how to resume, and exit code 128 + the signal (130, 143).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from boltzgen.errors import BoltzgenError
from boltzgen.interrupts import Interrupted

__all__ = ["SUBCOMMANDS", "ArgumentParser", "build_parser", "main"]

#: Subcommand modules of `boltzgen.cli`, in ``--help`` order. Each defines
#: ``register(subparsers)`` (adds its parser, ``set_defaults(func=run)``) and ``run(args)``.
SUBCOMMANDS = (
    "pipeline",
    "check_energy",
    "md",
    "reweight",
    "evaluate",
    "systems",
    "train",
    "sample",
    "info",
    "export_model",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one ``boltzgen: error:`` line (exit 2) that
    names the subcommand and points to its ``--help``, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit with code 2."""
        where = self.prog.removeprefix("boltzgen").strip()
        prefix = f"{where}: " if where else ""
        self.exit(2, f"boltzgen: error: {prefix}{message} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """``message`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from boltzgen import __version__

    parser = ArgumentParser(
        prog="boltzgen",
        description="Boltzmann generators for molecules: learn, sample, reweight.",
    )
    parser.add_argument("--version", action="version", version=f"boltzgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"boltzgen.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``boltzgen`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BoltzgenError as exc:
        print(f"boltzgen: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # one the subcommand did not word itself
        print(f"\nboltzgen: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("boltzgen: interrupted", file=sys.stderr)
        return 130
