"""``boltzgen pipeline``: the main job, sample -> reweight -> compare, in one command.

For a system that ships a pretrained model (``systems/<system>/pretrained``, e.g. ``aldp``) it
loads that model (no training), draws 100,000 samples (plain flow samples of its mixture
proposal: exact importance weights), prints the effective sample size, k-hat and the fraction
of samples in each state of the system's ``states.yaml`` (raw and reweighted, with bootstrap
errors) next to the shipped MD reference, and writes plots, metrics JSON and the samples
(``samples.npz`` and ``samples.topology.pdb``; ``--trajectory dcd|xtc`` adds a trajectory and
its ``samples.weights.txt``) to ``runs/<system>_pretrained``. ``--model`` samples another
model folder or checkpoint instead.

With ``--train`` it trains from scratch instead. A system with a recipe
(``systems/<system>/recipe.yaml``; aldp: three flows as in the shipped model and two for cis
amides, sized for 20 min) trains it (`boltzgen.recipes`: components side by side in processes
of their own), exports the result as a model folder ``OUTPUT/model`` and samples it as above;
``--recipe FILE`` trains another recipe. Otherwise, and with ``--config`` or ``--max-iter`` (the
only way for systems that ship no model, such as xylene and trpzip2), it trains one run config
(default ``systems/<system>/reverse_kl_quick.yaml``), then draws 10,000 samples refined by annealed
importance sampling through 8 intermediate distributions, and reports the same. Without a
shipped reference it says so and skips the comparison. A finished
checkpoint in the output folder is reused and an unfinished one resumed, so an interrupted
pipeline continues where it stopped, in training or in sampling (``samples.partial.npz``).
Every step is a `boltzgen.pipeline`, `boltzgen.models` or `boltzgen.analysis.reports` call.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from boltzgen.cli._common import add_threads_argument, print_train_summary, set_threads
from boltzgen.errors import BoltzgenError, ConfigError

if TYPE_CHECKING:
    from boltzgen.analysis import SampleSet
    from boltzgen.analysis.cvs import StatesFile

__all__ = ["register", "run"]

#: Defaults of the two paths: (samples, AIS intermediate distributions, batch size). A
#: pretrained model draws in batches of 5000 with seed 1, as benchmarks/aldp_quality.py does
#: for its model card: the pipeline's samples are then the card's, bit for bit.
PRETRAINED_DEFAULTS = (100_000, 0, 5000)
TRAINED_DEFAULTS = (10_000, 8, 1000)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``boltzgen pipeline [SYSTEM] [--train] [--config C] [--model M] [-n N] ...``."""
    p = subparsers.add_parser(
        "pipeline",
        help="the main job: sample the shipped model (or train the quick config), report ESS "
        "and basin populations",
        description="Sample the system's shipped pretrained model (or, with --train, train a "
        "Boltzmann generator from a run config, default reverse_kl_quick.yaml), reweight, and "
        "report ESS, k-hat and the fraction of samples in each state (raw and reweighted), "
        "next to the MD reference if shipped; write plots, metrics JSON and the samples.",
    )
    p.add_argument("system", nargs="?", default="aldp", help="shipped system (default aldp)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train from scratch instead of using the shipped model: the system's recipe "
        "(systems/<system>/recipe.yaml; aldp: three flows as in the shipped model plus two for "
        "cis amides) if it has one, else systems/<system>/reverse_kl_quick.yaml; systems "
        "without a model always train",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="train this recipe file (implies --train; see boltzgen.recipes)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="train this run config (implies --train; default: systems/<system>/"
        "reverse_kl_quick.yaml)",
    )
    p.add_argument(
        "--max-iter", type=int, default=None, help="override train.max_iter (implies --train)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="sample this model folder or checkpoint instead of the shipped model",
    )
    p.add_argument(
        "-n",
        "--n-samples",
        type=int,
        default=None,
        help=f"samples to draw (default {PRETRAINED_DEFAULTS[0]} from a pretrained model, "
        f"{TRAINED_DEFAULTS[0]} after training)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="default: runs/<system>_pretrained for a pretrained model, the config's "
        "output_dir when training",
    )
    p.add_argument("--device", default=None, help="torch device (default: the config's, cpu)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed")
    p.add_argument(
        "--ais",
        type=int,
        default=None,
        metavar="K",
        help="refine samples by AIS toward the Boltzmann density with K intermediate "
        f"distributions (default {TRAINED_DEFAULTS[1]} after training, "
        f"{PRETRAINED_DEFAULTS[1]} for a pretrained model; a mixture model's AIS starts from "
        "its mixture)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"samples per batch (default {PRETRAINED_DEFAULTS[2]} from a pretrained model, "
        f"{TRAINED_DEFAULTS[2]} after training); the samples depend on it",
    )
    p.add_argument(
        "--trajectory",
        choices=["dcd", "xtc"],
        default=None,
        help="also write the samples as a trajectory (samples.dcd or .xtc, with "
        "samples.topology.pdb and samples.weights.txt: log-weight, weight, energy per frame)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the evaluation plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _basin_table(
    samples: SampleSet, report: dict[str, Any], states: StatesFile, system: str
) -> dict[str, Any]:
    """Print raw and reweighted state fractions (next to the MD reference, if the system ships
    one); return them."""
    from boltzgen.analysis.cvs import sample_cvs
    from boltzgen.analysis.reports import reference_populations

    cvs = sample_cvs(samples, states.cvs)
    ref = reference_populations(system)
    rows = {r["name"]: r for r in report.get("states", [])}  # none: reference state empty
    head = f"  {'state':<16} {'raw fraction':>12} {'reweighted':>20}"
    print(head + (f" {'MD reference':>20}" if ref else ""))
    basins = {}
    for st in states.states:
        raw = float(np.mean(st.contains(cvs)))
        r = rows.get(st.name, {"population": float("nan"), "population_error": float("nan")})
        pop, err = r["population"], r["population_error"]
        line = f"  {st.name:<16} {raw:>12.4f} {pop:>11.4f} +- {err:<6.4f}"
        if st.name in ref:
            line += f" {ref[st.name][0]:>11.4f} +- {ref[st.name][1]:<6.4f}"
        print(line)
        basins[st.name] = {
            "raw_fraction": raw,
            "population": pop,
            "population_error": err,
            "md_reference": ref.get(st.name),
        }
    outside = 1.0 - sum(b["raw_fraction"] for b in basins.values())
    if outside > 1e-9:
        print(f"  {'(no state)':<16} {outside:>12.4f}")
    return basins


@dataclass
class _Source:
    """What step 2 samples: a trained checkpoint or a pretrained model, and where to write."""

    out: Path
    system: str
    checkpoint: Path | None = None
    model: Path | None = None
    config_path: Path | None = None
    card: dict[str, Any] | None = None


def _check_args(args: argparse.Namespace) -> bool:
    """The numeric options and the choice of path; returns whether the pipeline trains."""
    if args.ais is not None and args.ais < 0:
        raise BoltzgenError(f"--ais must be >= 0, got {args.ais}")
    if args.n_samples is not None and args.n_samples < 10:
        raise BoltzgenError(f"-n must be at least 10, got {args.n_samples}")
    if args.batch_size is not None and args.batch_size < 1:
        raise BoltzgenError(f"--batch-size must be at least 1, got {args.batch_size}")
    training = (
        args.train or args.config is not None or args.max_iter is not None or bool(args.recipe)
    )
    if training and args.model is not None:
        raise BoltzgenError(
            "--model samples a given model; --train, --recipe, --config and --max-iter train "
            "one: choose one"
        )
    if args.recipe and (args.config is not None or args.max_iter is not None):
        raise BoltzgenError("--recipe trains its own configs: drop --config and --max-iter")
    return training


def _train_words(sdir: Path) -> str:
    recipe = sdir / "recipe.yaml"
    return str(recipe if recipe.is_file() else sdir / "reverse_kl_quick.yaml")


def _recipe_path(args: argparse.Namespace, sdir: Path) -> Path | None:
    """The recipe the training path trains: --recipe, or with a bare --train the system's
    recipe.yaml if it has one (None: train one config)."""
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        return path
    if args.config is None and args.max_iter is None and (sdir / "recipe.yaml").is_file():
        return sdir / "recipe.yaml"
    return None


def _pretrained_source(args: argparse.Namespace) -> _Source | None:
    """The pretrained model to sample (--model, or the system's shipped one), checked before
    any work (readable, of this system); None when the system ships
    none and no --model is given."""
    from boltzgen import models

    path = models.find_model(args.model) if args.model else models.shipped_model(args.system)
    if path is None:
        return None
    if path.is_dir():
        card = models.read_card(path)
        files = [path / c["file"] for c in card["components"]]
        models.read_components(files, args.system)
    else:
        card = models.checkpoint_card(path, models.read_components([path], args.system)[0])
    name = Path(args.system).name
    out = Path(args.output_dir) if args.output_dir else Path("runs") / f"{name}_pretrained"
    return _Source(out=out, system=args.system, model=path, card=card)


def run(args: argparse.Namespace) -> int:
    """Run ``boltzgen pipeline``; returns the exit code."""
    from boltzgen import pipeline
    from boltzgen.analysis.reports import load_states
    from boltzgen.systems import system_dir

    training = _check_args(args)
    sdir = system_dir(args.system)
    source = None if training else _pretrained_source(args)
    training = source is None
    recipe_path = _recipe_path(args, sdir) if training else None
    defaults = TRAINED_DEFAULTS if training and recipe_path is None else PRETRAINED_DEFAULTS
    for key, value in zip(("n_samples", "ais", "batch_size"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    recipe = None
    if recipe_path is not None:
        from boltzgen.recipes import load_recipe

        recipe = load_recipe(recipe_path)
        states = load_states(None, recipe.system)  # a bad states file stops before training
        out = Path(args.output_dir or recipe.output_dir)
        source = _Source(
            out=out, system=recipe.system, model=out / "model", config_path=recipe_path
        )
        device = args.device or "cpu"
    elif training:
        source, config = _training_source(args, sdir)
        states = load_states(None, config.system.name)  # a bad states file stops before training
        device = config.train.device
    else:
        states = load_states(None, args.system)
        device = args.device or "cpu"
    threads = set_threads(args.threads)
    pipeline.check_device(device)
    t_start = time.perf_counter()
    if recipe is not None:
        code = _train_recipe(recipe, source, device, threads)
        if code is not None:
            return code
    elif training:
        code = _train(source, config, threads)
        if code is not None:
            return code
    else:
        card = source.card
        kind = (
            f"a mixture of {len(card['components'])} flows ("
            + ", ".join(f"{c['fraction']:g}" for c in card["components"])
            + ")"
            if len(card["components"]) > 1
            else "one flow"
        )
        stand_in = "STAND-IN, " if card.get("stand_in") else ""
        print(
            f"[1/3] using the pretrained model {source.model} ({stand_in}{kind}; no training: "
            f"--train retrains {_train_words(sdir)}; boltzgen info "
            f"{args.system} prints its card) -> {source.out}",
            flush=True,
        )
        source.out.mkdir(parents=True, exist_ok=True)
    code = _sample(args, source, device)
    if code is not None:
        return code
    return _report(args, source, states, sdir, t_start)


def _training_source(args: argparse.Namespace, sdir: Path) -> tuple[_Source, Any]:
    """The run config to train (with the CLI's overrides) and its output folder."""
    from boltzgen import pipeline
    from boltzgen.config import load_config

    config_path = Path(args.config) if args.config else sdir / "reverse_kl_quick.yaml"
    if not config_path.is_file():
        raise ConfigError(f"run config {config_path} does not exist (pass --config)")
    config = pipeline.with_overrides(
        load_config(config_path),
        device=args.device,
        max_iter=args.max_iter,
        progress=False if args.no_progress else None,
        output_dir=args.output_dir,
    )
    out = Path(config.output_dir)
    source = _Source(
        out=out,
        system=config.system.name,
        checkpoint=out / "checkpoint.pt",
        config_path=config_path,
    )
    return source, config


def _train(source: _Source, config: Any, threads: int) -> int | None:
    """Step 1 of the training path: train, resume or reuse; an exit code if interrupted."""
    from boltzgen import pipeline
    from boltzgen.train import TrainingInterrupted, load_checkpoint

    ckpt, out, max_iter = source.checkpoint, source.out, config.train.max_iter
    if ckpt.is_file() and load_checkpoint(ckpt)["iteration"] >= max_iter:
        print(f"[1/3] reusing the trained checkpoint {ckpt} (delete it to train again)")
        return None
    resume = ckpt.is_file()
    verb = "resuming" if resume else "training"
    print(
        f"[1/3] {verb} {source.config_path} -> {out} ({max_iter} iterations, {threads} torch "
        f"CPU thread{'s' * (threads > 1)}; --threads N to change)",
        flush=True,
    )
    try:
        print_train_summary(pipeline.train(config, resume=resume))
    except TrainingInterrupted as stop:
        print(
            f"\n{stop}: checkpoint {stop.checkpoint} written; run the same command again to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    return None


def _train_recipe(recipe: Any, source: _Source, device: str, threads: int) -> int | None:
    """Step 1 of the recipe path: train (resume, reuse) every stage of every component, then
    export them as a model folder; an exit code if interrupted."""
    from boltzgen import models
    from boltzgen.recipes import train_recipe
    from boltzgen.train import TrainingInterrupted

    print(
        f"[1/3] training the recipe {recipe.path} -> {source.out} ({len(recipe.names)} "
        f"component(s), each in its own process with {threads} torch CPU thread"
        f"{'s' * (threads > 1)} when there are cores; finished stages are reused)",
        flush=True,
    )
    try:
        checkpoints = train_recipe(recipe, source.out, device=device, threads=threads)
    except TrainingInterrupted as stop:
        print(
            f"\n{stop}: checkpoint {stop.checkpoint} written; run the same command again to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    models.export_model(
        list(zip(checkpoints, recipe.fractions, strict=True)),
        source.model,
        note=f"Trained by boltzgen pipeline --train from {recipe.path}.",
    )
    source.card = models.read_card(source.model)
    print(f"      model folder: {source.model} (boltzgen info {source.model} prints its card)")
    return None


def _sample(args: argparse.Namespace, source: _Source, device: str) -> int | None:
    """Step 2: draw the samples and write them (npz + topology PDB, and the trajectory with
    its weights if asked); an exit code if interrupted."""
    from boltzgen import models, pipeline

    out = source.out
    samples_path = out / "samples.npz"
    how = f"flow + AIS with {args.ais} intermediate distributions" if args.ais else "flow"
    if source.card is not None and len(source.card["components"]) > 1:
        how = "mixture proposal" + (
            f" + AIS with {args.ais} intermediate distributions" * bool(args.ais)
        )
    partial = out / "samples.partial.npz"
    resume = partial.is_file()
    verb = f"resuming {partial}:" if resume else "drawing"
    print(f"[2/3] {verb} {args.n_samples} samples ({how}) -> {samples_path}", flush=True)
    t0 = time.perf_counter()
    if source.model is not None:
        model = models.load_model(source.model, source.system)
    else:
        model = models.load_model(source.checkpoint)
    try:
        drawn = models.draw(
            model,
            args.n_samples,
            args.batch_size,
            ais=args.ais,
            device=device,
            seed=args.seed,
            partial=partial,
            resume=resume,
            progress=not args.no_progress,
        )
    except pipeline.SamplingInterrupted as stop:
        saved = f"they are in {partial}; run the same command again to resume"
        if stop.partial is None:  # a mixture: its components draw without a progress file
            saved = "nothing saved; the same command draws them again"
        print(f"\n{stop}: {saved}", file=sys.stderr)
        return stop.exit_code
    system = model.runs[0].system
    written = drawn.export(samples_path, system)
    if args.trajectory:
        traj = drawn.export(out / f"samples.{args.trajectory}", system)
        written += [p for p in traj if p not in written]
    partial.unlink(missing_ok=True)
    print(
        f"      {drawn.n} samples in {time.perf_counter() - t0:.1f} s; dropped non-finite "
        f"{drawn.n_nonfinite}, D-form {drawn.n_filtered}; wrote "
        + ", ".join(p.name for p in written)
    )
    source.card = source.card or model.card
    return None


def _report(
    args: argparse.Namespace, source: _Source, states: Any, sdir: Path, t_start: float
) -> int:
    """Step 3: reweight, compare with the MD reference, plots, ``pipeline.json``."""
    from boltzgen.analysis import load_samples
    from boltzgen.analysis.reports import evaluate_samples, print_report, reweight_report
    from boltzgen.files import write_json

    out = source.out
    samples_path = out / "samples.npz"
    print("[3/3] reweighting", flush=True)
    samples = load_samples(samples_path)
    report = reweight_report(samples, states, n_bootstrap=200, seed=0)
    print_report(report)
    write_json(report, out / "reweight.json")
    summary: dict[str, Any] = {
        "config": None if source.config_path is None else str(source.config_path),
        "checkpoint": None if source.checkpoint is None else str(source.checkpoint),
        "model": None if source.model is None else str(source.model),
        "stand_in": bool((source.card or {}).get("stand_in")),
        "components": [
            {"file": c.get("file"), "fraction": c.get("fraction")}
            for c in (source.card or {}).get("components", [])
        ],
        "samples": str(samples_path),
        "reweight": str(out / "reweight.json"),
        "n_samples": samples.n,
        "ais_intermediate": args.ais,
        "ess_fraction": report["ess_fraction"],
        "khat": report["khat"],
    }
    if states.states:
        summary["states"] = _basin_table(samples, report, states, samples.system)
    ref_npz = sdir / "reference" / "reference.npz"
    if not ref_npz.is_file():
        print(
            f"  no MD reference shipped for {args.system} ({ref_npz} does not exist): "
            "comparison with a reference and its plots skipped"
        )
    elif not args.no_plots:
        eval_dir = out / "evaluation"
        log = out / "log.csv"
        metrics = evaluate_samples(
            samples,
            load_samples(ref_npz),
            states,
            eval_dir,
            n_bootstrap=50,
            seed=0,
            training_log=log if source.checkpoint is not None and log.is_file() else None,
        )
        write_json(metrics, eval_dir / "metrics.json")
        summary["metrics"] = str(eval_dir / "metrics.json")
        if "ramachandran_kl_reweighted" in metrics:
            pair = ", ".join(metrics["ramachandran_cvs"])
            print(
                f"  Ramachandran KL(reference || samples) over ({pair}): raw "
                f"{metrics['ramachandran_kl_raw']:.4f}, reweighted "
                f"{metrics['ramachandran_kl_reweighted']:.4f} nats"
            )
        print(f"plots: {eval_dir}")
    refined = ((source.card or {}).get("quality") or {}).get("ais_refined")
    if isinstance(refined, dict) and not args.ais:
        print(
            f"  --ais {refined.get('ais')} refines the samples by AIS: the model card measured "
            f"Kish ESS {100 * refined.get('ess_fraction', float('nan')):.1f} % for "
            f"{refined.get('n')} samples, drawn in {refined.get('sampling_wall_s', 0):.0f} s "
            "(boltzgen info prints the card)"
        )
    summary["wall_s"] = time.perf_counter() - t_start
    write_json(summary, out / "pipeline.json")
    print(f"pipeline finished in {summary['wall_s']:.0f} s; summary: {out / 'pipeline.json'}")
    return 0
