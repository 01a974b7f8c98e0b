"""Training recipes: several run configs trained as stages and components of one model.

A recipe file (YAML) names the components of a mixture model, each a chain of run configs
trained one after the other, a stage starting from the previous stage's weights::

    # systems/aldp/recipes/full/recipe.yaml
    components:
      - name: main
        fraction: 0.993
        stages: [../../reverse_kl_quick.yaml, ../../reweighted_finetune.yaml]
      - name: basin
        fraction: 0.005
        stages: [../../basin_alpha_l_quick.yaml, ../../basin_alpha_l_finetune.yaml]
      - name: helix
        fraction: 0.002
        stages: [../../basin_alpha_l_helix_quick.yaml, ../../basin_alpha_l_helix_finetune.yaml]
    output_dir: runs/aldp_recipe_full

Stage paths are relative to the recipe file. A stage may also be a mapping: the config file
under ``config`` and sections whose keys replace the file's (a mapping updates the section,
key by key), so that a recipe reuses run configs with other steps or learning rates without
copying them; ``systems/aldp/recipe.yaml``, what ``boltzgen pipeline aldp --train`` trains,
is the recipe above shortened so::

      - name: basin
        fraction: 0.005
        stages:
          - {config: basin_alpha_l_quick.yaml, train: {max_iter: 2750}}
          - {config: basin_alpha_l_finetune.yaml, train: {max_iter: 2750}}

Stage ``j`` of component ``c`` trains into ``OUTPUT/c/<stage file stem>/`` (its own
``output_dir`` is replaced, and ``init_from`` of every stage after the first is the previous
stage's checkpoint). A finished stage is reused and an unfinished one resumed, so an
interrupted recipe continues where it stopped; a stage folder whose checkpoint was trained with
other settings (an edited recipe, another recipe into the same folder) is an error that names
the first difference (`check_reusable`), never silently reused. Components train
in parallel processes (one torch thread each by default) when there are cores for them; the
last stage of each component is that component of the model (`boltzgen.models.export_model`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from boltzgen.errors import ConfigError

__all__ = ["Recipe", "check_reusable", "load_recipe", "stage_configs", "train_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe file.

    Attributes:
        path: The recipe file.
        names: Component names (folder names under the output folder).
        fractions: Mixture fractions, positive, summing to 1.
        stages: Per component, its run config files in training order.
        output_dir: Default output folder (relative to the working directory).
        system: The system every stage trains.
        overrides: Per component and stage, the sections (``{"train": {...}}``) whose keys
            replace the stage file's; empty mappings where the recipe names the file alone.
    """

    path: Path
    names: tuple[str, ...]
    fractions: tuple[float, ...]
    stages: tuple[tuple[Path, ...], ...]
    output_dir: str
    system: str
    overrides: tuple[tuple[dict[str, Any], ...], ...]

    def stage_overrides(self, component: int, stage: int) -> dict[str, Any]:
        """The section overrides of one stage (empty if none)."""
        return self.overrides[component][stage]


#: Stage-mapping keys a recipe may override: a run config's sections and flags, except the
#: output folder and initial weights, which the recipe sets itself.
_OVERRIDABLE = {"system", "coordinates", "flow", "snf", "train", "restraint", "chirality_filter"}


def _stage_entry(path: Path, name: str, entry: Any) -> tuple[Path, dict[str, Any]]:
    """A stage entry of component ``name``: its config file (relative to the recipe) and its
    section overrides."""
    if isinstance(entry, str):
        return path.parent / entry, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), str):
        raise ConfigError(
            f"recipe {path}: component {name!r}: a stage is a config file or a mapping with "
            f"'config' (the file) and sections to override, got {entry!r}"
        )
    over = {k: v for k, v in entry.items() if k != "config"}
    bad = sorted(set(over) - _OVERRIDABLE)
    if bad:
        raise ConfigError(
            f"recipe {path}: component {name!r}, stage {entry['config']}: cannot override "
            f"{bad}; a stage may override {', '.join(sorted(_OVERRIDABLE))}"
        )
    return path.parent / entry["config"], over


def _load_stage(path: Path, over: dict[str, Any]) -> Any:
    """The `RunConfig` of a stage file with ``over``'s keys replacing the file's, section by
    section (a mapping updates the section, any other value replaces it)."""
    from boltzgen.config import config_from_dict, config_path, load_config
    from boltzgen.files import read_yaml

    data = read_yaml(config_path(path), ConfigError, "run config") if over else None
    if not isinstance(data, dict):  # no overrides, or a file load_config explains
        return load_config(path)
    data = dict(data)
    for key, value in over.items():
        old = data.get(key)
        data[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path} with the recipe's overrides {over}: {exc}") from exc


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file: every stage config must exist and load.

    Raises:
        ConfigError: a missing or malformed file, bad fractions or names, a stage config that
            does not exist or does not load, or components of different systems.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse recipe {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("components"), list):
        raise ConfigError(f"recipe {path} needs a 'components' list")
    unknown = sorted(set(data) - {"components", "output_dir"})
    if unknown:
        raise ConfigError(f"recipe {path}: unknown key(s) {unknown}")
    names, fractions, stages, overrides = [], [], [], []
    for i, comp in enumerate(data["components"]):
        if not isinstance(comp, dict) or set(comp) != {"name", "fraction", "stages"}:
            raise ConfigError(
                f"recipe {path}: component {i} needs exactly name, fraction and stages"
            )
        name, fraction, files = comp["name"], comp["fraction"], comp["stages"]
        if not isinstance(name, str) or not name or "/" in name or name in names:
            raise ConfigError(f"recipe {path}: component names must be distinct folder names")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0:
            raise ConfigError(f"recipe {path}: component {name!r} needs a fraction > 0")
        if not isinstance(files, list) or not files:
            raise ConfigError(f"recipe {path}: component {name!r} needs a list of stage configs")
        entries = [_stage_entry(path, name, f) for f in files]
        paths = tuple(p for p, _ in entries)
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"recipe {path}: stage config {p} does not exist")
        if len({p.stem for p in paths}) < len(paths):
            raise ConfigError(
                f"recipe {path}: component {name!r}: its stages train into folders named after "
                "their files, so the stage files need distinct names"
            )
        names.append(name)
        fractions.append(float(fraction))
        stages.append(paths)
        overrides.append(tuple(o for _, o in entries))
    if not names:
        raise ConfigError(f"recipe {path} has no components")
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"recipe {path}: fractions must sum to 1, got {sum(fractions):g}")
    systems = {
        _load_stage(p, o).system.name
        for comp, over in zip(stages, overrides, strict=True)
        for p, o in zip(comp, over, strict=True)
    }
    if len(systems) > 1:
        raise ConfigError(f"recipe {path}: stages of different systems {sorted(systems)}")
    out = data.get("output_dir", f"runs/{path.stem}")
    if not isinstance(out, str):
        raise ConfigError(f"recipe {path}: output_dir must be a path")
    return Recipe(
        path, tuple(names), tuple(fractions), tuple(stages), out, systems.pop(), tuple(overrides)
    )


def stage_configs(
    recipe: Recipe, out: str | os.PathLike, device: str | None = None, progress: bool = False
) -> list[list[Any]]:
    """The `RunConfig` of every stage, per component, with its output folder under ``out``
    and ``init_from`` chained to the previous stage's checkpoint."""
    from boltzgen import pipeline

    configs = []
    for i, (name, files) in enumerate(zip(recipe.names, recipe.stages, strict=True)):
        chain, previous = [], None
        for j, f in enumerate(files):
            config = pipeline.with_overrides(
                _load_stage(f, recipe.stage_overrides(i, j)),
                device=device,
                progress=progress,
                output_dir=Path(out) / name / f.stem,
            )
            config = replace(config, init_from=previous)
            previous = str(Path(config.output_dir) / "checkpoint.pt")
            chain.append(config)
        configs.append(chain)
    return configs


#: Train settings that change how a stage runs, not what it trains: they may differ when a
#: finished stage is reused or an unfinished one resumed.
_HOW_KEYS = {"progress", "device", "compile", "shards", "checkpoint_every", "checkpoint_seconds"}


def _stage_difference(config: Any, checkpoint: Path) -> str | None:
    """How the stage ``checkpoint`` was trained differs from ``config`` (the first differing
    setting, e.g. ``"train.max_iter: 12705 there, 10000 here"``), or None if it does not."""
    from boltzgen.config import config_to_dict
    from boltzgen.pipeline import MODEL_SECTIONS
    from boltzgen.train import load_checkpoint

    old = load_checkpoint(checkpoint).get("metadata", {}).get("config", {})
    new = config_to_dict(config)
    for key in (*MODEL_SECTIONS, "fab", "restraint", "data", "train"):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not (key == "train" and k in _HOW_KEYS) and a.get(k) != b.get(k):
                    return f"{key}.{k}: {a.get(k)!r} there, {b.get(k)!r} here"
        elif a != b:
            return f"{key}: {a!r} there, {b!r} here"
    return None


def check_reusable(configs: list[list[Any]]) -> None:
    """Check that every stage folder that already holds a checkpoint (a stage to reuse or
    resume) was trained with the same settings as its stage config now.

    Raises:
        ConfigError: a stage trained with other settings (e.g. by an earlier version of the
            recipe into the same output folder), naming the first difference.
    """
    for chain in configs:
        for config in chain:
            ckpt = Path(config.output_dir) / "checkpoint.pt"
            diff = _stage_difference(config, ckpt) if ckpt.is_file() else None
            if diff is not None:
                raise ConfigError(
                    f"{ckpt} was trained with other settings than the recipe's stage "
                    f"({diff}); delete {config.output_dir} or choose another --output-dir"
                )


def _train_chain(configs: list[Any], threads: int) -> dict[str, Any]:
    """Train one component's stages in order (reusing finished and resuming unfinished ones);
    runs in a worker process too, so it returns plain data."""
    import torch

    from boltzgen import pipeline
    from boltzgen.train import TrainingInterrupted, load_checkpoint

    torch.set_num_threads(threads)
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # a worker of train_recipe
        from boltzgen.machine import keep_freed_memory

        keep_freed_memory()
    done = []
    for config in configs:
        ckpt = Path(config.output_dir) / "checkpoint.pt"
        if ckpt.is_file() and load_checkpoint(ckpt)["iteration"] >= config.train.max_iter:
            done.append({"checkpoint": str(ckpt), "reused": True})
            continue
        try:
            result = pipeline.train(config, resume=ckpt.is_file())
        except TrainingInterrupted as stop:
            return {
                "stages": done,
                "interrupted": stop.signum,
                "iteration": stop.iteration,
                "checkpoint": str(stop.checkpoint),
            }
        done.append(
            {
                "checkpoint": str(result.checkpoint),
                "reused": False,
                "wall_s": result.wall_s,
                "iterations": result.iterations,
            }
        )
    return {"stages": done}


def train_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    device: str | None = None,
    threads: int = 1,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train every component of ``recipe`` into ``out``; return each component's final
    checkpoint, in the recipe's order.

    Args:
        workers: Processes training components at once (default: as many as there are
            components and cores for ``threads`` threads each; 1 trains in this process).

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM; every stage in progress saved its checkpoint
            and the same call resumes.
        ConfigError: a stage folder under ``out`` holds a stage trained with other settings
            (`check_reusable`).
    """
    import concurrent.futures
    import multiprocessing

    from boltzgen.interrupts import deferred_signals

    configs = stage_configs(recipe, out, device)
    check_reusable(configs)
    if workers is None:
        workers = max(1, min(len(configs), (os.cpu_count() or 1) // max(threads, 1)))
    for name, chain in zip(recipe.names, configs, strict=True):
        stages = " -> ".join(f"{c.train.objective} x {c.train.max_iter}" for c in chain)
        log(f"  component {name}: {stages} -> {Path(out) / name}")
    if workers == 1:
        results = [_train_chain(chain, threads) for chain in configs]
        _raise_interrupted(results)
    else:
        context = multiprocessing.get_context("spawn")
        with deferred_signals() as received:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(_train_chain, chain, threads) for chain in configs]
                forwarded = False
                while not all(f.done() for f in futures):
                    concurrent.futures.wait(futures, timeout=1.0)
                    if received and not forwarded:  # e.g. SIGTERM to this process alone
                        for proc in list(getattr(pool, "_processes", {}).values()):
                            with contextlib.suppress(OSError):
                                os.kill(proc.pid, received.signum)
                        forwarded = True
                results = [f.result() for f in futures]
            _raise_interrupted(results)  # inside: the signal was answered
    for name, res in zip(recipe.names, results, strict=True):
        for stage in res["stages"]:
            how = "reused" if stage["reused"] else f"trained in {stage['wall_s']:.0f} s"
            log(f"  component {name}: {stage['checkpoint']} ({how})")
    return [Path(res["stages"][-1]["checkpoint"]) for res in results]


def _raise_interrupted(results: list[dict[str, Any]]) -> None:
    """Raise `TrainingInterrupted` if a component's training was stopped by a signal."""
    from boltzgen.train import TrainingInterrupted

    for res in results:
        if "interrupted" in res:
            raise TrainingInterrupted(res["interrupted"], res["iteration"], Path(res["checkpoint"]))
