"""Typed run configurations and their YAML form (the CLI's entry; the library never reads YAML).

A run config has the sections ``system``, ``coordinates``, ``flow``, ``snf``, ``train``, ``fab``
and the keys ``output_dir``, ``chirality_filter`` and ``data``. Unknown keys are errors that name
the key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from boltzgen.errors import BoltzgenError, ConfigError
from boltzgen.train import TrainOptions
from boltzgen.train.fab import FABOptions

__all__ = [
    "ConfigError",
    "CoordinatesConfig",
    "FlowConfig",
    "RunConfig",
    "SNFConfig",
    "SystemConfig",
    "config_from_dict",
    "config_path",
    "config_to_dict",
    "load_config",
]


@dataclass
class SystemConfig:
    """Which molecule, solvent model, temperature (K) and energy implementation."""

    name: str = "aldp"
    solvent: str = "implicit"
    temperature: float = 300.0
    energy: str = "torch"

    def __post_init__(self) -> None:
        if self.energy not in ("torch", "openmm"):
            raise ConfigError(f"system.energy must be 'torch' or 'openmm', got {self.energy!r}")
        if self.solvent not in ("implicit", "vacuum"):
            raise ConfigError(f"system.solvent must be implicit or vacuum, got {self.solvent!r}")


@dataclass
class CoordinatesConfig:
    """Internal coordinates: shifts from the (optionally energy-minimized) structure."""

    minimize: bool = True
    torsions: str = "relative"


@dataclass
class RestraintConfig:
    """A flat-bottomed restraint on one torsion (`boltzgen.energy.TorsionRestraint`).

    Attributes:
        atoms: Four zero-based atom indices (ALDP's phi: 4, 6, 8, 14).
        range: ``[lo, hi]`` degrees, the flat bottom (circular: ``[150, 210]`` wraps).
        force_constant: kT per rad^2 outside the range.
    """

    atoms: list
    range: list
    force_constant: float = 50.0

    def __post_init__(self) -> None:
        a, r = self.atoms, self.range
        if not (isinstance(a, list) and len(a) == 4 and all(_is_int(i) and i >= 0 for i in a)):
            raise ConfigError(f"restraint.atoms must be four atom indices >= 0, got {a!r}")
        if len(set(a)) != 4:
            raise ConfigError(f"restraint.atoms must be four different atoms, got {a!r}")
        if not (isinstance(r, list) and len(r) == 2 and all(_is_number(v) for v in r)):
            raise ConfigError(f"restraint.range must be [lo, hi] in degrees, got {r!r}")
        if not 0 < r[1] - r[0] < 360:
            raise ConfigError(f"restraint.range needs 0 < hi - lo < 360 degrees, got {r!r}")
        if not self.force_constant > 0:
            raise ConfigError(f"restraint.force_constant must be > 0, got {self.force_constant}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass
class FlowConfig:
    """Arguments of `boltzgen.flows.make_spline_flow` (FAB's ALDP architecture by default)."""

    n_blocks: int = 12
    n_bins: int = 8
    hidden: int = 256
    n_res_blocks: int = 1
    layer_type: str = "coupling"
    mixing: str | None = None
    circular_shift: bool = True
    actnorm: bool = False
    tail_bound: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer_type not in LAYER_TYPES:
            raise ConfigError(
                f"flow.layer_type must be one of {', '.join(LAYER_TYPES)}, got {self.layer_type!r}"
            )
        if self.mixing not in MIXINGS:
            raise ConfigError(
                f"flow.mixing must be one of {', '.join(map(str, MIXINGS))} (null: none), "
                f"got {self.mixing!r}"
            )
        if min(self.n_blocks, self.n_bins, self.hidden, self.n_res_blocks) < 1:
            raise ConfigError("flow: n_blocks, n_bins, hidden and n_res_blocks must be >= 1")
        if not self.tail_bound > 0:
            raise ConfigError(f"flow.tail_bound must be positive, got {self.tail_bound}")


#: Values of ``flow.layer_type`` and ``flow.mixing`` (`boltzgen.flows.make_spline_flow`).
LAYER_TYPES = ("coupling", "autoregressive", "affine_coupling", "maf")
MIXINGS = (None, "reverse", "permute", "lu")


@dataclass
class SNFConfig:
    """Stochastic (SNF) layers after the flow, in its space (`boltzgen.sampling.stochastic`).

    ``n_layers`` layers of ``kind`` anneal from the flow's own density to the target
    (``lambdas: linear``) or all target the target (``one``); ``n_layers: 0`` means none.
    Step sizes are in the flow's (normalised internal-coordinate) units.
    """

    n_layers: int = 0
    kind: str = "mala"
    n_steps: int = 1
    step_size: float = 0.01
    n_leapfrog: int = 5
    lambdas: str = "linear"
    adaptive: bool = True
    target_acceptance: float | None = None
    second_order: bool = False

    def __post_init__(self) -> None:
        from boltzgen.sampling.stochastic import LAYER_KINDS

        if self.kind not in LAYER_KINDS:
            kinds = ", ".join(LAYER_KINDS)
            raise ConfigError(f"snf.kind must be one of {kinds}, got {self.kind!r}")
        if self.lambdas not in ("linear", "one"):
            raise ConfigError(f"snf.lambdas must be 'linear' or 'one', got {self.lambdas!r}")
        if self.n_layers < 0 or self.n_steps < 1 or self.n_leapfrog < 1:
            raise ConfigError("snf: need n_layers >= 0, n_steps >= 1, n_leapfrog >= 1")
        if not self.step_size > 0:
            raise ConfigError(f"snf.step_size must be positive, got {self.step_size}")


@dataclass
class RunConfig:
    """A whole training run.

    ``data`` is an optional ``.npz`` of MD frames (``positions`` (N, n_atoms, 3) nm, optionally
    ``log_weights``) for the forward-KL and mixed objectives; a relative path is read from the
    working directory. ``init_from`` is an optional checkpoint whose model weights start a fresh
    run (a stage of a multi-stage recipe); its system, coordinates, flow and snf sections must
    equal this config's except the temperature. ``restraint`` trains on the Boltzmann density
    times a flat-bottomed restraint on one torsion (`RestraintConfig`), or on several (a list,
    all applied): a flow for one basin, e.g. ALDP's alpha_L by phi and psi together.

    ``chirality_filter`` drops samples whose chiral alpha carbons are not all in the L form
    (`boltzgen.coordinates.is_l_form`). None (the key absent or null) means: on for a molecule
    with a chiral alpha carbon (a peptide with a residue other than glycine), off for one
    without (xylene); `boltzgen.pipeline.build_run` decides, and rejects ``true`` for a molecule
    without one.
    """

    system: SystemConfig = field(default_factory=SystemConfig)
    coordinates: CoordinatesConfig = field(default_factory=CoordinatesConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    snf: SNFConfig = field(default_factory=SNFConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    fab: FABOptions = field(default_factory=FABOptions)
    output_dir: str = "runs/boltzgen"
    chirality_filter: bool | None = None
    data: str | None = None
    init_from: str | None = None
    restraint: RestraintConfig | list[RestraintConfig] | None = None


_SECTIONS = {
    "system": SystemConfig,
    "coordinates": CoordinatesConfig,
    "flow": FlowConfig,
    "snf": SNFConfig,
    "train": TrainOptions,
    "fab": FABOptions,
}


def _coerce(value: Any, kind: str, key: str) -> Any:
    """Check a YAML value against a field type; numeric strings like ``1e-3`` become floats."""
    if value is None and "None" in kind:
        return None
    if kind.startswith("float"):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind.startswith("str") and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _section(cls: type, data: Any, name: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{name}' must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}"
            + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f"; known keys of '{name}': {', '.join(sorted(known))}"
        )
    types = {f.name: str(f.type) for f in fields(cls)}
    data = {k: _coerce(v, types[k], f"{name}.{k}") for k, v in data.items()}
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError, BoltzgenError) as exc:
        raise ConfigError(f"'{name}': {exc}") from exc


def config_from_dict(data: dict) -> RunConfig:
    """`RunConfig` from a plain dict (as read from YAML); unknown keys raise `ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError("a run config must be a mapping at the top level")
    known = set(_SECTIONS) | {"output_dir", "chirality_filter", "data", "init_from", "restraint"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    coords = data.get("coordinates")
    if isinstance(coords, dict) and "minimise" in coords:  # the key's spelling before 0.2
        coords = {("minimize" if k == "minimise" else k): v for k, v in coords.items()}
        data = {**data, "coordinates": coords}
    kwargs: dict[str, Any] = {k: _section(c, data.get(k), k) for k, c in _SECTIONS.items()}
    if "output_dir" in data:
        kwargs["output_dir"] = str(data["output_dir"])
    if data.get("data") is not None:
        if not isinstance(data["data"], str):
            raise ConfigError(f"data must be a path to an .npz file, got {data['data']!r}")
        kwargs["data"] = data["data"]
    if data.get("init_from") is not None:
        if not isinstance(data["init_from"], str):
            raise ConfigError(f"init_from must be a checkpoint path, got {data['init_from']!r}")
        kwargs["init_from"] = data["init_from"]
    if data.get("restraint") is not None:
        kwargs["restraint"] = _restraints(data["restraint"])
    if data.get("chirality_filter") is not None:
        if not isinstance(data["chirality_filter"], bool):
            raise ConfigError(
                "chirality_filter must be true, false or null (null or absent: on where the "
                f"molecule has a chiral alpha carbon), got {data['chirality_filter']!r}"
            )
        kwargs["chirality_filter"] = data["chirality_filter"]
    return RunConfig(**kwargs)


def _restraints(data: Any) -> RestraintConfig | list[RestraintConfig]:
    """One restraint (a mapping) or several (a non-empty list of mappings)."""
    if isinstance(data, list):
        if not data:
            raise ConfigError("restraint must be a mapping or a non-empty list of mappings")
        out = []
        for i, r in enumerate(data):
            try:
                out.append(_section(RestraintConfig, r, "restraint"))
            except ConfigError as exc:  # name the list entry the message is about, once
                raise ConfigError(f"restraint[{i}]: {exc}") from None
        return out
    return _section(RestraintConfig, data, "restraint")


def restraint_list(config: RunConfig) -> list[RestraintConfig]:
    """The run's torsion restraints as a list (empty without one)."""
    r = config.restraint
    return [] if r is None else list(r) if isinstance(r, list) else [r]


def config_to_dict(config: RunConfig) -> dict:
    """The plain-dict form of a `RunConfig` (stored in checkpoints)."""
    return asdict(config)


def config_path(path: str | os.PathLike) -> Path:
    """The run-config file ``path``; failing that, a shipped one named ``[systems/]NAME/FILE``
    (e.g. ``systems/aldp/reverse_kl_quick.yaml`` outside a checkout; `systems.resolve_path`).

    Raises:
        ConfigError: neither exists.
    """
    from boltzgen.systems import resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return p


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run config (a file, or a shipped one: see `config_path`).

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, invalid value.
    """
    from boltzgen.files import read_yaml

    path = config_path(path)
    data = read_yaml(path, ConfigError, "run config")
    try:
        return config_from_dict(data or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
