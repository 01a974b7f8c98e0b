"""``boltzgen export-model``: a model folder (stripped checkpoints + model card) from trained
checkpoints, e.g. the shipped ``systems/aldp/pretrained``."""

from __future__ import annotations

import argparse
from pathlib import Path

from boltzgen.cli._common import split_fraction
from boltzgen.errors import BoltzgenError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen export-model CHECKPOINT[:FRACTION] ... -o DIR [--quality Q.json]``."""
    p = subparsers.add_parser(
        "export-model",
        help="write a model folder (stripped checkpoints + model card) from trained runs",
        description="Strip trained checkpoints of their optimizer state and write them with a "
        "model card (model_card.json, MODEL_CARD.md) to a model folder: the form in which a "
        "system ships its pretrained model (systems/<name>/pretrained). Several checkpoints "
        "make a mixture proposal, each drawing its fraction of the samples.",
    )
    p.add_argument(
        "components",
        nargs="+",
        metavar="CHECKPOINT[:FRACTION]",
        help="trained checkpoints of one system; the first (the main flow) may omit its "
        "fraction and draws the rest",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="model folder (e.g. systems/aldp/"
        "pretrained); its earlier component files are replaced",
    )
    p.add_argument(
        "--quality",
        default=None,
        help="JSON of benchmarks/aldp_quality.py on the same checkpoints (one --mix per further "
        "component): the card's measured quality",
    )
    p.add_argument("--note", default=None, help="a sentence for the card")
    p.add_argument("--stand-in", action="store_true", help="mark the model as a stand-in")
    p.add_argument(
        "--commit",
        default=None,
        help="commit the runs were trained with (default: HEAD of this checkout)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        help="where they were trained, in words (default: what the checkpoints recorded)",
    )
    p.set_defaults(func=run)


def _components(texts: list[str]) -> list[tuple[str, float]]:
    """``CHECKPOINT[:FRACTION]`` arguments; the first without a fraction draws the rest."""
    out: list[tuple[str, float | None]] = []
    for k, text in enumerate(texts):
        path, value = split_fraction(text)
        if value is None and k == 0:
            out.append((text, None))
            continue
        if value is None or not path or not 0 < value <= 1:
            raise BoltzgenError(
                f"components take CHECKPOINT:FRACTION with 0 < FRACTION <= 1, got {text!r}"
            )
        out.append((path, value))
    rest = 1.0 - sum(f for _, f in out if f is not None)
    if out[0][1] is None:
        if not rest > 0:
            raise BoltzgenError(
                "the fractions of the other components leave no share for the first"
            )
        out[0] = (out[0][0], rest)
    for path, _ in out:
        if not Path(path).is_file():
            raise BoltzgenError(f"checkpoint {path} does not exist")
    return [(p, float(f)) for p, f in out]


def run(args: argparse.Namespace) -> int:
    """Write the model folder and print its card."""
    from boltzgen import models

    components = _components(args.components)
    if args.quality is not None and not Path(args.quality).is_file():
        raise BoltzgenError(f"--quality: file {args.quality} does not exist")
    folder = models.export_model(
        components,
        args.output,
        quality=args.quality,
        note=args.note,
        stand_in=args.stand_in,
        commit=args.commit,
        hardware=args.hardware,
    )
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(models.card_text(models.read_card(folder)), end="")
    print(f"\nwrote {folder} ({size / 1e6:.1f} MB)")
    return 0
