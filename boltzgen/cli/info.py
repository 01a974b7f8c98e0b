"""``boltzgen info``: the model card of a pretrained model, or what a checkpoint holds."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen info MODEL_OR_CHECKPOINT [--json]``."""
    p = subparsers.add_parser(
        "info",
        help="print the model card of a pretrained model, or what a checkpoint holds",
        description="Print the model card of a pretrained model (a system that ships one, "
        "e.g. aldp, or a model folder written by export-model), or for a checkpoint its format "
        "version, system, model, iterations, training wall time, target evaluations, hardware "
        "and boltzgen version.",
    )
    p.add_argument("model", help="system name (aldp), model folder, or checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print the card or checkpoint as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the card (``MODEL_CARD.md`` text) or the checkpoint summary."""
    from boltzgen import models
    from boltzgen.files import to_json_safe

    path = models.find_model(args.model)
    if path.is_dir():
        card = models.read_card(path)
        print(json.dumps(card, indent=2) if args.json else models.card_text(card), end="")
        if not args.json:
            print(f"\nmodel folder: {path}")
        return 0
    from boltzgen.train import load_checkpoint

    ckpt = load_checkpoint(path)
    if args.json:
        keep = {k: v for k, v in ckpt.items() if k in models.SUMMARY_KEYS}
        print(json.dumps(to_json_safe(keep), indent=2))
    else:
        print(models.checkpoint_text(path, ckpt), end="")
    return 0
