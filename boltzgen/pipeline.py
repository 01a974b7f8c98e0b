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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from boltzgen.config import RunConfig, config_from_dict, config_to_dict, restraint_list
from boltzgen.errors import BoltzgenError, CheckpointError, ConfigError
from boltzgen.files import atomic_open, atomic_path, save_npz
from boltzgen.interrupts import Interrupted, deferred_signals
from boltzgen.protocols import SampleFilter
from boltzgen.systems import MolecularSystem
from boltzgen.train.trainer import check_device

if TYPE_CHECKING:  # torch-heavy modules, imported when a run is built
    from boltzgen.coordinates import InternalCoordinates
    from boltzgen.energy import BoltzmannTarget
    from boltzgen.sampling.generator import BoltzmannGenerator

__all__ = [
    "GeneratedSamples",
    "Run",
    "SamplingInterrupted",
    "TRAJECTORY_SUFFIXES",
    "TrainResult",
    "build_run",
    "check_device",
    "chirality_filter",
    "draw_mixture",
    "draw_samples",
    "draw_samples_sharded",
    "load_run",
    "load_training_data",
    "merge_samples",
    "minimized_positions",
    "topology_path",
    "train",
    "weights_path",
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
        sample_filter: Keep-mask of Cartesian samples (L-form chirality), or None (see
            `chirality_filter`).
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


def chirality_filter(config: RunConfig, system: MolecularSystem) -> bool:
    """Whether a run drops samples that are not in the L form: ``config.chirality_filter``, or
    where that is None, whether the molecule has a chiral alpha carbon (a residue with N, CA, C
    and CB: every amino acid but glycine).

    Raises:
        ConfigError: ``chirality_filter: true`` for a molecule without a chiral alpha carbon.
    """
    from boltzgen.coordinates import alpha_carbons

    has_centre = bool(alpha_carbons(system.topology))
    if config.chirality_filter is None:
        return has_centre
    if config.chirality_filter and not has_centre:
        raise ConfigError(
            f"chirality_filter: true, but {config.system.name} has no chiral alpha carbon (an "
            "amino-acid residue with N, CA, C and CB) to filter on; remove the key or set false"
        )
    return config.chirality_filter


def build_run(config: RunConfig) -> Run:
    """Construct the system, coordinates, flow (+ SNF layers), target and filter of a config.

    The flow's weights are drawn with ``config.flow.seed``: the same config builds the same model.

    Raises:
        ConfigError: see `chirality_filter`; SystemLoadError: an unknown system.
    """
    from boltzgen import systems
    from boltzgen.coordinates import InternalCoordinates, is_l_form
    from boltzgen.energy import BoltzmannTarget, OpenMMEnergy, TorchEnergy
    from boltzgen.flows import circular_mask, make_spline_flow
    from boltzgen.sampling.generator import BoltzmannGenerator, FlowSpaceTarget
    from boltzgen.sampling.stochastic import make_snf_layers

    sc = config.system
    system = systems.load(sc.name, solvent=sc.solvent, temperature=sc.temperature)
    use_filter = chirality_filter(config, system)  # before any work
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
    for r in restraint_list(config):
        target = _restrained(target, r, system.n_atoms)
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
    if use_filter:
        topology = system.topology

        def sample_filter(x: Tensor) -> Tensor:
            return is_l_form(x, topology)

    return Run(config, system, coords, model, target, sample_filter)


def _restrained(target: Any, r: Any, n_atoms: int) -> Any:
    """``target`` times the flat-bottomed torsion restraint of a `RestraintConfig`."""
    from boltzgen.energy import TorsionRestraint

    if max(r.atoms) >= n_atoms:
        raise ConfigError(f"restraint.atoms {r.atoms}: the system has {n_atoms} atoms")
    lo, hi = (math.radians(v) for v in r.range)
    return TorsionRestraint(target, r.atoms, lo, hi, r.force_constant)


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


def _check_same_model(
    meta: dict[str, Any],
    config: RunConfig,
    what: str,
    error: type[BoltzgenError],
    any_temperature: bool = False,
    hint: str = "",
) -> None:
    """Raise ``error`` unless checkpoint metadata ``meta`` is of ``config``'s system and model
    sections (`MODEL_SECTIONS`; with ``any_temperature`` the system's temperature may differ)."""
    if meta.get("system") != config.system.name:
        raise error(
            f"{what} is a checkpoint of system {meta.get('system')!r}, not {config.system.name!r}"
        )
    new = config_to_dict(config)
    for section in MODEL_SECTIONS:
        a, b = dict(meta.get("config", {}).get(section) or {}), dict(new[section])
        if any_temperature and section == "system":
            a.pop("temperature", None)
            b.pop("temperature", None)
        if a != b:
            raise error(f"{what} was trained with a different '{section}' section{hint}")


def _check_resumable(config: RunConfig, checkpoint: Path) -> dict[str, Any]:
    """Check that ``checkpoint`` is a run of ``config``'s model; return its metadata."""
    from boltzgen.train import load_checkpoint

    meta = load_checkpoint(checkpoint).get("metadata", {})
    hint = "; resume with the config it was started with"
    _check_same_model(meta, config, str(checkpoint), CheckpointError, hint=hint)
    return meta


def _initial_weights(config: RunConfig, checkpoint: Path) -> tuple[dict[str, Tensor], list | None]:
    """The model weights of ``init_from``, a checkpoint of the same system and model sections
    (the temperature may differ: annealing stages), and the training stages behind them
    (`boltzgen.models.stage_summary` of it and of its own earlier stages, first first), or
    None where those cannot all be found: no record then, rather than an incomplete one."""
    from boltzgen.models import earlier_stages, stage_summary
    from boltzgen.train import load_checkpoint

    old = load_checkpoint(checkpoint)
    what = f"init_from: {checkpoint}"
    _check_same_model(old.get("metadata", {}), config, what, ConfigError, any_temperature=True)
    try:
        before = earlier_stages(checkpoint, old)
    except BoltzgenError:  # its own init_from is gone: the chain cannot be counted
        return old["model"], None
    return old["model"], [*before, stage_summary(checkpoint, old)]


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
    resumed_meta: dict[str, Any] = {}
    if resume:
        resumed_meta = _check_resumable(config, ckpt)
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
    initial, stages = None, None
    if config.init_from is not None and not resume:
        initial, stages = _initial_weights(config, Path(config.init_from))
    elif config.init_from is not None:  # resumed: the stages the first start recorded
        stages = resumed_meta.get("earlier_stages")
    run = build_run(config)
    if initial is not None:
        run.model.load_state_dict(initial)
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
        metadata={
            "system": config.system.name,
            "config": config_to_dict(config),
            **({"earlier_stages": stages} if stages is not None else {}),
        },
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
        """Write a samples ``.npz``, or ``.pdb`` / ``.dcd`` / ``.xtc`` (needs ``system``),
        atomically; the folder is created if missing."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            save_npz(path, **self.arrays())
        elif suffix in TRAJECTORY_SUFFIXES:
            if system is None:
                raise BoltzgenError(f"writing {path.name} needs the system's topology")
            with atomic_path(path) as tmp:
                system.to_mdtraj(self.positions).save(str(tmp))
        else:
            raise BoltzgenError(f"output must end in .npz, .pdb, .dcd or .xtc, got {path.name!r}")
        return path

    def save_weights(self, path: str | Path, frames: str = "the frames") -> Path:
        """Write the importance weights as text, one row per sample in order (``np.loadtxt``
        reads it): ``log_weight`` (unnormalised, nats, toward ``exp(-U/kT)``), ``weight``
        (normalised: sums to 1) and ``energy`` (U, kJ/mol); ``frames`` names the trajectory
        in the header."""
        from boltzgen.analysis.reweighting import normalized_log_weights

        w = np.exp(normalized_log_weights(self.log_weights))
        header = (
            f"boltzgen importance weights of {frames}, one row per frame in order; system "
            f"{self.system}, {self.temperature:g} K\nlog_weight: unnormalised log importance "
            "weight toward exp(-U/kT) (nats); weight: normalised, sums to 1; energy: U in "
            "kJ/mol\nlog_weight weight energy_kj_mol"
        )
        table = np.column_stack([self.log_weights, w, self.energies])
        with atomic_open(path, "w", encoding="utf-8") as fh:
            np.savetxt(fh, table, fmt="%.10g", header=header)
        return Path(path)

    def export(self, path: str | Path, system: MolecularSystem) -> list[Path]:
        """`save` plus what a viewer needs beside it: a topology PDB (the first sample) for an
        ``.npz``, ``.dcd`` or ``.xtc`` (`topology_path`), and the weights (`save_weights`,
        `weights_path`) for a trajectory. Returns the files written, ``path`` first."""
        path = Path(path)
        written = [self.save(path, system)]
        if path.suffix.lower() != ".pdb":
            top = topology_path(path)
            with atomic_path(top) as tmp:
                system.to_mdtraj(self.positions[:1]).save(str(tmp))
            written.append(top)
        if path.suffix.lower() in TRAJECTORY_SUFFIXES:
            written.append(self.save_weights(weights_path(path), path.name))
        return written


#: Trajectory formats `GeneratedSamples.save` writes through mdtraj (frames of positions).
TRAJECTORY_SUFFIXES = (".pdb", ".dcd", ".xtc")


def topology_path(path: str | Path) -> Path:
    """The topology PDB written beside a samples file: ``samples.npz`` ->
    ``samples.topology.pdb``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.topology.pdb")


def weights_path(path: str | Path) -> Path:
    """The weights file written beside a trajectory: ``samples.xtc`` ->
    ``samples.weights.txt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.weights.txt")


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
    run: Run,
    ais: int,
    device: str,
    warmup_rounds: int,
    warmup_batch: int,
    state: dict[str, Tensor] | None = None,
    proposal: torch.nn.Module | None = None,
) -> tuple[Callable[[int], tuple[Tensor, Tensor]], torch.nn.Module]:
    """A function ``b -> (x Cartesian (b, n_atoms, 3), log_w (b,))`` of AIS-refined samples and
    its sampler, adapted by ``warmup_rounds`` discarded batches or given its ``state``. AIS
    starts from the run's flow, or from ``proposal`` (a density on the flow's space, such as a
    `MixtureDensity` of several runs' flows)."""
    from boltzgen.sampling.ais import AnnealedImportanceSampler
    from boltzgen.sampling.generator import flow_space

    space = flow_space(run.model, run.target)
    flow = space.flow if proposal is None else proposal
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

    if state is None:
        for _ in range(warmup_rounds):
            one_batch(warmup_batch)
    else:
        sampler.load_state_dict(state)
    sampler.adapt_rate = 0.0
    return one_batch, sampler


class SamplingInterrupted(Interrupted):
    """`draw_samples` stopped by SIGINT or SIGTERM after the batch in progress.

    Attributes:
        n_done: Valid samples drawn so far.
        n: Samples asked for.
        partial: The progress file written (None: none was asked for).
        samples: The `GeneratedSamples` drawn so far.
    """

    def __init__(
        self, signum: int, samples: GeneratedSamples, n: int, partial: Path | None
    ) -> None:
        super().__init__(signum, f"after {samples.n} of {n} samples")
        self.n_done, self.n, self.partial, self.samples = samples.n, n, partial, samples


def _rng_state(device: torch.device) -> dict[str, np.ndarray]:
    state = {"rng": torch.get_rng_state().numpy()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device).numpy()
    return state


def _set_rng_state(state: dict[str, np.ndarray], device: torch.device) -> None:
    torch.set_rng_state(torch.from_numpy(np.array(state["rng"], dtype=np.uint8)))
    if device.type == "cuda":
        torch.cuda.set_rng_state(torch.from_numpy(np.array(state["rng_cuda"])), device)


def _fingerprint(run: Run, proposal: torch.nn.Module | None = None) -> str:
    """SHA-256 of the run's config and model weights, and of an AIS proposal's state (a
    progress file fits only its run and proposal)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(config_to_dict(run.config), sort_keys=True).encode())
    modules = [run.model] if proposal is None else [run.model, proposal]
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_partial(
    path: Path, settings: dict[str, Any], ais: int
) -> tuple[list[tuple[np.ndarray, ...]], dict[str, int], dict[str, np.ndarray], dict]:
    """Rows, counters, random state and AIS sampler state of a progress file of
    `draw_samples`."""
    import json

    if not path.is_file():
        raise BoltzgenError(f"{path} does not exist: nothing to resume")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        state = json.loads(str(arrays["resume_state"]))
        saved, counters = state["settings"], state["counters"]
    except Exception as exc:  # numpy raises many kinds for corrupt or foreign files
        raise BoltzgenError(f"{path} is not a progress file of boltzgen sample: {exc}") from exc
    for key, value in settings.items():
        if saved.get(key) != value:
            what = (
                "from another checkpoint (or mixture)"
                if key == "run"
                else f"with {key}={saved.get(key)}, not {value}"
            )
            raise BoltzgenError(
                f"{path} was drawn {what}; resume with the same checkpoint and options, or "
                "delete it"
            )
    val = arrays["log_weights"] if ais else arrays["log_q"]
    rows = [(arrays["positions"], val, arrays["energies"])]
    rng = {k: arrays[k] for k in ("rng", "rng_cuda") if k in arrays}
    sampler = {k[4:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("ais.")}
    return rows, counters, rng, sampler


def draw_samples(
    run: Run,
    n: int,
    batch_size: int = 1000,
    ais: int = 0,
    device: str = "cpu",
    seed: int | None = None,
    warmup_rounds: int = 3,
    max_rounds: int = 100,
    partial: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    proposal: torch.nn.Module | None = None,
) -> GeneratedSamples:
    """Draw ``n`` finite (and, with a filter, L-form) weighted samples of a run's model.

    Samples are drawn in rounds, each asking for the samples still missing in batches of
    ``batch_size``. SIGINT (Ctrl-C) or SIGTERM lets the batch in progress finish, writes the
    samples so far with the random state (and the AIS step sizes) to the progress file
    ``partial`` and raises `SamplingInterrupted`; ``resume=True`` continues from that file and
    returns exactly what an uninterrupted call returns.

    Args:
        run: A trained `Run` (`load_run`).
        n: Number of samples.
        batch_size: Samples per batch.
        ais: 0 for plain flow samples (with SNF layers, if any: path weights). K > 0 refines the
            flow's samples by annealed importance sampling toward the Boltzmann density through
            K geometric-path distributions (HMC; step sizes adapted toward 65 % acceptance
            during ``warmup_rounds`` discarded rounds, then frozen, times per-coordinate scales
            set from the spread of the previous batch; SNF layers are skipped). The AIS weights
            are exact for any step size.
        device: Torch device.
        seed: Seed of torch's generator (None: leave it as it is).
        warmup_rounds: AIS step-size adaptation rounds (``min(batch_size, 512)`` chains each).
        max_rounds: Give up after this many rounds without ``n`` valid samples.
        partial: Progress file (``.npz``) written on SIGINT/SIGTERM: a samples file of the
            samples so far with ``partial`` True and the state to resume (None: none written).
        resume: Continue from ``partial``; without it an existing ``partial`` is an error.
        progress: Show a tqdm progress bar.
        proposal: With ``ais``: the density on the run's flow space that AIS starts from
            instead of the run's flow (`draw_mixture` passes a `MixtureDensity`).

    Raises:
        BoltzgenError: ``n``, ``batch_size`` or ``ais`` out of range, too few valid samples, or
            a progress file that is missing (``resume``), present (not ``resume``) or of another
            run or settings.
        SamplingInterrupted: SIGINT or SIGTERM, after the batch in progress.
    """
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise BoltzgenError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
    if ais < 0:
        raise BoltzgenError(f"ais must be >= 0, got {ais}")
    if proposal is not None and not ais:
        raise BoltzgenError("a proposal density is what AIS starts from: it needs ais > 0")
    partial = None if partial is None else Path(partial)
    if resume and partial is None:
        raise BoltzgenError("resume needs the progress file (partial=...)")
    dev = torch.device(device)
    settings = {
        "n": n,
        "batch_size": batch_size,
        "ais": ais,
        "seed": seed,
        "warmup_rounds": warmup_rounds,
        "device": str(dev),
        "run": None if partial is None else _fingerprint(run, proposal),
    }
    # rows: (positions float32, value, energies) per batch; value: log q, or AIS log-weights
    rows: list[tuple[np.ndarray, ...]] = []
    counters = {"n_nonfinite": 0, "n_filtered": 0, "rounds": 0, "left": 0}
    sampler_state = None
    if resume:
        rows, counters, rng, sampler_state = _read_partial(partial, settings, ais)
    else:
        if partial is not None and partial.exists():
            raise BoltzgenError(
                f"{partial} exists (an interrupted run); resume it (--resume) or delete it"
            )
        if seed is not None:
            torch.manual_seed(seed)
    model = run.model.to(device)
    model.eval()
    energy = run.target.energy.to(device)
    sampler = None
    if ais:
        warmup = (warmup_rounds, min(batch_size, 512))
        ais_batch, sampler = _ais_batches(run, ais, device, *warmup, sampler_state, proposal)
    if resume:
        _set_rng_state(rng, dev)

    def result(rows: list[tuple[np.ndarray, ...]], limit: int | None = None) -> GeneratedSamples:
        x, val, u = (np.concatenate([r[i] for r in rows])[:limit] for i in range(3))
        reduced = (torch.from_numpy(u) / run.target.kT).numpy()
        log_q, log_w = (-reduced - val, val) if ais else (val, -reduced - val)
        return GeneratedSamples(
            positions=x,
            log_q=log_q,
            energies=u,
            log_weights=log_w,
            temperature=float(run.system.temperature),
            system=run.config.system.name,
            n_nonfinite=counters["n_nonfinite"],
            n_filtered=counters["n_filtered"],
            ais_intermediate=ais,
        )

    got = sum(len(r[2]) for r in rows)
    bar = tqdm(total=n, initial=min(got, n), disable=not progress, unit="sample", desc="sample")
    with deferred_signals() as received:
        try:
            while got < n:
                if counters["left"] == 0:
                    if counters["rounds"] == max_rounds:
                        raise BoltzgenError(
                            f"only {got} of {n} samples were valid after {max_rounds} rounds"
                        )
                    counters["rounds"] += 1
                    counters["left"] = n - got
                b = min(batch_size, counters["left"])
                counters["left"] -= b
                if ais:
                    x, val = ais_batch(b)  # val: AIS log-weights
                else:
                    with torch.no_grad():
                        x, val = model.sample(b)  # val: log q
                with torch.no_grad():
                    x, val, u, bad, filt = _valid_rows(run, energy, x, val, batch_size)
                counters["n_nonfinite"] += bad
                counters["n_filtered"] += filt
                rows.append((x.numpy().astype(np.float32), val.numpy(), u.numpy()))
                bar.update(min(len(u), n - got))
                got += len(u)
                if received:
                    drawn = result(rows)
                    if partial is not None:
                        _write_partial(partial, drawn, settings, counters, sampler, dev)
                    raise SamplingInterrupted(received.signum, drawn, n, partial)
        finally:
            bar.close()
    return result(rows, n)


def _write_partial(
    path: Path,
    drawn: GeneratedSamples,
    settings: dict[str, Any],
    counters: dict[str, int],
    sampler: torch.nn.Module | None,
    device: torch.device,
) -> None:
    """The progress file of `draw_samples`: the samples so far and the state to resume (the
    random state, the AIS sampler's step sizes, which it keeps adapting to each batch)."""
    import json

    state = {"settings": settings, "counters": counters}
    ais = {} if sampler is None else sampler.state_dict()
    save_npz(
        path,
        **drawn.arrays(),
        partial=np.bool_(True),
        resume_state=np.str_(json.dumps(state)),
        **_rng_state(device),
        **{f"ais.{k}": v.cpu().numpy() for k, v in ais.items()},
    )


def with_overrides(config: RunConfig, **train_overrides: Any) -> RunConfig:
    """``config`` with ``train`` fields replaced (None values are ignored); ``output_dir`` too."""
    out = train_overrides.pop("output_dir", None)
    t = replace(config.train, **{k: v for k, v in train_overrides.items() if v is not None})
    config = replace(config, train=t)
    return config if out is None else replace(config, output_dir=str(out))


# ---------------------------------------------------------------------------- mixture sampling
def draw_mixture(
    runs: Sequence[Run],
    fractions: Sequence[float],
    n: int,
    batch_size: int = 1000,
    device: str = "cpu",
    seed: int | None = None,
    progress: bool = False,
    ais: int = 0,
    partial: str | Path | None = None,
    resume: bool = False,
) -> GeneratedSamples:
    """Flow samples of several runs of one system, weighted as one mixture proposal.

    Run ``k`` draws ``round(fractions[k] n)`` samples (the first run the rest), and every sample
    gets the weight ``p(x) / sum_k f_k q_k(x)``, every run's density evaluated at every sample
    (the balance heuristic of multiple importance sampling, Veach & Guibas 1995). The weights
    are exact for any fractions; a run trained on one basin (a `restraint` config) fixes that
    basin's weight, which a single mode-seeking flow misses, and costs the others little when
    its fraction is near the basin's population.

    With ``ais`` K > 0 the mixture is AIS's starting density instead: each sample's component
    is drawn from the fractions (iid mixture samples), and `draw_samples` refines them toward
    the Boltzmann density through K intermediate distributions between the mixture's density
    ``sum_k f_k q_k(y)`` and the target, all on the runs' common flow space (the runs must share
    their coordinate transform: same system, coordinate settings and reference).

    Args:
        runs: Trained runs of one system and temperature, without SNF layers (their density
            is stochastic).
        fractions: Share of the samples of each run, positive, summing to 1.
        n: Number of samples; batch_size, device: as in `draw_samples`.
        seed: Run ``k`` draws with seed ``seed + k`` (None: torch's generator as it is); with
            ``ais``, torch's generator is seeded once with ``seed``.
        progress: A tqdm progress bar for each run's draws.
        ais: AIS intermediate distributions (0: plain mixture samples).
        partial, resume: With ``ais``, the progress file and resumption of `draw_samples`
            (the file fits only these runs and fractions); plain mixture draws take neither.

    Returns:
        `GeneratedSamples` whose ``log_q`` is the mixture's log density (with ``ais``, as in
        `draw_samples`: ``-u/kT - log_w``).

    Raises:
        BoltzgenError: mismatched runs or fractions; with ``ais``, runs whose coordinate
            transforms differ.
    """
    if len(runs) != len(fractions) or not runs:
        raise BoltzgenError("draw_mixture needs one fraction per run")
    if not all(f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise BoltzgenError(f"mixture fractions must be positive and sum to 1, got {fractions}")
    first = runs[0]
    for run in runs:
        if run.config.system.name != first.config.system.name:
            raise BoltzgenError("mixture components must be runs of the same system")
        if run.system.temperature != first.system.temperature:
            raise BoltzgenError("mixture components must be runs at the same temperature")
        if len(getattr(run.model, "stochastic", ())):
            raise BoltzgenError("mixture components cannot have SNF layers")
    if ais:
        from boltzgen.sampling.generator import MixtureDensity, flow_space

        _check_same_coordinates(runs)
        for run in runs:
            run.model.to(device).eval()
        flows = [flow_space(run.model, run.target).flow for run in runs]
        mixture = MixtureDensity(flows, fractions).to(device)
        return draw_samples(
            first,
            n,
            batch_size,
            ais=ais,
            device=device,
            seed=seed,
            partial=partial,
            resume=resume,
            progress=progress,
            proposal=mixture,
        )
    if partial is not None or resume:
        raise BoltzgenError("a plain mixture draw keeps no progress file (it needs ais > 0)")
    counts = [round(f * n) for f in fractions]
    counts[0] = n - sum(counts[1:])
    if counts[0] < 1:
        raise BoltzgenError(f"the first run's share of {n} samples is empty")
    parts = [
        draw_samples(
            run,
            m,
            batch_size,
            device=device,
            seed=None if seed is None else seed + k,
            progress=progress,
        )
        for k, (run, m) in enumerate(zip(runs, counts, strict=True))
        if m > 0
    ]
    x = np.concatenate([p.positions for p in parts])
    u = np.concatenate([p.energies for p in parts])
    log_q = []
    with torch.no_grad():
        for run in runs:
            dtype = next(run.model.parameters()).dtype
            model = run.model.to(device)
            rows = [
                model.log_prob(xb.to(device=device, dtype=dtype)).double().cpu()
                for xb in torch.from_numpy(x).split(batch_size)
            ]
            log_q.append(torch.cat(rows))
    log_f = torch.log(torch.tensor(list(fractions), dtype=torch.float64))[:, None]
    log_mix = torch.logsumexp(log_f + torch.stack(log_q), 0).numpy()
    return GeneratedSamples(
        positions=x,
        log_q=log_mix,
        energies=u,
        log_weights=-u / first.target.kT - log_mix,
        temperature=float(first.system.temperature),
        system=first.config.system.name,
        n_nonfinite=sum(p.n_nonfinite for p in parts),
        n_filtered=sum(p.n_filtered for p in parts),
    )


def _check_same_coordinates(runs: Sequence[Run]) -> None:
    """Raise `BoltzgenError` unless all runs map the same flow space to Cartesians."""
    first = runs[0].model.coordinates
    ref = first.state_dict()
    for run in runs[1:]:
        coords = run.model.coordinates
        other = coords.state_dict()
        same = (
            type(coords) is type(first)
            and getattr(coords, "domains", None) == getattr(first, "domains", None)
            and set(other) == set(ref)
            and all(torch.equal(other[k].cpu(), ref[k].cpu()) for k in ref)
        )
        if not same:
            raise BoltzgenError(
                "AIS with a mixture needs components with one coordinate transform (same "
                "system, coordinate settings and reference structure); these differ"
            )


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
