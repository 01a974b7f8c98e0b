"""Runs as a library: build a Boltzmann generator from a `RunConfig`, train it, draw samples.

The CLI (`boltzgen train`, `sample`, `pipeline`), the notebooks and the tests all call these
functions::

    from boltzgen.config import config_from_dict
    from boltzgen.pipeline import build_run, draw_samples, train

    config = config_from_dict({"system": {"name": "aldp"}, "flow": {"n_blocks": 6, "hidden": 64}})
    result = train(config)                          # checkpoint + log in config.output_dir
    samples = draw_samples(load_run(result.checkpoint), 10_000, ais=8)
    samples.save("samples.npz")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from boltzgen.config import RunConfig, config_from_dict, config_to_dict
from boltzgen.errors import BoltzgenError, CheckpointError, ConfigError
from boltzgen.files import save_npz
from boltzgen.protocols import SampleFilter
from boltzgen.systems import MolecularSystem

if TYPE_CHECKING:  # torch-heavy modules, imported when a run is built
    from boltzgen.coordinates import InternalCoordinates
    from boltzgen.energy import BoltzmannTarget
    from boltzgen.sampling.generator import BoltzmannGenerator

__all__ = [
    "GeneratedSamples",
    "Run",
    "TrainResult",
    "build_run",
    "check_device",
    "draw_samples",
    "draw_samples_sharded",
    "load_run",
    "load_training_data",
    "merge_samples",
    "minimized_positions",
    "train",
    "with_overrides",
]

#: Run-config sections that define the model: a checkpoint resumes only with the same ones.
MODEL_SECTIONS = ("system", "coordinates", "flow", "snf")


@dataclass
class Run:
    """The objects of a run, built from its config by `build_run`.

    Attributes:
        config: The `RunConfig` it was built from.
        system: The molecule (`MolecularSystem`).
        coordinates: Internal coordinates, flow space -> Cartesian (`InternalCoordinates`).
        model: Flow + coordinates (+ SNF layers) (`BoltzmannGenerator`).
        target: ``log p(x) = -U(x)/kT`` (`BoltzmannTarget`).
        sample_filter: Keep-mask of Cartesian samples (L-form chirality), or None.
    """

    config: RunConfig
    system: MolecularSystem
    coordinates: InternalCoordinates
    model: BoltzmannGenerator
    target: BoltzmannTarget
    sample_filter: SampleFilter | None


def minimized_positions(system: MolecularSystem) -> np.ndarray:
    """Energy-minimized positions ``(n_atoms, 3)`` nm of a system (OpenMM L-BFGS, Reference)."""
    import openmm
    import openmm.unit as u

    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(system.system, integrator, platform)
    ctx.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 1000)
    pos = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(u.nanometer)
    return np.asarray(pos, dtype=np.float64)


def build_run(config: RunConfig) -> Run:
    """Construct the system, coordinates, flow (+ SNF layers), target and filter of a config.

    The flow's weights are drawn with ``config.flow.seed``: the same config builds the same model.
    """
    from boltzgen import systems
    from boltzgen.coordinates import InternalCoordinates, is_l_form
    from boltzgen.energy import BoltzmannTarget, OpenMMEnergy, TorchEnergy
    from boltzgen.flows import circular_mask, make_spline_flow
    from boltzgen.sampling.generator import BoltzmannGenerator, FlowSpaceTarget
    from boltzgen.sampling.stochastic import make_snf_layers

    sc = config.system
    system = systems.load(sc.name, solvent=sc.solvent, temperature=sc.temperature)
    ref = minimized_positions(system) if config.coordinates.minimize else system.positions
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

        def sample_filter(x: Tensor) -> Tensor:
            return is_l_form(x, topology)

    return Run(config, system, coords, model, target, sample_filter)


def check_device(device: str) -> None:
    """Raise `ConfigError` unless ``device`` names a torch device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device must be a torch device such as cpu or cuda, got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA GPU on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: torch sees no MPS device on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: boltzgen runs on cpu, cuda or mps")


def load_training_data(path: str | Path, n_atoms: int) -> tuple[Tensor, Tensor | None]:
    """MD frames for the forward KL: ``(positions (N, n_atoms, 3) nm, log_weights (N,) | None)``.

    The ``.npz`` holds ``positions`` and optionally ``log_weights`` per frame (or per saved
    frame through ``frame_index``, as `boltzgen md` and the shipped reference write them).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"training data {p} does not exist")
    try:
        data = np.load(p)
        pos = np.asarray(data["positions"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read positions from {p}: {exc}") from exc
    if pos.ndim != 3 or pos.shape[1:] != (n_atoms, 3):
        raise ConfigError(f"{p}: positions must have shape (frames, {n_atoms}, 3), got {pos.shape}")
    if not np.isfinite(pos).all():
        raise ConfigError(f"{p}: positions contain NaN or inf")
    log_w = None
    if "log_weights" in data.files:
        lw = np.asarray(data["log_weights"], dtype=np.float64)
        if "frame_index" in data.files and len(lw) != len(pos):
            lw = lw[np.asarray(data["frame_index"])]
        if len(lw) != len(pos) or not np.isfinite(lw).all():
            raise ConfigError(f"{p}: log_weights must be finite, one per frame")
        log_w = torch.as_tensor(lw)
    return torch.as_tensor(pos), log_w


# ----------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What `train` did: iterations, wall time (s), counters and the last log row."""

    iterations: int
    resumed_from: int
    wall_s: float
    counters: dict[str, int]
    last: dict[str, float]
    checkpoint: Path
    log: Path


def _check_resumable(config: RunConfig, checkpoint: Path) -> None:
    from boltzgen.train import load_checkpoint

    old = load_checkpoint(checkpoint).get("metadata", {})
    if old.get("system") != config.system.name:
        raise CheckpointError(
            f"{checkpoint} is a checkpoint of system {old.get('system')!r}, "
            f"not {config.system.name!r}"
        )
    new = config_to_dict(config)
    for section in MODEL_SECTIONS:
        if old.get("config", {}).get(section) != new[section]:
            raise CheckpointError(
                f"{checkpoint} was trained with a different '{section}' section; "
                "resume with the config it was started with"
            )


def train(config: RunConfig, resume: bool = False) -> TrainResult:
    """Train the run of ``config`` into ``config.output_dir`` (``checkpoint.pt``, ``log.csv``).

    Args:
        config: The run config (``train.max_iter`` iterations in all).
        resume: Continue ``output_dir/checkpoint.pt`` (it must come from the same model
            sections); without it an existing checkpoint is an error.

    Raises:
        CheckpointError: a checkpoint to resume is missing, unreadable or of another model.
        ConfigError: an objective that needs data without ``data:``, bad data.

    An interruption (KeyboardInterrupt) propagates; the last periodic checkpoint stays intact.
    """
    from boltzgen.train import Trainer

    out = Path(config.output_dir)
    ckpt = out / "checkpoint.pt"
    if resume:
        _check_resumable(config, ckpt)
    elif ckpt.exists():
        raise BoltzgenError(
            f"{ckpt} exists; pass --resume to continue it or choose another --output-dir"
        )
    if config.data is None and config.train.objective in ("forward_kl", "mixed_kl"):
        raise ConfigError(
            f"objective {config.train.objective} needs MD frames: set 'data: FRAMES.npz'"
        )
    if config.data is not None and not Path(config.data).is_file():
        raise ConfigError(f"data: training data {config.data} does not exist")
    check_device(config.train.device)
    run = build_run(config)
    x_data = data_weights = None
    if config.data is not None:
        x_data, data_weights = load_training_data(config.data, run.system.n_atoms)
    trainer = Trainer(
        run.model,
        run.target,
        config.train,
        output_dir=out,
        x_data=x_data,
        data_weights=data_weights,
        sample_filter=run.sample_filter,
        metadata={"system": config.system.name, "config": config_to_dict(config)},
        fab_options=config.fab,
    )
    if resume:
        trainer.resume()
    start = trainer.iteration
    t0 = time.perf_counter()
    row = trainer.run()
    return TrainResult(
        iterations=trainer.iteration,
        resumed_from=start,
        wall_s=time.perf_counter() - t0,
        counters=dict(trainer.counters),
        last=dict(row),
        checkpoint=ckpt,
        log=out / "log.csv",
    )


def load_run(checkpoint: str | Path) -> Run:
    """The `Run` of a checkpoint written by `train`, with its trained weights and dtype."""
    from boltzgen.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    try:
        config = config_from_dict(ckpt["metadata"]["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{checkpoint} carries no usable run config: {exc}") from exc
    run = build_run(config)
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit its config's model: {exc}") from exc
    run.model.to(config.train.torch_dtype)
    return run


# ----------------------------------------------------------------------------------- sampling
@dataclass
class GeneratedSamples:
    """Weighted samples of a generator.

    Attributes:
        positions: ``(n, n_atoms, 3)`` float32, nm.
        log_q: ``(n,)`` log density of the proposal, nats (with AIS: ``-U/kT - log_weights``).
        energies: ``(n,)`` kJ/mol.
        log_weights: ``(n,)`` unnormalised importance log-weights toward ``exp(-U/kT)``.
        temperature: K.
        system: System name.
        n_nonfinite: Draws dropped for NaN/inf coordinates or energies.
        n_filtered: Draws dropped by the sample filter (D-form).
        ais_intermediate: AIS intermediate distributions (0: plain flow samples).
    """

    positions: np.ndarray
    log_q: np.ndarray
    energies: np.ndarray
    log_weights: np.ndarray
    temperature: float
    system: str
    n_nonfinite: int = 0
    n_filtered: int = 0
    ais_intermediate: int = 0
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.log_weights.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The samples-file arrays (what `save` writes to an ``.npz``)."""
        out = {
            "positions": self.positions,
            "log_q": self.log_q,
            "energies": self.energies,
            "log_weights": self.log_weights,
            "n_nonfinite": np.int64(self.n_nonfinite),
            "n_filtered": np.int64(self.n_filtered),
            "temperature": np.float64(self.temperature),
            "system": np.str_(self.system),
        }
        if self.ais_intermediate:
            out["ais_intermediate"] = np.int64(self.ais_intermediate)
        return out

    def save(self, path: str | Path, system: MolecularSystem | None = None) -> Path:
        """Write a samples ``.npz`` (atomically), or ``.pdb`` / ``.dcd`` (needs ``system``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            save_npz(path, **self.arrays())
        elif suffix in (".pdb", ".dcd"):
            if system is None:
                raise BoltzgenError(f"writing {path.name} needs the system's topology")
            system.to_mdtraj(self.positions).save(str(path))
        else:
            raise BoltzgenError(f"output must end in .npz, .pdb or .dcd, got {path.name!r}")
        return path


def _valid_rows(
    run: Run,
    energy: Callable[[Tensor], Tensor],
    x: Tensor,
    log_val: Tensor,
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """Keep finite, filter-passing rows of ``x`` with finite ``log_val`` and finite energy.

    Returns ``(x, log_val, energies, n_nonfinite, n_filtered)``, float64 on the CPU.
    """
    from boltzgen.train.objectives import filter_rows

    ok = torch.isfinite(x).flatten(1).all(-1) & torch.isfinite(log_val)
    n_bad = int((~ok).sum())
    ok, n_filt = filter_rows(ok, x, run.sample_filter)
    x, log_val = x[ok].double(), log_val[ok].double()
    u = torch.cat([energy(xb) for xb in x.split(batch_size)]) if len(x) else x.new_zeros(0)
    fin = torch.isfinite(u)
    n_bad += int((~fin).sum())
    return x[fin].cpu(), log_val[fin].cpu(), u[fin].cpu(), n_bad, n_filt


def _ais_batches(
    run: Run, ais: int, device: str, warmup_rounds: int, warmup_batch: int
) -> Callable[[int], tuple[Tensor, Tensor]]:
    """A function ``b -> (x Cartesian (b, n_atoms, 3), log_w (b,))`` of AIS-refined samples."""
    from boltzgen.sampling.ais import AnnealedImportanceSampler
    from boltzgen.sampling.generator import flow_space

    space = flow_space(run.model, run.target)
    flow = space.flow
    sampler = AnnealedImportanceSampler(
        space.dim,
        ais,
        transition="hmc",
        n_leapfrog=4,
        step_size=0.05,
        per_dim=True,
        alpha=1.0,
        circular=space.circular,
        log_p_floor=space.log_p_floor,
    ).to(device)
    dtype = next(flow.parameters()).dtype

    def one_batch(b: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            y, lq = flow.sample_and_log_prob(b)
        res = sampler(y.to(dtype), flow.log_prob, space.target.log_prob, log_q=lq)
        with torch.no_grad():
            coords = space.coordinates
            x = coords.forward_and_log_det(res.x)[0] if coords is not None else res.x
        return x, res.log_w

    for _ in range(warmup_rounds):
        one_batch(warmup_batch)
    sampler.adapt_rate = 0.0
    return one_batch


def draw_samples(
    run: Run,
    n: int,
    batch_size: int = 1000,
    ais: int = 0,
    device: str = "cpu",
    seed: int | None = None,
    warmup_rounds: int = 3,
    max_rounds: int = 100,
) -> GeneratedSamples:
    """Draw ``n`` finite (and, with a filter, L-form) weighted samples of a run's model.

    Args:
        run: A trained `Run` (`load_run`).
        n: Number of samples.
        batch_size: Samples per batch.
        ais: 0 for plain flow samples (with SNF layers, if any: path weights). K > 0 refines the
            flow's samples by annealed importance sampling toward the Boltzmann density through
            K geometric-path distributions (HMC, per-coordinate step sizes adapted toward 65 %
            acceptance during ``warmup_rounds`` discarded rounds, then frozen; SNF layers are
            skipped). The AIS weights are exact for any step size.
        device: Torch device.
        seed: Seed of torch's generator (None: leave it as it is).
        warmup_rounds: AIS step-size adaptation rounds (``min(batch_size, 512)`` chains each).
        max_rounds: Give up after this many batches with too few valid samples.

    Raises:
        BoltzgenError: ``n``, ``batch_size`` or ``ais`` out of range, or too few valid samples.
    """
    if n < 1 or batch_size < 1:
        raise BoltzgenError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
    if ais < 0:
        raise BoltzgenError(f"ais must be >= 0, got {ais}")
    if seed is not None:
        torch.manual_seed(seed)
    model = run.model.to(device)
    model.eval()
    energy = run.target.energy.to(device)
    if ais:
        ais_batch = _ais_batches(run, ais, device, warmup_rounds, min(batch_size, 512))
    xs, vals, us = [], [], []
    n_bad = n_filt = got = 0
    for _ in range(max_rounds):
        if got >= n:
            break
        if ais:
            x, val = ais_batch(min(batch_size, n - got))  # val: AIS log-weights
        else:
            with torch.no_grad():
                x, val = model.sample(n - got, batch_size)  # val: log q
        with torch.no_grad():
            x, val, u, bad, filt = _valid_rows(run, energy, x, val, batch_size)
        n_bad, n_filt, got = n_bad + bad, n_filt + filt, got + len(u)
        xs.append(x), vals.append(val), us.append(u)
    if got < n:
        raise BoltzgenError(f"only {got} of {n} samples were valid after {max_rounds} rounds")
    x, val, u = torch.cat(xs)[:n], torch.cat(vals)[:n], torch.cat(us)[:n]
    reduced = (u / run.target.kT).numpy()
    val = val.numpy()
    log_q, log_w = (-reduced - val, val) if ais else (val, -reduced - val)
    return GeneratedSamples(
        positions=x.numpy().astype(np.float32),
        log_q=log_q,
        energies=u.numpy(),
        log_weights=log_w,
        temperature=float(run.system.temperature),
        system=run.config.system.name,
        n_nonfinite=n_bad,
        n_filtered=n_filt,
        ais_intermediate=ais,
    )


def with_overrides(config: RunConfig, **train_overrides: Any) -> RunConfig:
    """``config`` with ``train`` fields replaced (None values are ignored); ``output_dir`` too."""
    out = train_overrides.pop("output_dir", None)
    t = replace(config.train, **{k: v for k, v in train_overrides.items() if v is not None})
    config = replace(config, train=t)
    return config if out is None else replace(config, output_dir=str(out))


# -------------------------------------------------------------------------- parallel sampling
def draw_samples_sharded(
    run: Run,
    n: int,
    seed: int,
    n_shards: int | None = None,
    **kwargs: Any,
) -> GeneratedSamples | None:
    """`draw_samples` as ``n_shards`` independent pieces, spread over the process group's ranks.

    Piece ``s`` holds ``n // n_shards`` samples (one more for the first ``n % n_shards``) drawn
    with the seed ``shard_seed(seed, s)``; rank ``r`` of ``W`` draws pieces ``r S/W`` to
    ``(r + 1) S/W - 1`` and rank 0 merges all pieces in order. The merged samples depend only on
    ``seed`` and ``n_shards``, not on the number of processes. With AIS every piece adapts its
    own step sizes (``warmup_rounds`` each).

    Args:
        run: A trained `Run`.
        n: Samples in all.
        seed: Base seed.
        n_shards: Pieces (default: one per process; a multiple of the number of processes).
        **kwargs: `draw_samples` options (``batch_size``, ``ais``, ``device``, ...).

    Returns:
        The merged `GeneratedSamples` on rank 0, None on the other ranks.
    """
    from boltzgen.train.distributed import STREAMS, Shards, rank_and_world, shard_seed

    rank, world = rank_and_world()
    shards = Shards(n_shards or world, seed, rank, world)
    if n < shards.n_shards:
        raise BoltzgenError(f"need at least one sample per piece: n {n} < {shards.n_shards}")
    sizes = [n // shards.n_shards + (s < n % shards.n_shards) for s in range(shards.n_shards)]
    pieces = [
        draw_samples(run, sizes[s], seed=shard_seed(seed, s, STREAMS["draw"]), **kwargs)
        for s in shards.local
    ]
    if shards.distributed:
        gathered: list[Any] = [None] * world if rank == 0 else None
        torch.distributed.gather_object(pieces, gathered, dst=0)
        if rank != 0:
            return None
        pieces = [p for part in gathered for p in part]
    return merge_samples(pieces)


def merge_samples(pieces: list[GeneratedSamples]) -> GeneratedSamples:
    """Concatenate `GeneratedSamples` of the same system, temperature and AIS setting."""
    first = pieces[0]
    for p in pieces[1:]:
        same = (p.system, p.temperature, p.ais_intermediate)
        if same != (first.system, first.temperature, first.ais_intermediate):
            raise BoltzgenError("cannot merge samples of different systems or settings")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in pieces])

    return GeneratedSamples(
        positions=cat("positions"),
        log_q=cat("log_q"),
        energies=cat("energies"),
        log_weights=cat("log_weights"),
        temperature=first.temperature,
        system=first.system,
        n_nonfinite=sum(p.n_nonfinite for p in pieces),
        n_filtered=sum(p.n_filtered for p in pieces),
        ais_intermediate=first.ais_intermediate,
        extra={k: np.concatenate([p.extra[k] for p in pieces]) for k in first.extra},
    )
