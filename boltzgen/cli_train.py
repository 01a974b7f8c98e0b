"""``boltzgen train`` and ``boltzgen sample``: build a Boltzmann generator from a run config."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.errors import BoltzgenError

__all__ = [
    "Run",
    "add_sample_parser",
    "add_train_parser",
    "build_run",
    "draw_ais_samples",
    "draw_samples",
    "load_training_data",
    "run_sample",
    "run_train",
]


@dataclass
class Run:
    """The objects of a run: system, coordinate transform, generator, target, sample filter."""

    system: Any
    coordinates: Any
    model: Any
    target: Any
    sample_filter: Any


def _minimised_positions(system: Any) -> np.ndarray:
    """Energy-minimised positions ``(n_atoms, 3)`` nm of a `MolecularSystem` (OpenMM L-BFGS)."""
    import openmm
    import openmm.unit as u

    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(system.system, integrator, platform)
    ctx.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 1000)
    pos = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(u.nanometer)
    return np.asarray(pos, dtype=np.float64)


def build_run(config: Any) -> Run:
    """Construct the system, coordinates, flow, target and filter of a `RunConfig`.

    The flow's weights are drawn with ``config.flow.seed`` so that the same config builds the
    same model.
    """
    import torch

    from boltzgen import systems
    from boltzgen.coordinates import InternalCoordinates, is_l_form
    from boltzgen.energy import BoltzmannTarget, OpenMMEnergy, TorchEnergy
    from boltzgen.flows import circular_mask, make_spline_flow
    from boltzgen.generator import BoltzmannGenerator, FlowSpaceTarget
    from boltzgen.stochastic import make_snf_layers

    sc = config.system
    system = systems.load(sc.name, solvent=sc.solvent, temperature=sc.temperature)
    ref = _minimised_positions(system) if config.coordinates.minimise else system.positions
    coords = InternalCoordinates.from_topology(
        system.topology, reference_positions=ref, torsions=config.coordinates.torsions
    )
    torch.manual_seed(config.flow.seed)
    fc = config.flow
    flow = make_spline_flow(
        coords.domains,
        n_blocks=fc.n_blocks,
        n_bins=fc.n_bins,
        hidden=fc.hidden,
        n_res_blocks=fc.n_res_blocks,
        layer_type=fc.layer_type,
        mixing=fc.mixing,
        circular_shift=fc.circular_shift,
        actnorm=fc.actnorm,
        tail_bound=fc.tail_bound,
        seed=fc.seed,
    )
    model = BoltzmannGenerator(flow, coords)
    energy = (
        TorchEnergy.from_openmm(system.system)
        if sc.energy == "torch"
        else OpenMMEnergy(system.system)
    )
    target = BoltzmannTarget(energy, system.kT)
    snf = config.snf
    if snf.n_layers > 0:
        if snf.second_order and sc.energy == "torch":
            energy.set_analytic_gradients(False)  # double backward through the force field
        flow_target = FlowSpaceTarget(target, coords)
        layers = make_snf_layers(
            snf.kind,
            snf.n_layers,
            target=flow_target.log_prob,
            reference=flow.log_prob,
            lambdas=snf.lambdas,
            n_steps=snf.n_steps,
            step_size=snf.step_size,
            n_leapfrog=snf.n_leapfrog,
            circular=circular_mask(coords.domains),
            adaptive=snf.adaptive,
            second_order=snf.second_order,
            target_acceptance=snf.target_acceptance,
        )
        model.add_stochastic_layers(layers, flow_target)
    sample_filter = None
    if config.chirality_filter:
        topology = system.topology

        def sample_filter(x: torch.Tensor) -> torch.Tensor:
            return is_l_form(x, topology)

    return Run(system, coords, model, target, sample_filter)


# ---------------------------------------------------------------------------------- train
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
        raise BoltzgenError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def load_training_data(path: str, n_atoms: int) -> tuple[Any, Any]:
    """MD frames for the forward KL: ``(positions (N, n_atoms, 3) nm, log_weights (N,) | None)``.

    The ``.npz`` holds ``positions`` and optionally ``log_weights`` per frame (or per saved
    frame through ``frame_index``, as `boltzgen md` and the shipped reference write them).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise BoltzgenError(f"training data {p} does not exist")
    try:
        data = np.load(p)
        pos = np.asarray(data["positions"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise BoltzgenError(f"cannot read positions from {p}: {exc}") from exc
    if pos.ndim != 3 or pos.shape[1:] != (n_atoms, 3):
        raise BoltzgenError(
            f"{p}: positions must have shape (frames, {n_atoms}, 3), got {pos.shape}"
        )
    if not np.isfinite(pos).all():
        raise BoltzgenError(f"{p}: positions contain NaN or inf")
    log_w = None
    if "log_weights" in data.files:
        lw = np.asarray(data["log_weights"], dtype=np.float64)
        if "frame_index" in data.files and len(lw) != len(pos):
            lw = lw[np.asarray(data["frame_index"])]
        if len(lw) != len(pos) or not np.isfinite(lw).all():
            raise BoltzgenError(f"{p}: log_weights must be finite, one per frame")
        log_w = torch.as_tensor(lw)
    return torch.as_tensor(pos), log_w


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``boltzgen train CONFIG.yaml [--resume] [--device D] [--max-iter N]``."""
    p = sub.add_parser("train", help="train a Boltzmann generator from a YAML run config")
    p.add_argument("config", help="run config (e.g. systems/aldp/reverse_kl_quick.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--device", default=None, help="torch device (overrides train.device)")
    p.add_argument("--max-iter", type=int, default=None, help="overrides train.max_iter")
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run ``boltzgen train``; returns the exit code (130 when interrupted)."""
    from boltzgen.config import config_to_dict, load_config
    from boltzgen.train import CheckpointError, Trainer, load_checkpoint

    set_threads(getattr(args, "threads", None))
    config = load_config(args.config)
    train = config.train
    if args.device is not None:
        train = replace(train, device=args.device)
    if args.max_iter is not None:
        train = replace(train, max_iter=args.max_iter)
    if args.no_progress:
        train = replace(train, progress=False)
    config = replace(config, train=train)
    if args.output_dir is not None:
        config = replace(config, output_dir=args.output_dir)
    out = Path(config.output_dir)
    ckpt_path = out / "checkpoint.pt"
    meta = {"system": config.system.name, "config": config_to_dict(config)}
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        old = ckpt.get("metadata", {})
        if old.get("system") != config.system.name:
            raise CheckpointError(
                f"{ckpt_path} is a checkpoint of system {old.get('system')!r}, "
                f"not {config.system.name!r}"
            )
        for section in ("system", "coordinates", "flow", "snf"):
            if old.get("config", {}).get(section) != meta["config"][section]:
                raise CheckpointError(
                    f"{ckpt_path} was trained with a different '{section}' section; "
                    "resume with the config it was started with"
                )
    elif ckpt_path.exists():
        raise BoltzgenError(
            f"{ckpt_path} exists; pass --resume to continue it or choose another --output-dir"
        )
    run = build_run(config)
    x_data = data_weights = None
    if config.data is not None:
        x_data, data_weights = load_training_data(config.data, run.system.n_atoms)
    elif config.train.objective in ("forward_kl", "mixed_kl"):
        raise BoltzgenError(
            f"objective {config.train.objective} needs MD frames: set 'data: FRAMES.npz' in "
            f"{args.config}"
        )
    trainer = Trainer(
        run.model,
        run.target,
        config.train,
        output_dir=out,
        x_data=x_data,
        data_weights=data_weights,
        sample_filter=run.sample_filter,
        metadata=meta,
        fab_options=config.fab,
    )
    if args.resume:
        trainer.resume()
        print(f"resuming {ckpt_path} at iteration {trainer.iteration}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        row = trainer.run()
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the last checkpoint {ckpt_path} is intact (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    wall = time.perf_counter() - t0
    c = trainer.counters
    ess = row.get("ess_fraction", float("nan"))
    print(
        f"trained {trainer.iteration} iterations in {wall:.1f} s; last batch ESS "
        f"{100 * ess:.2f}%; target evaluations {c['target_evals']}; dropped non-finite "
        f"{c['nonfinite']}, D-form {c['filtered']}; skipped steps {c['skipped_steps']}\n"
        f"checkpoint: {ckpt_path}\nlog: {out / 'log.csv'}"
    )
    return 0


# ---------------------------------------------------------------------------------- sample
def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``boltzgen sample CHECKPOINT -n N -o OUT [--batch-size B]``."""
    p = sub.add_parser("sample", help="draw weighted samples from a trained checkpoint")
    p.add_argument("checkpoint", help="checkpoint.pt written by boltzgen train")
    p.add_argument("-n", "--n-samples", type=int, required=True, help="number of samples")
    p.add_argument("-o", "--output", required=True, help="samples.npz, or .pdb/.dcd for viewers")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument(
        "--ais",
        type=int,
        default=0,
        metavar="K",
        help="refine the flow's samples by annealed importance sampling toward the Boltzmann "
        "density with K intermediate distributions (HMC); log_weights are then AIS weights",
    )
    add_threads_argument(p)
    p.set_defaults(func=run_sample)


def _valid_rows(
    run: Run, energy: Any, x: Any, log_val: Any, batch_size: int
) -> tuple[Any, Any, Any, int, int]:
    """Keep finite, filter-passing rows of ``x`` with finite ``log_val`` and finite energy.

    Returns ``(x, log_val, energies, n_nonfinite, n_filtered)``, float64 on the CPU.
    """
    import torch

    from boltzgen.objectives import filter_rows

    ok = torch.isfinite(x).flatten(1).all(-1) & torch.isfinite(log_val)
    n_bad = int((~ok).sum())
    ok, n_filt = filter_rows(ok, x, run.sample_filter)
    x, log_val = x[ok].double(), log_val[ok].double()
    u = torch.cat([energy(xb) for xb in x.split(batch_size)]) if len(x) else x.new_zeros(0)
    fin = torch.isfinite(u)
    n_bad += int((~fin).sum())
    return x[fin].cpu(), log_val[fin].cpu(), u[fin].cpu(), n_bad, n_filt


def draw_samples(
    run: Run, n: int, batch_size: int, device: str = "cpu", max_rounds: int = 100
) -> dict[str, np.ndarray]:
    """Draw ``n`` finite (and, with a filter, L-form) samples with log q, energies, weights.

    Returns a dict with ``positions`` (n, n_atoms, 3) float32 nm, ``log_q`` (nats),
    ``energies`` (kJ/mol), ``log_weights`` (``-U/kT - log q``) and the counts of dropped
    samples ``n_nonfinite`` and ``n_filtered``.
    """
    import torch

    model = run.model.to(device)
    energy = run.target.energy.to(device)
    model.eval()
    xs, lqs, us = [], [], []
    n_bad = n_filt = got = 0
    for _ in range(max_rounds):
        if got >= n:
            break
        with torch.no_grad():
            x, lq = model.sample(n - got, batch_size)
            x, lq, u, bad, filt = _valid_rows(run, energy, x, lq, batch_size)
        n_bad, n_filt, got = n_bad + bad, n_filt + filt, got + len(u)
        xs.append(x), lqs.append(lq), us.append(u)
    if got < n:
        raise BoltzgenError(f"only {got} of {n} samples were valid after {max_rounds} rounds")
    x, lq, u = torch.cat(xs)[:n], torch.cat(lqs)[:n], torch.cat(us)[:n]
    kT = run.target.kT
    return {
        "positions": x.numpy().astype(np.float32),
        "log_q": lq.numpy(),
        "energies": u.numpy(),
        "log_weights": (-u / kT - lq).numpy(),
        "n_nonfinite": np.int64(n_bad),
        "n_filtered": np.int64(n_filt),
    }


def draw_ais_samples(
    run: Run,
    n: int,
    batch_size: int,
    n_intermediate: int,
    device: str = "cpu",
    warmup_rounds: int = 3,
    max_rounds: int = 100,
) -> dict[str, np.ndarray]:
    """`draw_samples` refined by AIS from the flow toward the Boltzmann density (alpha = 1).

    Flow samples ``y ~ q`` (the deterministic flow; SNF layers are skipped) are annealed by HMC
    through ``n_intermediate`` geometric-path distributions between ``q`` and the target in the
    flow's space (per-coordinate step sizes, adapted toward 65 % acceptance during
    ``warmup_rounds`` discarded rounds, then frozen). ``log_weights`` are the AIS weights, which
    stay exact for any step size; ``log_q`` is stored as ``-U/kT - log_weights`` so that every
    reader computes the same weights.
    """
    import torch

    from boltzgen.ais import AnnealedImportanceSampler
    from boltzgen.flows import circular_mask
    from boltzgen.generator import FlowSpaceTarget

    if n_intermediate < 1:
        raise BoltzgenError(
            f"--ais needs at least 1 intermediate distribution, got {n_intermediate}"
        )
    model = run.model.to(device)
    model.eval()
    flow, coords = model.flow, model.coordinates
    target = run.target
    flow_target = FlowSpaceTarget(target, coords)
    domains = getattr(coords, "domains", None)
    dim = int(flow.base.dim)
    circular = None if domains is None else circular_mask(domains)
    cut = getattr(target, "energy_cut", None)
    sampler = AnnealedImportanceSampler(
        dim,
        n_intermediate,
        transition="hmc",
        n_leapfrog=4,
        step_size=0.05,
        per_dim=True,
        alpha=1.0,
        circular=circular,
        log_p_floor=None if cut is None else -cut,
    ).to(device)
    dtype = next(flow.parameters()).dtype

    def one_batch(b: int) -> Any:
        with torch.no_grad():
            y, lq = flow.sample_and_log_prob(b)
        return sampler(y.to(dtype), flow.log_prob, flow_target.log_prob, log_q=lq)

    for _ in range(warmup_rounds):
        one_batch(min(batch_size, 512))
    sampler.adapt_rate = 0.0
    energy = target.energy.to(device)
    xs, lws, us = [], [], []
    n_bad = n_filt = got = 0
    for _ in range(max_rounds):
        if got >= n:
            break
        res = one_batch(min(batch_size, n - got))
        with torch.no_grad():
            x = coords.forward_and_log_det(res.x)[0] if coords is not None else res.x
            x, lw, u, bad, filt = _valid_rows(run, energy, x, res.log_w, batch_size)
        n_bad, n_filt, got = n_bad + bad, n_filt + filt, got + len(u)
        xs.append(x), lws.append(lw), us.append(u)
    if got < n:
        raise BoltzgenError(f"only {got} of {n} AIS samples were valid after {max_rounds} rounds")
    x, lw, u = torch.cat(xs)[:n], torch.cat(lws)[:n], torch.cat(us)[:n]
    kT = target.kT
    return {
        "positions": x.numpy().astype(np.float32),
        "log_q": (-u / kT - lw).numpy(),
        "energies": u.numpy(),
        "log_weights": lw.numpy(),
        "n_nonfinite": np.int64(n_bad),
        "n_filtered": np.int64(n_filt),
        "ais_intermediate": np.int64(n_intermediate),
    }


def run_sample(args: argparse.Namespace) -> int:
    """Run ``boltzgen sample``; returns the exit code."""
    import torch

    from boltzgen.config import ConfigError, config_from_dict
    from boltzgen.reweighting import ess, ess_fraction
    from boltzgen.train import CheckpointError, load_checkpoint

    if args.n_samples < 1 or args.batch_size < 1:
        raise BoltzgenError("-n and --batch-size must be positive")
    set_threads(getattr(args, "threads", None))
    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".pdb", ".dcd"):
        raise BoltzgenError(f"output must end in .npz, .pdb or .dcd, got {out.name!r}")
    if not out.parent.exists():
        raise BoltzgenError(f"output folder {out.parent} does not exist")
    ckpt = load_checkpoint(args.checkpoint)
    try:
        config = config_from_dict(ckpt["metadata"]["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{args.checkpoint} carries no usable run config: {exc}") from exc
    run = build_run(config)
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{args.checkpoint} does not fit its config's model: {exc}") from exc
    run.model.to(config.train.torch_dtype)
    torch.manual_seed(config.train.seed + 1 if args.seed is None else args.seed)
    ais_k = getattr(args, "ais", 0) or 0
    if ais_k < 0:
        raise BoltzgenError(f"--ais must be >= 0, got {ais_k}")
    if ais_k > 0:
        data = draw_ais_samples(run, args.n_samples, args.batch_size, ais_k, args.device)
    else:
        data = draw_samples(run, args.n_samples, args.batch_size, args.device)
    temperature = float(run.system.temperature)
    if suffix == ".npz":
        np.savez(
            out,
            **data,
            temperature=np.float64(temperature),
            system=np.str_(config.system.name),
        )
    else:
        traj = run.system.to_mdtraj(data["positions"])
        traj.save(str(out))
    lw = data["log_weights"]
    print(
        f"wrote {len(lw)} samples to {out}; ESS {ess(lw):.1f} ({100 * ess_fraction(lw):.2f}%); "
        f"dropped non-finite {int(data['n_nonfinite'])}, D-form {int(data['n_filtered'])}"
    )
    return 0
