"""``boltzgen sample``: draw weighted samples from a trained checkpoint or a pretrained model.

Beside an ``.npz`` (or a ``.dcd`` / ``.xtc`` trajectory) it writes ``OUTPUT.topology.pdb`` (the
first sample: the topology viewers and mdtraj need), and beside a trajectory
``OUTPUT.weights.txt`` (one row per frame: log-weight, normalised weight, energy).

SIGINT or SIGTERM stops it after the batch in progress with the samples so far in
``OUTPUT.partial.npz`` (e.g. ``samples.partial.npz``); the same command with ``--resume``
continues from there and writes the output an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from boltzgen.cli._common import (
    add_nproc_argument,
    add_threads_argument,
    set_threads,
    split_fraction,
)
from boltzgen.errors import BoltzgenError

__all__ = ["register", "run"]

SUFFIXES = (".npz", ".pdb", ".dcd", ".xtc")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen sample CHECKPOINT -n N -o OUT [--batch-size B] [--ais K] [--resume]``."""
    p = subparsers.add_parser(
        "sample", help="draw weighted samples from a trained checkpoint or a pretrained model"
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint.pt written by boltzgen train, or a pretrained model: a model folder "
        "or the name of a system that ships one (aldp)",
    )
    p.add_argument("-n", "--n-samples", type=int, required=True, help="number of samples")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="samples.npz, or .pdb/.dcd/.xtc for viewers (with OUTPUT.topology.pdb and "
        "OUTPUT.weights.txt beside it)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument(
        "--ais",
        type=int,
        default=0,
        metavar="K",
        help="refine the flow's samples by annealed importance sampling toward the Boltzmann "
        "density with K intermediate distributions (HMC; from the mixture with --mix or a mixture "
        "model); log_weights are then AIS weights",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUTPUT.partial.npz (same checkpoint and options)",
    )
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="CHECKPOINT:FRACTION",
        help="also draw this share of the samples from another run of the system (e.g. a "
        "basin flow trained with a restraint) and weight all samples by the mixture's density "
        "(multiple importance sampling); repeatable; the main checkpoint draws the rest",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_nproc_argument(p, "sampling processes (one merged samples file)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def check_output(path: str | Path) -> Path:
    """A writable samples path with a known suffix, or `BoltzgenError`."""
    out = Path(path)
    if out.suffix.lower() not in SUFFIXES:
        raise BoltzgenError(f"output must end in .npz, .pdb, .dcd or .xtc, got {out.name!r}")
    if not out.parent.exists():
        raise BoltzgenError(f"output folder {out.parent} does not exist")
    return out


def partial_path(output: Path) -> Path:
    """The progress file of an interrupted run writing ``output``: ``OUTPUT.partial.npz``."""
    return output.with_suffix(".partial.npz")


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen sample``; returns the exit code (128 + signal number when stopped by SIGINT
    or SIGTERM, after writing the samples so far to ``OUTPUT.partial.npz``)."""
    from boltzgen import pipeline
    from boltzgen.analysis.reweighting import ess, ess_fraction
    from boltzgen.models import find_model
    from boltzgen.train import distributed

    if args.n_samples < 1 or args.batch_size < 1:
        raise BoltzgenError("-n and --batch-size must be positive")
    if args.ais < 0:
        raise BoltzgenError(f"--ais must be >= 0, got {args.ais}")
    out = check_output(args.output)
    partial = partial_path(out)
    if args.resume and not partial.is_file():
        raise BoltzgenError(f"--resume: {partial} does not exist (nothing to resume)")
    if not args.resume and partial.exists():
        raise BoltzgenError(f"{partial} exists (an interrupted run); pass --resume or delete it")
    mix = [_mix_component(text) for text in args.mix]
    if mix and (args.resume or args.nproc != 1):
        raise BoltzgenError("--mix draws its samples in one process: drop --resume and --nproc")
    threads = set_threads(args.threads)
    pipeline.check_device(args.device)
    if mix:
        return _mixture(args, mix, out, threads)
    if find_model(args.checkpoint).is_dir():  # a pretrained model
        return _model(args, out, partial, threads)
    if args.nproc != 1:
        return _launch(args, threads)
    run_ = pipeline.load_run(args.checkpoint)
    seed = run_.config.train.seed + 1 if args.seed is None else args.seed
    if distributed.launched():  # one rank of torch's launcher (--nproc or torchrun)
        return _rank(args, run_, seed, out, threads)
    try:
        samples = pipeline.draw_samples(
            run_,
            args.n_samples,
            args.batch_size,
            ais=args.ais,
            device=args.device,
            seed=seed,
            partial=partial,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except pipeline.SamplingInterrupted as stop:
        return _interrupted(stop, partial)
    written = samples.export(out, run_.system)
    partial.unlink(missing_ok=True)
    lw = samples.log_weights
    print(
        f"wrote {samples.n} samples to {_names(written)}; ESS {ess(lw):.1f} "
        f"({100 * ess_fraction(lw):.2f}%); "
        f"dropped non-finite {samples.n_nonfinite}, D-form {samples.n_filtered}; "
        f"{threads} torch CPU thread{'s' * (threads > 1)}"
    )
    return 0


def _mix_component(text: str) -> tuple[str, float]:
    """``CHECKPOINT:FRACTION`` of ``--mix``."""
    path, value = split_fraction(text)
    if value is None or not path or not 0 < value < 1:
        raise BoltzgenError(f"--mix takes CHECKPOINT:FRACTION with 0 < FRACTION < 1, got {text!r}")
    if not Path(path).is_file():
        raise BoltzgenError(f"--mix: checkpoint {path} does not exist")
    return path, value


def _mixture(args: argparse.Namespace, mix: list, out: Path, threads: int) -> int:
    """``sample --mix``: the main run and the extra runs as one mixture proposal."""
    from boltzgen import pipeline
    from boltzgen.analysis.reweighting import ess, ess_fraction
    from boltzgen.models import read_components

    rest = 1.0 - sum(f for _, f in mix)
    if not rest > 0:
        raise BoltzgenError("the --mix fractions must leave a share for the main checkpoint")
    paths = [args.checkpoint] + [p for p, _ in mix]
    read_components(paths)  # one system, checked before any run is built
    runs = [pipeline.load_run(p) for p in paths]
    seed = runs[0].config.train.seed + 1 if args.seed is None else args.seed
    fractions = [rest] + [f for _, f in mix]
    samples = pipeline.draw_mixture(
        runs,
        fractions,
        args.n_samples,
        args.batch_size,
        device=args.device,
        seed=seed,
        ais=args.ais,
    )
    written = samples.export(out, runs[0].system)
    lw = samples.log_weights
    shares = ", ".join(f"{f:g}" for f in fractions)
    print(
        f"wrote {samples.n} samples of a {len(runs)}-run mixture ({shares}) to "
        f"{_names(written)}; ESS "
        f"{ess(lw):.1f} ({100 * ess_fraction(lw):.2f}%); dropped non-finite "
        f"{samples.n_nonfinite}, D-form {samples.n_filtered}; {threads} torch CPU "
        f"thread{'s' * (threads > 1)}"
    )
    return 0


def _names(paths: list[Path]) -> str:
    """``a.npz`` or ``a.xtc (+ a.topology.pdb, a.weights.txt)``."""
    extra = f" (+ {', '.join(p.name for p in paths[1:])})" if len(paths) > 1 else ""
    return f"{paths[0]}{extra}"


def _interrupted(stop: Any, partial: Path) -> int:
    """Say where an interrupted draw's samples are (a plain mixture draw keeps none); its exit
    code."""
    saved = (
        "nothing saved; the same command draws them again"
        if stop.partial is None
        else f"they are in {partial}; continue with the same command and --resume"
    )
    print(f"\n{stop}: {saved}", file=sys.stderr)
    return stop.exit_code


def _model(args: argparse.Namespace, out: Path, partial: Path, threads: int) -> int:
    """``sample MODEL``: a pretrained model (a model folder or a system's shipped model)."""
    from boltzgen import models, pipeline
    from boltzgen.analysis.reweighting import ess, ess_fraction

    if args.nproc != 1:
        raise BoltzgenError("a pretrained model is sampled in one process: drop --nproc")
    model = models.load_model(args.checkpoint)
    if args.resume and len(model.runs) > 1 and not args.ais:  # models.draw keeps no file
        raise BoltzgenError(
            f"--resume: {model.path} is a mixture, whose plain draw keeps no progress file "
            "(with --ais it does): drop --resume"
        )
    seed = 1 if args.seed is None else args.seed
    try:
        samples = models.draw(
            model,
            args.n_samples,
            args.batch_size,
            ais=args.ais,
            device=args.device,
            seed=seed,
            partial=partial,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except pipeline.SamplingInterrupted as stop:
        return _interrupted(stop, partial)
    written = samples.export(out, model.runs[0].system)
    partial.unlink(missing_ok=True)
    lw = samples.log_weights
    print(
        f"wrote {samples.n} samples of {model.path} to {_names(written)}; ESS {ess(lw):.1f} "
        f"({100 * ess_fraction(lw):.2f}%); dropped non-finite {samples.n_nonfinite}, D-form "
        f"{samples.n_filtered}; {threads} torch CPU thread{'s' * (threads > 1)}"
    )
    return 0


def _launch(args: argparse.Namespace, threads: int) -> int:
    """Run ``boltzgen sample`` in ``--nproc`` processes with torch's launcher."""
    from boltzgen.train import load_checkpoint
    from boltzgen.train.distributed import launch

    if args.nproc < 1:
        raise BoltzgenError(f"--nproc must be at least 1, got {args.nproc}")
    if args.resume:
        raise BoltzgenError("--resume continues one-process runs only; drop --nproc")
    if args.n_samples < args.nproc:
        raise BoltzgenError(f"-n {args.n_samples} is fewer than one sample per process")
    load_checkpoint(args.checkpoint)  # a bad checkpoint fails here, once
    argv = [
        "sample",
        args.checkpoint,
        "-n",
        args.n_samples,
        "-o",
        args.output,
        "--batch-size",
        args.batch_size,
        "--device",
        args.device,
        "--ais",
        args.ais,
        "--threads",
        threads,
    ]
    argv += ["--seed", args.seed] if args.seed is not None else []
    launch(argv, args.nproc)
    return 0


def _rank(args: argparse.Namespace, run_: Any, seed: int, out: Path, threads: int) -> int:
    """Draw this rank's pieces (`boltzgen.pipeline.draw_samples_sharded`); rank 0 writes."""
    from boltzgen import pipeline
    from boltzgen.analysis.reweighting import ess, ess_fraction
    from boltzgen.train import distributed

    with distributed.process_group(args.device) as device:
        samples = pipeline.draw_samples_sharded(
            run_,
            args.n_samples,
            seed,
            batch_size=args.batch_size,
            ais=args.ais,
            device=device,
            progress=False,
        )
    if samples is None:  # rank 0 writes the merged file
        return 0
    written = samples.export(out, run_.system)
    lw = samples.log_weights
    world = distributed.launched()
    print(
        f"wrote {samples.n} samples to {_names(written)}; ESS {ess(lw):.1f} "
        f"({100 * ess_fraction(lw):.2f}%); "
        f"dropped non-finite {samples.n_nonfinite}, D-form {samples.n_filtered}; "
        f"{world} processes x {threads} torch CPU thread{'s' * (threads > 1)}"
    )
    return 0
