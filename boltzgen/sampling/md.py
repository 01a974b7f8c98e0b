"""Molecular dynamics references: Langevin MD and temperature replica exchange with OpenMM.

`run_md` integrates a `MolecularSystem` with OpenMM's `LangevinMiddleIntegrator` (BAOAB-like,
accurate configurational sampling). With a temperature ladder it runs parallel tempering
(replica exchange, Swendsen & Wang 1986; Sugita & Okamoto 1999): one context per temperature,
neighbour swaps attempted every `exchange_interval` steps with the Metropolis probability
``min(1, exp((beta_i - beta_j) (U_i - U_j)))``, alternating even and odd pairs. Only frames of the
replica at the system's temperature are kept, so the output is a Boltzmann sample at that
temperature that also visits basins the plain run would rarely reach.

When heating is not enough (ALDP's phi > 0 basins are rarely entered even at 800 K), replicas can
instead differ in a `TorsionBias`: Hamiltonian replica exchange (Sugita, Kitao & Okamoto 2000;
Fukunishi et al. 2002) with replica ``k`` feeling ``U(x) + s_k B(x)``, where ``B`` is a smooth
well on one torsion that lowers its barrier. Swaps are accepted with
``min(1, exp(-(u_i(x_j) + u_j(x_i) - u_i(x_i) - u_j(x_j))))``, ``u_k = (U + s_k B) / (k_B T_k)``.
The least biased replica at the system temperature is kept. With ``s = 0`` its frames are an exact
Boltzmann sample with equal weights; with ``s > 0`` (e.g. one biased replica: umbrella sampling)
each frame carries the importance log-weight ``s B(x) / kT`` that
`boltzgen.analysis.reweighting` uses to recover unbiased averages, and the recorded energies
are the physical ``U(x)``.

The run is checkpointed: every `checkpoint_interval` steps the OpenMM state of every replica, the
frames saved so far, the exchange statistics and the random state are written atomically to one
``.npz``. Calling `run_md` again with the same checkpoint path resumes where it stopped, exactly
(the OpenMM checkpoints carry the integrators' random states). SIGINT (Ctrl-C) or SIGTERM lets
the chunk in progress (and its exchange) finish, writes the checkpoint at that step and raises
`MDInterrupted` with the frames so far.

Units: nm, kJ/mol, K, ps. Heavy imports (openmm, mdtraj, tqdm) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.errors import MDError
from boltzgen.files import atomic_path, save_npz
from boltzgen.interrupts import Interrupted, deferred_signals
from boltzgen.units import MOLAR_GAS_CONSTANT

__all__ = [
    "MDError",
    "MDInterrupted",
    "MDResult",
    "TorsionBias",
    "backbone_dihedrals",
    "platform_names",
    "run_md",
    "write_outputs",
]


@dataclass(frozen=True)
class TorsionBias:
    """A von Mises well on one torsion: ``B(theta) = -height exp(kappa (cos(theta - center) - 1))``.

    Attributes:
        atoms: The four atom indices of the torsion.
        height: Depth of the well at `center`, kJ/mol.
        center: Centre, radians.
        kappa: Concentration (larger: narrower; width about ``1 / sqrt(kappa)`` rad).
    """

    atoms: tuple[int, int, int, int]
    height: float
    center: float = 0.0
    kappa: float = 1.0

    def energy(self, positions: np.ndarray) -> np.ndarray:
        """``B`` of `(n, n_atoms, 3)` positions (nm), `(n,)` kJ/mol."""
        from boltzgen.analysis import dihedral

        theta = dihedral(positions, self.atoms)
        return -self.height * np.exp(self.kappa * (np.cos(theta - self.center) - 1.0))

    def force(self) -> Any:
        """An `openmm.CustomTorsionForce` with global parameter ``bias_scale``."""
        import openmm

        f = openmm.CustomTorsionForce("-bias_scale*height*exp(kappa*(cos(theta-center)-1))")
        f.addGlobalParameter("bias_scale", 0.0)
        for name, value in (
            ("height", self.height),
            ("kappa", self.kappa),
            ("center", self.center),
        ):
            f.addGlobalParameter(name, value)
        f.addTorsion(*[int(a) for a in self.atoms], [])
        return f

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        return {
            "atoms": [int(a) for a in self.atoms],
            "height": self.height,
            "center": self.center,
            "kappa": self.kappa,
        }


@dataclass
class MDResult:
    """Frames of an MD run at the system temperature.

    Attributes:
        positions: `(n_frames, n_atoms, 3)` nm, float32.
        energies: `(n_frames,)` potential energies, kJ/mol.
        time_ps: `(n_frames,)` simulation time of each frame at the target temperature, ps.
        temperature: The sampled temperature, K.
        temperatures: The ladder (one entry for plain MD), K.
        acceptance: Exchange acceptance rate of each neighbour pair, `(n_replicas - 1,)`.
        n_steps: Steps completed per replica.
        settings: The settings of the run (JSON-serialisable).
        bias_scales: Bias scale of each replica.
        log_weights: `(n_frames,)` importance log-weights ``s B(x) / kT`` when the kept replica
            is biased (``s > 0``), else None (equal weights).
    """

    positions: np.ndarray
    energies: np.ndarray
    time_ps: np.ndarray
    temperature: float
    temperatures: list[float]
    acceptance: np.ndarray
    n_steps: int
    settings: dict[str, Any] = field(default_factory=dict)
    bias_scales: list[float] = field(default_factory=list)
    log_weights: np.ndarray | None = None


class MDInterrupted(Interrupted):
    """`run_md` stopped by SIGINT or SIGTERM after the chunk in progress.

    Attributes:
        step: Steps done per replica; the checkpoint (if any) is at this step.
        n_steps: Steps the run was asked for.
        checkpoint: The checkpoint written at `step` (None: the run had none).
        result: The `MDResult` of the frames saved so far.
    """

    def __init__(
        self, signum: int, step: int, n_steps: int, checkpoint: Path | None, result: MDResult
    ) -> None:
        super().__init__(signum, f"at step {step} of {n_steps}")
        self.step, self.n_steps, self.checkpoint, self.result = step, n_steps, checkpoint, result


def backbone_dihedrals(system: Any, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The backbone torsions of a peptide per frame, by CV name (radians, in [-pi, pi)).

    Names as `boltzgen.coordinates.backbone_cvs`: ``phi``/``psi`` for a molecule with one of
    each (alanine dipeptide), else ``phi_<n>``/``psi_<n>`` by residue number.

    Args:
        system: A `MolecularSystem`.
        positions: `(n_frames, n_atoms, 3)` nm.

    Returns:
        CV name -> `(n_frames,)`; empty if the molecule has no peptide backbone.
    """
    import torch

    from boltzgen.coordinates import backbone_cvs, named_dihedrals

    x = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    return {k: v.numpy() for k, v in named_dihedrals(x, backbone_cvs(system.topology)).items()}


def platform_names() -> list[str]:
    """The OpenMM platforms this machine can run (``Reference``, ``CPU``, ``CUDA``, ...)."""
    import openmm

    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def _platform(name: str, threads: int) -> tuple[Any, dict[str, str]]:
    import openmm

    try:
        platform = openmm.Platform.getPlatformByName(name)
    except Exception as exc:  # OpenMMException
        raise MDError(f"OpenMM platform {name!r} is not available: {exc}") from exc
    props = {"Threads": str(threads)} if name == "CPU" and threads > 0 else {}
    return platform, props


def _check_settings(
    n_steps: int,
    save_interval: int,
    exchange_interval: int,
    temperatures: list[float],
    scales: list[float],
    t0: float,
    timestep: float,
    friction: float,
) -> int:
    if not timestep > 0 or not friction >= 0:
        raise MDError(f"need timestep > 0 ps and friction >= 0 /ps, got {timestep}, {friction}")
    if n_steps <= 0 or save_interval <= 0 or exchange_interval <= 0:
        raise MDError("n_steps, save_interval and exchange_interval must be positive")
    if any(t <= 0 for t in temperatures):
        raise MDError(f"temperatures must be positive, got {temperatures}")
    matches = [i for i, t in enumerate(temperatures) if abs(t - t0) < 1e-6]
    if not matches:
        raise MDError(
            f"the ladder {temperatures} must contain a replica at the system temperature {t0} K"
        )
    return min(matches, key=lambda i: scales[i])


def _ladders(
    t0: float, temperatures: list[float] | None, bias: Any, bias_scales: list[float] | None
) -> tuple[list[float], list[float]]:
    temps = [float(t) for t in temperatures] if temperatures else None
    scales = [float(b) for b in bias_scales] if bias_scales else None
    if scales is not None and bias is None:
        raise MDError("bias_scales need a bias")
    if temps and scales and len(temps) != len(scales):
        raise MDError(f"{len(temps)} temperatures but {len(scales)} bias scales")
    n = len(temps or scales or [t0])
    return temps or [t0] * n, scales or [0.0] * n


def run_md(
    system: Any,
    n_steps: int,
    *,
    save_interval: int = 100,
    timestep: float = 0.001,
    friction: float = 1.0,
    temperatures: list[float] | None = None,
    bias: TorsionBias | None = None,
    bias_scales: list[float] | None = None,
    exchange_interval: int = 500,
    seed: int = 0,
    platform: str = "CPU",
    threads: int = 1,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_interval: int = 100_000,
    minimize: bool = True,
    progress: bool = True,
) -> MDResult:
    """Langevin MD, or temperature replica exchange, of a molecular system.

    Args:
        system: A `MolecularSystem` (its temperature is the one sampled).
        n_steps: Integration steps per replica.
        save_interval: Steps between saved frames.
        timestep: Time step, ps (1 fs without constraints).
        friction: Langevin collision rate, 1/ps.
        temperatures: Replica-exchange ladder in K containing `system.temperature`; None or one
            entry for plain MD.
        bias: Torsion bias of Hamiltonian replica exchange.
        bias_scales: Bias scale of each replica (0 = unbiased), same length as `temperatures`
            if both are given.
        exchange_interval: Steps between exchange attempts.
        seed: Seed of the integrators' and the exchanges' random numbers and initial velocities.
        platform: OpenMM platform name (``CPU``, ``Reference``, ``CUDA``, ...).
        threads: CPU threads per context (CPU platform only).
        checkpoint: Path of a checkpoint ``.npz``; an existing one is resumed.
        checkpoint_interval: Steps between checkpoints (also written at the end and when a
            signal stops the run).
        minimize: Minimise the energy before the run (ignored when resuming).
        progress: Show a tqdm progress bar.

    Returns:
        An `MDResult` with the frames at `system.temperature`.

    Raises:
        MDError: Bad settings, a checkpoint of other settings, or a run that blew up.
        MDInterrupted: SIGINT or SIGTERM; the chunk in progress (``gcd`` of the save, exchange
            and checkpoint intervals) was finished and the checkpoint written at its end.
    """
    import openmm
    import openmm.unit as u

    t0 = float(system.temperature)
    ladder, scales = _ladders(t0, temperatures, bias, bias_scales)
    target = _check_settings(
        n_steps, save_interval, exchange_interval, ladder, scales, t0, timestep, friction
    )
    n_rep = len(ladder)
    settings = {
        "system": system.name,
        "n_steps": int(n_steps),
        "save_interval": int(save_interval),
        "timestep_ps": float(timestep),
        "friction_per_ps": float(friction),
        "temperatures": ladder,
        "bias": bias.as_dict() if bias is not None else None,
        "bias_scales": scales,
        "exchange_interval": int(exchange_interval),
        "seed": int(seed),
        "platform": platform,
        "threads": int(threads),
    }
    plat, props = _platform(platform, threads)
    contexts, integrators = [], []
    for k, temp in enumerate(ladder):
        integ = openmm.LangevinMiddleIntegrator(
            temp * u.kelvin, friction / u.picosecond, timestep * u.picoseconds
        )
        integ.setRandomNumberSeed(int(seed) * 1000 + k + 1)
        omm_system = system.system
        if bias is not None:
            omm_system = openmm.XmlSerializer.clone(system.system)
            omm_system.addForce(bias.force())
        ctx = openmm.Context(omm_system, integ, plat, props)
        if bias is not None:
            ctx.setParameter("bias_scale", scales[k])
        integrators.append(integ)
        contexts.append(ctx)
    rng = np.random.default_rng(seed)
    step = 0
    frames: list[np.ndarray] = []
    energies: list[float] = []
    times: list[float] = []
    log_ws: list[float] = []
    attempts = np.zeros(max(n_rep - 1, 0), dtype=np.int64)
    accepts = np.zeros_like(attempts)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        step = _restore(
            ckpt, settings, contexts, frames, energies, times, log_ws, attempts, accepts, rng
        )
    else:
        for k, ctx in enumerate(contexts):
            ctx.setPositions(system.positions * u.nanometer)
            if minimize and k == 0:
                openmm.LocalEnergyMinimizer.minimize(ctx)
            if k > 0:
                ctx.setPositions(contexts[0].getState(getPositions=True).getPositions())
            ctx.setVelocitiesToTemperature(ladder[k] * u.kelvin, int(seed) * 1000 + k + 1)
    if step > n_steps:
        raise MDError(f"checkpoint {ckpt} is at step {step}, beyond n_steps={n_steps}")
    chunk = math.gcd(
        math.gcd(save_interval, exchange_interval if n_rep > 1 else save_interval),
        checkpoint_interval,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=step, unit="step", desc=f"md {system.name}")

    def result() -> MDResult:
        return MDResult(
            positions=np.asarray(frames, dtype=np.float32).reshape(-1, system.n_atoms, 3),
            energies=np.asarray(energies, dtype=np.float64),
            time_ps=np.asarray(times, dtype=np.float64),
            temperature=t0,
            temperatures=ladder,
            acceptance=accepts / np.maximum(attempts, 1),
            bias_scales=scales,
            n_steps=step,
            settings=settings,
            log_weights=np.asarray(log_ws) if scales[target] != 0.0 else None,
        )

    with deferred_signals() as received:
        try:
            while step < n_steps:
                n = min(chunk, n_steps - step)
                for integ in integrators:
                    integ.step(n)
                step += n
                if n_rep > 1 and step % exchange_interval == 0:
                    _exchange(
                        contexts,
                        ladder,
                        scales,
                        bias,
                        step // exchange_interval,
                        rng,
                        attempts,
                        accepts,
                    )
                if step % save_interval == 0:
                    state = contexts[target].getState(getPositions=True, getEnergy=True)
                    frames.append(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
                    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
                    if scales[target] != 0.0:
                        b = float(bias.energy(frames[-1][None])[0]) * scales[target]
                        energy -= b  # the physical energy U(x)
                        log_ws.append(b / (MOLAR_GAS_CONSTANT * t0))
                    energies.append(energy)
                    times.append(step * timestep)
                    if not np.isfinite(energies[-1]):
                        raise MDError(f"the simulation blew up at step {step} (energy {energy})")
                due = step % checkpoint_interval == 0 or step == n_steps or received
                if ckpt is not None and due:
                    _save_checkpoint(
                        ckpt,
                        settings,
                        step,
                        contexts,
                        frames,
                        energies,
                        times,
                        log_ws,
                        attempts,
                        accepts,
                        rng,
                    )
                if bar is not None:
                    bar.update(n)
                    if n_rep > 1:
                        acc = accepts / np.maximum(attempts, 1)
                        bar.set_postfix(acc=",".join(f"{a:.2f}" for a in acc))
                if received:
                    raise MDInterrupted(received.signum, step, n_steps, ckpt, result())
        finally:
            if bar is not None:
                bar.close()
    return result()


def _exchange(
    contexts: list[Any],
    ladder: list[float],
    scales: list[float],
    bias: TorsionBias | None,
    round_index: int,
    rng: np.random.Generator,
    attempts: np.ndarray,
    accepts: np.ndarray,
) -> None:
    """Attempt swaps between neighbours (even pairs on even rounds, odd pairs on odd rounds)."""
    import openmm.unit as u

    states = [c.getState(getPositions=True, getVelocities=True, getEnergy=True) for c in contexts]
    pot = np.array([s.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) for s in states])
    b = np.zeros_like(pot)
    if bias is not None:
        xs = np.stack([s.getPositions(asNumpy=True).value_in_unit(u.nanometer) for s in states])
        b = bias.energy(xs)
    phys = pot - np.asarray(scales) * b  # U(x_k) without the replica's own bias
    # reduced[k, x]: configuration of replica x in the Hamiltonian and temperature of replica k.
    reduced = (phys[None, :] + np.asarray(scales)[:, None] * b[None, :]) / (
        MOLAR_GAS_CONSTANT * np.asarray(ladder)[:, None]
    )
    for i in range(round_index % 2, len(contexts) - 1, 2):
        j = i + 1
        log_acc = -(reduced[i, j] + reduced[j, i] - reduced[i, i] - reduced[j, j])
        attempts[i] += 1
        if log_acc >= 0 or rng.random() < math.exp(log_acc):
            accepts[i] += 1
            vi = states[i].getVelocities(asNumpy=True)
            vj = states[j].getVelocities(asNumpy=True)
            contexts[i].setPositions(states[j].getPositions(asNumpy=True))
            contexts[j].setPositions(states[i].getPositions(asNumpy=True))
            contexts[i].setVelocities(vj * math.sqrt(ladder[i] / ladder[j]))
            contexts[j].setVelocities(vi * math.sqrt(ladder[j] / ladder[i]))


def _save_checkpoint(
    path: Path,
    settings: dict[str, Any],
    step: int,
    contexts: list[Any],
    frames: list[np.ndarray],
    energies: list[float],
    times: list[float],
    log_ws: list[float],
    attempts: np.ndarray,
    accepts: np.ndarray,
    rng: np.random.Generator,
) -> None:
    arrays = {
        "settings": np.array(json.dumps(settings)),
        "step": np.array(step),
        "positions": np.asarray(frames, dtype=np.float32),
        "energies": np.asarray(energies, dtype=np.float64),
        "time_ps": np.asarray(times, dtype=np.float64),
        "log_weights": np.asarray(log_ws, dtype=np.float64),
        "attempts": attempts,
        "accepts": accepts,
        "rng_state": np.array(json.dumps(rng.bit_generator.state)),
    }
    for k, ctx in enumerate(contexts):
        arrays[f"openmm_state_{k}"] = np.frombuffer(ctx.createCheckpoint(), dtype=np.uint8)
    save_npz(path, **arrays)


def _restore(
    path: Path,
    settings: dict[str, Any],
    contexts: list[Any],
    frames: list[np.ndarray],
    energies: list[float],
    times: list[float],
    log_ws: list[float],
    attempts: np.ndarray,
    accepts: np.ndarray,
    rng: np.random.Generator,
) -> int:
    try:
        data = np.load(path)
        saved = json.loads(str(data["settings"]))
    except Exception as exc:
        raise MDError(f"cannot read checkpoint {path}: {exc}") from exc
    keys = (
        "system",
        "save_interval",
        "timestep_ps",
        "temperatures",
        "exchange_interval",
        "seed",
        "bias",
        "bias_scales",
    )
    defaults = {"bias": None, "bias_scales": [0.0] * len(settings["temperatures"])}
    for key in keys:
        if saved.get(key, defaults.get(key)) != settings[key]:
            raise MDError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r}, "
                f"not {settings[key]!r}; use the same settings, another checkpoint path or "
                "delete it"
            )
    for k, ctx in enumerate(contexts):
        ctx.loadCheckpoint(data[f"openmm_state_{k}"].tobytes())
    frames.extend(list(data["positions"]))
    energies.extend(data["energies"].tolist())
    times.extend(data["time_ps"].tolist())
    if "log_weights" in data.files:
        log_ws.extend(data["log_weights"].tolist())
    attempts[:] = data["attempts"]
    accepts[:] = data["accepts"]
    rng.bit_generator.state = json.loads(str(data["rng_state"]))
    return int(data["step"])


def write_outputs(system: Any, result: MDResult, prefix: str | os.PathLike) -> dict[str, str]:
    """Write ``<prefix>.dcd`` + ``<prefix>.pdb`` (trajectory) and ``<prefix>.npz`` (samples file).

    The npz is a boltzgen samples file: ``positions`` (float32 nm), ``energies`` (kJ/mol),
    ``temperature`` (K), ``system``, ``time_ps``, and the backbone torsions of peptides
    (radians, by CV name: ``phi``/``psi`` for alanine dipeptide, ``phi_<n>``/``psi_<n>`` else);
    ``log_weights`` only when the kept replica was biased (unbiased MD frames have equal weights);
    ``partial`` is True when the run stopped before the steps it was asked for (`MDInterrupted`).
    Every file is written atomically.

    Returns:
        The written paths by kind (``dcd``, ``pdb``, ``npz``).
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    traj = system.to_mdtraj(result.positions)
    paths = {"dcd": str(prefix) + ".dcd", "pdb": str(prefix) + ".pdb", "npz": str(prefix) + ".npz"}
    if result.positions.shape[0] > 0:
        with atomic_path(paths["dcd"]) as tmp:
            traj.save_dcd(str(tmp))
        with atomic_path(paths["pdb"]) as tmp:
            traj[0].save_pdb(str(tmp))
    else:
        with atomic_path(paths["pdb"]) as tmp:
            system.to_mdtraj().save_pdb(str(tmp))
        paths.pop("dcd")
    arrays = {
        "positions": result.positions.astype(np.float32),
        "energies": result.energies,
        "time_ps": result.time_ps,
        "temperature": np.array(result.temperature),
        "system": np.array(system.name),
        "settings": np.array(json.dumps(result.settings)),
        "acceptance": result.acceptance,
        "partial": np.bool_(result.n_steps < result.settings.get("n_steps", result.n_steps)),
    }
    if result.log_weights is not None:
        arrays["log_weights"] = result.log_weights
    if result.positions.shape[0] > 0:
        arrays.update(backbone_dihedrals(system, result.positions))
    save_npz(paths["npz"], **arrays)
    return paths
