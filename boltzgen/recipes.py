"""Training recipes: several run configs trained as stages and components of one model.

A recipe file (YAML) names the components of a mixture model, each a chain of run configs
trained one after the other, a stage starting from the previous stage's weights::

    # systems/aldp/recipe.yaml: what `boltzgen pipeline aldp --train` trains
    components:
      - name: main
        fraction: 0.993
        stages: [reverse_kl_quick.yaml, reweighted_finetune.yaml]
      - name: basin
        fraction: 0.005
        stages: [basin_alpha_l_quick.yaml, basin_alpha_l_finetune.yaml]
      - name: helix
        fraction: 0.002
        stages: [basin_alpha_l_helix_quick.yaml, basin_alpha_l_helix_finetune.yaml]
    output_dir: runs/aldp_recipe

Stage paths are relative to the recipe file. Stage ``j`` of component ``c`` trains into
``OUTPUT/c/<stage file stem>/`` (its own ``output_dir`` is replaced, and ``init_from`` of every
stage after the first is the previous stage's checkpoint). A finished stage is reused and an
unfinished one resumed, so an interrupted recipe continues where it stopped. Components train
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

__all__ = ["Recipe", "load_recipe", "stage_configs", "train_recipe"]


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
    """

    path: Path
    names: tuple[str, ...]
    fractions: tuple[float, ...]
    stages: tuple[tuple[Path, ...], ...]
    output_dir: str
    system: str


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file: every stage config must exist and load.

    Raises:
        ConfigError: a missing or malformed file, bad fractions or names, a stage config that
            does not exist or does not load, or components of different systems.
    """
    import yaml

    from boltzgen.config import load_config

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
    names, fractions, stages = [], [], []
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
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ConfigError(f"recipe {path}: component {name!r} needs a list of stage configs")
        paths = tuple(path.parent / f for f in files)
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"recipe {path}: stage config {p} does not exist")
        names.append(name)
        fractions.append(float(fraction))
        stages.append(paths)
    if not names:
        raise ConfigError(f"recipe {path} has no components")
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"recipe {path}: fractions must sum to 1, got {sum(fractions):g}")
    systems = {load_config(p).system.name for comp in stages for p in comp}
    if len(systems) > 1:
        raise ConfigError(f"recipe {path}: stages of different systems {sorted(systems)}")
    out = data.get("output_dir", f"runs/{path.stem}")
    if not isinstance(out, str):
        raise ConfigError(f"recipe {path}: output_dir must be a path")
    return Recipe(path, tuple(names), tuple(fractions), tuple(stages), out, systems.pop())


def stage_configs(
    recipe: Recipe, out: str | os.PathLike, device: str | None = None, progress: bool = False
) -> list[list[Any]]:
    """The `RunConfig` of every stage, per component, with its output folder under ``out``
    and ``init_from`` chained to the previous stage's checkpoint."""
    from boltzgen import pipeline
    from boltzgen.config import load_config

    configs = []
    for name, files in zip(recipe.names, recipe.stages, strict=True):
        chain, previous = [], None
        for f in files:
            config = pipeline.with_overrides(
                load_config(f),
                device=device,
                progress=progress,
                output_dir=Path(out) / name / f.stem,
            )
            config = replace(config, init_from=previous)
            previous = str(Path(config.output_dir) / "checkpoint.pt")
            chain.append(config)
        configs.append(chain)
    return configs


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
    """
    import concurrent.futures
    import multiprocessing

    from boltzgen.interrupts import deferred_signals

    configs = stage_configs(recipe, out, device)
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
