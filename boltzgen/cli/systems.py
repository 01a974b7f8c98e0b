"""``boltzgen systems``: list the shipped (and user) molecular systems."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen systems``."""
    p = subparsers.add_parser("systems", help="list the shipped molecular systems")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one system name a line."""
    from boltzgen import systems

    for name in systems.available_systems():
        print(name)
    return 0
