"""Pretrained models: trained flows of one system, shipped or exported, with a model card.

A model is one or more components, each a trained flow with the fraction of the samples it
draws: one component samples from its flow, several form a mixture proposal
(`boltzgen.pipeline.draw_mixture`, e.g. a whole-molecule flow and a flow for a rare basin).
A model folder (shipped as ``systems/<name>/pretrained/``) holds

- ``model_card.json``: what the model is (components, fractions, configs), how it was trained
  (commit, wall time, hardware, target evaluations) and its measured quality (ESS, k-hat,
  basin free-energy differences and Ramachandran KL against the MD reference), as written by
  `export_model`;
- ``MODEL_CARD.md``: the same for people (`card_text`; ``boltzgen info`` prints it);
- ``component_<k>.pt``: stripped checkpoints (`strip_checkpoint`): weights (float32), config
  and training metadata, no optimizer state; their SHA-256 is in the card.

A plain training checkpoint is a one-component model too (`load_model` takes either)::

    from boltzgen import models
    model = models.load_model("aldp")            # the shipped model of a system
    samples = models.draw(model, 1000, seed=1)   # GeneratedSamples, weighted toward exp(-U/kT)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boltzgen.errors import BoltzgenError, CheckpointError
from boltzgen.files import atomic_open, save_torch, to_json_safe

if TYPE_CHECKING:
    from boltzgen.pipeline import GeneratedSamples, Run

__all__ = [
    "CARD_FILE",
    "CARD_VERSION",
    "CARD_TEXT_FILE",
    "SUMMARY_KEYS",
    "PretrainedModel",
    "card_text",
    "checkpoint_text",
    "earlier_stages",
    "draw",
    "export_model",
    "find_model",
    "load_model",
    "read_card",
    "read_components",
    "shipped_model",
    "stage_summary",
    "strip_checkpoint",
]

CARD_FILE = "model_card.json"
CARD_TEXT_FILE = "MODEL_CARD.md"
#: Version of the model card's layout; `read_card` refuses newer ones.
CARD_VERSION = 1
#: Folder of a system's shipped model, inside its system folder.
PRETRAINED_DIR = "pretrained"
#: Checkpoint keys that describe a run (all but the weights and the training state).
SUMMARY_KEYS = (
    "format",
    "format_version",
    "kind",
    "boltzgen_version",
    "hardware",
    "iteration",
    "counters",
    "wall_s",
    "options",
    "metadata",
)
#: Checkpoint keys a stripped checkpoint keeps (besides the weights, cast to float32).
_KEEP = (
    "format",
    "iteration",
    "counters",
    "wall_s",
    "options",
    "metadata",
    "boltzgen_version",
    "hardware",
)
#: The quality bars of issue 14, printed next to the measured numbers.
BARS = {"ess_fraction": 0.80, "z": 2.0, "rare_dF_error_kT": 0.2, "kl_over_floor": 1.5}


@dataclass
class PretrainedModel:
    """A loaded model: its runs (with trained weights) and the fraction each draws.

    Attributes:
        path: The model folder, or the checkpoint of a one-component model.
        card: The model card (for a checkpoint, one built from it).
        runs: One `boltzgen.pipeline.Run` per component.
        fractions: Share of the samples of each component (sums to 1).
    """

    path: Path
    card: dict[str, Any]
    runs: list[Run]
    fractions: list[float]

    @property
    def system(self) -> str:
        """The system name."""
        return self.runs[0].config.system.name


def strip_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint without optimizer, scheduler, random state or FAB buffer: the
    model weights (floating ones as float32), config and training metadata, marked
    ``kind: "model"`` (it samples and can start a new run through ``init_from``, but cannot be
    resumed)."""
    from boltzgen.train import CHECKPOINT_VERSION

    out = {k: ckpt[k] for k in _KEEP if k in ckpt}
    out["format_version"] = CHECKPOINT_VERSION
    out["kind"] = "model"
    out["model"] = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    return out


def _system_of(ckpt: dict[str, Any], path: Path) -> str:
    meta = ckpt.get("metadata") or {}
    name = meta.get("system")
    if not isinstance(name, str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} carries no system and run config")
    return name


def _same_system(name: str, want: str) -> bool:
    """Whether checkpoint system ``name`` is the system ``want`` (a name or a system folder)."""
    if name == want:
        return True
    from boltzgen.errors import SystemLoadError
    from boltzgen.systems import system_dir

    try:
        return system_dir(name).resolve() == system_dir(want).resolve()
    except SystemLoadError:
        return False


def read_components(paths: Sequence[str | os.PathLike], system: str | None = None) -> list[dict]:
    """The checkpoints of a model's components, checked to be of one system (``system``, if
    given) before any of them is built.

    Raises:
        CheckpointError: a missing, unreadable or too new checkpoint, or one of another system.
    """
    from boltzgen.train import load_checkpoint

    out: list[dict] = []
    want, first = system, None
    for p in paths:
        ckpt = load_checkpoint(p)
        name = _system_of(ckpt, Path(p))
        if want is None:
            want, first = name, p
        elif not _same_system(name, want):
            other = f"{first} is of {want!r}" if first is not None else f"not {want!r}"
            raise CheckpointError(f"{p} is a model of system {name!r}, {other}")
        out.append(ckpt)
    return out


def shipped_model(system: str) -> Path | None:
    """The folder of the model a system ships (``systems/<name>/pretrained``), or None."""
    from boltzgen.systems import system_dir

    folder = system_dir(system) / PRETRAINED_DIR
    return folder if (folder / CARD_FILE).is_file() else None


def find_model(target: str | os.PathLike) -> Path:
    """A model folder or checkpoint from what a user typed: a checkpoint file, a model folder,
    its ``model_card.json``, or the name of a system that ships a model.

    Raises:
        CheckpointError: none of these (one line naming what was looked for).
    """
    from boltzgen.errors import SystemLoadError

    p = Path(target)
    if p.is_file():
        return p.parent if p.name == CARD_FILE else p
    if p.is_dir():
        if not (p / CARD_FILE).is_file():
            raise CheckpointError(f"{p} is a folder without a {CARD_FILE}: not a model folder")
        return p
    if p.suffix or len(p.parts) != 1:
        raise CheckpointError(f"{p} does not exist (expected a checkpoint or a model folder)")
    try:
        folder = shipped_model(str(p))
    except SystemLoadError as exc:
        raise CheckpointError(
            f"{p} is neither a checkpoint, a model folder nor a known system ({exc})"
        ) from exc
    if folder is None:
        raise CheckpointError(
            f"system {p} ships no pretrained model (train one: boltzgen pipeline {p} --train)"
        )
    return folder


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The model card of a model folder, checked for its version and components.

    Raises:
        CheckpointError: no card, unreadable JSON, a newer card version, bad components.
    """
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read model card {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    version = card.get("card_version") if isinstance(card, dict) else None
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} is not a boltzgen model card (no card_version)")
    if version > CARD_VERSION:
        raise CheckpointError(
            f"{path} has card version {version}; this boltzgen reads up to {CARD_VERSION}: "
            "upgrade boltzgen"
        )
    comps = card.get("components")
    ok = (
        isinstance(comps, list)
        and comps
        and all(
            isinstance(c, dict)
            and isinstance(c.get("file"), str)
            and _is_fraction(c.get("fraction"))
            for c in comps
        )
    )
    if not ok or abs(sum(c["fraction"] for c in comps) - 1.0) > 1e-6:
        raise CheckpointError(f"{path}: components must list file and fraction (summing to 1)")
    return card


def _is_fraction(f: Any) -> bool:
    return isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model(target: str | os.PathLike, system: str | None = None) -> PretrainedModel:
    """Load a model folder, a checkpoint or a system's shipped model (see `find_model`).

    Args:
        target: What to load.
        system: The system it must be a model of (None: any).

    Raises:
        CheckpointError: not found, unreadable, a newer format, a component that does not
            match its card (SHA-256), or a model of another system than ``system``.
    """
    from boltzgen import pipeline

    path = find_model(target)
    if path.is_file():
        (ckpt,) = read_components([path], system)
        card = checkpoint_card(path, ckpt)
        files, fractions = [path], [1.0]
    else:
        card = read_card(path)
        files = [path / c["file"] for c in card["components"]]
        fractions = [float(c["fraction"]) for c in card["components"]]
        for f, c in zip(files, card["components"], strict=True):
            if not f.is_file():
                raise CheckpointError(f"{f}, a component of {path / CARD_FILE}, is missing")
            if c.get("sha256") and _sha256(f) != c["sha256"]:
                raise CheckpointError(f"{f} does not match its model card (SHA-256 differs)")
        named = card.get("system")
        if system is not None and named is not None and not _same_system(named, system):
            raise CheckpointError(f"{path} is a model of system {named!r}, not {system!r}")
        read_components(files, system or named)
    runs = [pipeline.load_run(f) for f in files]
    if len({r.system.temperature for r in runs}) > 1:
        raise CheckpointError(f"the components of {path} are at different temperatures")
    return PretrainedModel(path, card, runs, fractions)


def draw(
    model: PretrainedModel,
    n: int,
    batch_size: int = 1000,
    ais: int = 0,
    device: str = "cpu",
    seed: int | None = None,
    **kwargs: Any,
) -> GeneratedSamples:
    """``n`` weighted samples of a model: `boltzgen.pipeline.draw_samples` of its one
    component (``ais`` and ``kwargs`` such as ``partial``, ``resume``, ``progress`` pass on),
    or `boltzgen.pipeline.draw_mixture` of several (mixture samples, AIS-refined from the
    mixture with ``ais`` > 0; of ``kwargs`` ``progress``, and with ``ais`` also ``partial`` and
    ``resume``: a plain mixture draw keeps no progress file).
    """
    from boltzgen import pipeline

    if len(model.runs) == 1:
        return pipeline.draw_samples(
            model.runs[0], n, batch_size, ais=ais, device=device, seed=seed, **kwargs
        )
    progress = bool(kwargs.get("progress", False))
    keep = {k: kwargs[k] for k in ("partial", "resume") if ais and k in kwargs}
    return pipeline.draw_mixture(
        model.runs, model.fractions, n, batch_size, device, seed, progress=progress, ais=ais, **keep
    )


# --------------------------------------------------------------------------------- model cards
def stage_summary(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What one training run (checkpoint ``ckpt`` at ``path``) was and cost, for the stage
    lists of runs started from it (``init_from``) and of model cards."""
    config = ckpt["metadata"]["config"]
    train = config.get("train", {})
    return {
        "source": str(path),
        "objective": train.get("objective"),
        "temperature": config.get("system", {}).get("temperature"),
        "iterations": ckpt.get("iteration"),
        "batch_size": train.get("batch_size"),
        "training_wall_s": ckpt.get("wall_s"),
        "target_evals": (ckpt.get("counters") or {}).get("target_evals"),
    }


def earlier_stages(path: str | os.PathLike, ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages a checkpoint's run started from (its config's ``init_from``, back to a run
    from scratch), first stage first: what each cost, for the card's totals.

    Training records them in the checkpoint's metadata (``earlier_stages``), and export keeps
    them in stripped checkpoints. For checkpoints without the record, the ``init_from`` paths
    are followed, resolved as at training time (from the working directory), then beside
    ``path``'s run folder. Raises `BoltzgenError` if one is not found: a card must count every
    stage.
    """
    from boltzgen.train import load_checkpoint

    recorded = (ckpt.get("metadata") or {}).get("earlier_stages")
    if recorded is not None:
        return list(recorded)
    path = Path(path)
    stages: list[dict[str, Any]] = []
    seen = {path.resolve()}
    config = ckpt["metadata"]["config"]
    while config.get("init_from"):
        ref = Path(config["init_from"])
        candidates = [ref] if ref.is_absolute() else [ref, path.parent.parent / ref.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None or found.resolve() in seen:
            raise BoltzgenError(
                f"{path} was trained from {config['init_from']} (init_from), which is not found "
                "from here: run export-model where the runs were trained, so that the card "
                "counts every training stage"
            )
        seen.add(found.resolve())
        prev = load_checkpoint(found)
        config = prev["metadata"]["config"]
        stages.insert(0, stage_summary(found, prev))
        recorded = (prev.get("metadata") or {}).get("earlier_stages")
        if recorded is not None:
            return [*recorded, *stages]
        path = found
    return stages


def _component_entry(path: Path, ckpt: dict[str, Any], fraction: float) -> dict[str, Any]:
    config = ckpt["metadata"]["config"]
    return {
        "fraction": fraction,
        "earlier_stages": earlier_stages(path, ckpt),
        "format_version": ckpt.get("format_version", 1),
        "iterations": ckpt.get("iteration"),
        "training_wall_s": ckpt.get("wall_s"),
        "target_evals": (ckpt.get("counters") or {}).get("target_evals"),
        "boltzgen_version": ckpt.get("boltzgen_version"),
        "hardware": ckpt.get("hardware"),
        "source": str(path),
        "config": config,
    }


def checkpoint_card(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The card of a one-component model made of a plain checkpoint (no quality section)."""
    entry = {"file": path.name, **_component_entry(path, ckpt, 1.0)}
    return {
        "card_version": CARD_VERSION,
        "system": _system_of(ckpt, path),
        "temperature": entry["config"]["system"]["temperature"],
        "components": [entry],
    }


def _git_commit() -> str | None:
    """HEAD of the git checkout this boltzgen is imported from (None outside one)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _quality_section(quality: dict[str, Any], entries: list[dict]) -> dict[str, Any]:
    """The card's quality section from a `benchmarks/aldp_quality.py` JSON, which must have
    measured these components (same iterations and target evaluations, same fractions)."""
    main, rest = entries[0], entries[1:]
    training = quality.get("training") or {}
    if (training.get("iterations"), training.get("target_evals")) != (
        main["iterations"],
        main["target_evals"],
    ):
        raise BoltzgenError(
            "the quality JSON was measured on another checkpoint than the "
            "first component (iterations or target evaluations differ)"
        )
    if rest:
        # aldp_quality.py's --mix runs; JSONs before repeatable --mix have one "mixture_component"
        mixed = quality.get("mixture_components")
        if mixed is None and quality.get("mixture_component") is not None:
            mixed = [quality["mixture_component"]]
        mixed = mixed or []
        same = len(mixed) == len(rest) and all(
            (m.get("iterations"), m.get("target_evals")) == (e["iterations"], e["target_evals"])
            for m, e in zip(mixed, rest)
        )
        if "mixture" not in quality or not same:
            raise BoltzgenError(
                "the quality JSON has no mixture of these components (run "
                "benchmarks/aldp_quality.py with one --mix per further component, in order)"
            )
        for m, e in zip(mixed, rest):
            if not math.isclose(m.get("fraction", -1), e["fraction"], abs_tol=1e-9):
                raise BoltzgenError(
                    f"the quality JSON's mixture fraction {m.get('fraction')} is "
                    f"not the component's {e['fraction']}"
                )
        key = "mixture"
    else:
        key = "flow"
    measured = quality.get(key)
    if not isinstance(measured, dict):
        raise BoltzgenError(f"the quality JSON has no '{key}' section")
    machine = {k: quality[k] for k in ("cpu", "cpu_capability", "torch", "threads") if k in quality}
    ref = quality.get("reference") or {}
    section = {
        "measured_with": "benchmarks/aldp_quality.py",
        "proposal": key,
        "machine": machine,
        "reference_n": ref.get("n"),
        **measured,
    }
    # the same proposal refined by AIS (aldp_quality's "ais<K>" / "mixture_ais<K>"), if measured
    prefix = "ais" if key == "flow" else "mixture_ais"
    refined = [k for k in quality if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    if refined and isinstance(quality[refined[0]], dict):
        section["ais_refined"] = {"ais": int(refined[0][len(prefix) :]), **quality[refined[0]]}
    return section


def export_model(
    components: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    quality: str | os.PathLike | None = None,
    note: str | None = None,
    stand_in: bool = False,
    commit: str | None = None,
    hardware: str | None = None,
) -> Path:
    """Write a model folder from trained checkpoints: stripped components, ``model_card.json``
    and ``MODEL_CARD.md``. Files in ``out`` of an earlier export are replaced.

    Args:
        components: ``(checkpoint, fraction)`` per component, fractions summing to 1; the
            first is the main flow.
        out: The model folder (created; e.g. ``systems/aldp/pretrained``).
        quality: JSON of ``benchmarks/aldp_quality.py CHECKPOINT [--mix C2:F]`` on these
            checkpoints: the card's measured quality (its ``mixture`` section for two
            components, ``flow`` for one). None: the card says it was not measured.
        note: A sentence for the card (e.g. that the model is a stand-in).
        stand_in: Mark the model as a stand-in, not the model a release ships.
        commit: The commit the components were trained with (default: HEAD of this checkout).
        hardware: Where they were trained, in words (default: what the checkpoints recorded).

    Raises:
        BoltzgenError / CheckpointError: bad fractions, checkpoints of different systems or
            temperatures, a quality JSON of other checkpoints.
    """
    fractions = [float(f) for _, f in components]
    if not components or not all(0 < f <= 1 for f in fractions):
        raise BoltzgenError("export needs components with fractions in (0, 1]")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise BoltzgenError(f"component fractions must sum to 1, got {sum(fractions):g}")
    paths = [Path(p) for p, _ in components]
    ckpts = read_components(paths)
    entries = [_component_entry(p, c, f) for p, c, f in zip(paths, ckpts, fractions, strict=True)]
    temps = {e["config"]["system"]["temperature"] for e in entries}
    if len(temps) > 1:
        raise BoltzgenError(f"components at different temperatures: {sorted(temps)}")
    q = None
    if quality is not None:
        try:
            q = _quality_section(json.loads(Path(quality).read_text()), entries)
        except OSError as exc:
            raise BoltzgenError(f"cannot read quality JSON {quality}: {exc.strerror}") from exc
        except ValueError as exc:
            raise BoltzgenError(f"{quality} is not valid JSON: {exc}") from exc
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("component_*.pt"):
        old.unlink()
    for k, (ckpt, entry) in enumerate(zip(ckpts, entries, strict=True), start=1):
        entry["file"] = f"component_{k}.pt"
        stripped = strip_checkpoint(ckpt)
        meta = {**stripped["metadata"], "earlier_stages": entry["earlier_stages"]}
        save_torch({**stripped, "metadata": meta}, folder / entry["file"])
        entry["sha256"] = _sha256(folder / entry["file"])
    from boltzgen import __version__

    card = {
        "card_version": CARD_VERSION,
        "system": _system_of(ckpts[0], paths[0]),
        "temperature": temps.pop(),
        "stand_in": bool(stand_in),
        "note": note,
        "commit": commit or _git_commit(),
        "exported_with": f"boltzgen {__version__}",
        "training": {
            "wall_s": sum(_total(e, "training_wall_s") for e in entries),
            "target_evals": sum(int(_total(e, "target_evals")) for e in entries),
            "hardware": hardware or _hardware_words(entries),
        },
        "sampling": {"proposal": "mixture" if len(entries) > 1 else "flow", "ais": 0},
        "components": [{"file": e.pop("file"), **e} for e in entries],
        "quality": q,
    }
    card = to_json_safe(card)
    with atomic_open(folder / CARD_FILE, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(card, indent=2) + "\n")
    with atomic_open(folder / CARD_TEXT_FILE, "w", encoding="utf-8") as fh:
        fh.write(card_text(card))
    return folder


def _total(entry: dict[str, Any], key: str) -> float:
    """``key`` summed over a component's earlier stages and its own run."""
    stages = [*(entry.get("earlier_stages") or []), entry]
    return float(sum(s.get(key) or 0 for s in stages))


def _stage_words(entry: dict[str, Any]) -> str:
    """How a component was trained in stages, for the card's table ("" for one stage)."""
    stages = entry.get("earlier_stages") or []
    if not stages:
        return ""
    words = "; ".join(
        f"{s.get('objective')} at {s.get('temperature'):g} K, {s.get('iterations')} iterations x "
        f"batch {s.get('batch_size')}"
        for s in stages
    )
    return f"; after {len(stages)} earlier stage(s) (init_from): {words}"


def _hardware_words(entries: list[dict]) -> str:
    seen = []
    for e in entries:
        h = e.get("hardware")
        words = (
            f"{h.get('cpu')} ({h.get('cpu_capability')}), {h.get('threads')} torch thread(s), "
            f"device {h.get('device', 'cpu')}" + (f" ({h['gpu']})" if h.get("gpu") else "")
            if isinstance(h, dict)
            else "not recorded in the checkpoint"
        )
        if words not in seen:
            seen.append(words)
    return "; ".join(seen)


def _flow_words(config: dict[str, Any]) -> str:
    f, t = config.get("flow", {}), config.get("train", {})
    words = (
        f"{f.get('layer_type')} spline flow, {f.get('n_blocks')} blocks x {f.get('n_bins')} "
        f"bins, hidden {f.get('hidden')}; {t.get('objective')}, {t.get('max_iter')} iterations "
        f"x batch {t.get('batch_size')}, lr {t.get('lr')}, {t.get('dtype')}"
    )
    snf = config.get("snf") or {}
    if snf.get("n_layers"):
        words += f"; {snf['n_layers']} {snf.get('kind')} SNF layers"
    r = config.get("restraint")
    for one in [r] if isinstance(r, dict) else r or []:
        words += f"; restraint on torsion {one.get('atoms')} to {one.get('range')} deg"
    return words


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def card_text(card: dict[str, Any]) -> str:
    """The model card in words (Markdown): ``MODEL_CARD.md`` and ``boltzgen info``."""
    comps = card["components"]
    title = f"# Pretrained {card.get('system')} model ({card.get('temperature')} K)"
    lines = [title, ""]
    if card.get("stand_in"):
        lines += [
            "**STAND-IN**: not the model a release ships; regenerate the folder from the "
            "final checkpoints with `boltzgen export-model`.",
            "",
        ]
    if card.get("note"):
        lines += [str(card["note"]), ""]
    kind = f"mixture of {len(comps)} flows" if len(comps) > 1 else "one flow"
    lines += [f"Proposal: {kind}; samples drawn without AIS (exact importance weights).", ""]
    lines += [
        "| component | fraction | model | iterations (all stages) | training s | target evals |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        lines.append(
            f"| {c['file']} | {c['fraction']:g} | {_flow_words(c['config'])}{_stage_words(c)} | "
            f"{int(_total(c, 'iterations'))} | {_num(_total(c, 'training_wall_s'), '.0f')} | "
            f"{int(_total(c, 'target_evals'))} |"
        )
    tr = card.get("training") or {}
    lines += [
        "",
        f"Training: {_num(tr.get('wall_s'), '.0f')} s in all, "
        f"{tr.get('target_evals')} target evaluations; hardware: {tr.get('hardware')}; "
        f"commit {card.get('commit')}; exported with {card.get('exported_with')}.",
    ]
    lines += ["", "## Measured quality", ""]
    q = card.get("quality")
    if not q:
        lines += ["Not measured (export without --quality).", ""]
        return "\n".join(lines)
    lines.append(
        f"{q.get('n')} samples ({q.get('proposal')}) against the MD reference "
        f"({q.get('reference_n')} frames), measured with {q.get('measured_with')} on "
        f"{(q.get('machine') or {}).get('cpu')}, sampling {_num(q.get('sampling_wall_s'), '.1f')}"
        " s:"
    )
    lines += _quality_lines(q)
    refined = q.get("ais_refined")
    if isinstance(refined, dict):
        lines += [
            "",
            f"### The same proposal refined by AIS (`--ais {refined.get('ais')}`)",
            "",
            f"{refined.get('n')} samples, each moved by HMC through {refined.get('ais')} "
            "intermediate distributions from the proposal toward the Boltzmann density (AIS "
            f"weights, exact), sampling {_num(refined.get('sampling_wall_s'), '.0f')} s:",
        ]
        lines += _quality_lines(refined)
    return "\n".join(lines) + "\n"


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """ESS, KL and the basin table of one measured sample set, against the bars."""
    ess, khat = q.get("ess_fraction"), q.get("khat")
    lines = [
        "",
        f"- Kish ESS {_num(100 * ess, '.1f')} % (bar >= 80 %: "
        f"{_mark(ess >= BARS['ess_fraction'])}); PSIS k-hat {_num(khat, '.2f')}",
    ]
    kl, floor, ratio = (
        q.get(k) for k in ("ramachandran_kl", "ramachandran_kl_noise_floor", "kl_over_floor")
    )
    lines.append(
        f"- Ramachandran KL(reference || reweighted) {_num(kl, '.4f')} nats, noise floor at "
        f"this n {_num(floor, '.4f')}: {_num(ratio, '.2f')}x (bar <= 1.5x: "
        f"{_mark(ratio <= BARS['kl_over_floor'])})"
    )
    self_kl = q.get("ramachandran_kl_reference_self")
    if isinstance(self_kl, (int, float)):
        lines.append(
            f"- The MD reference's own error on that histogram (KL of a block-bootstrap "
            f"resample of it against itself, time correlation included): {self_kl:.4f} nats; "
            f"the KL above is {_num(kl / self_kl, '.2f')}x that"
        )
    lines += [
        "",
        "| basin | population | dF (kT) | MD reference dF (kT) | error (kT) | z |",
        "|---|---|---|---|---|---|",
    ]
    basins = q.get("basins") or {}
    for name, b in basins.items():
        ref = b.get("reference") or {}
        lines.append(
            f"| {name} | {_num(b.get('population'), '.4f')} +- "
            f"{_num(b.get('population_error'), '.4f')} | {_num(b.get('dF_kT'), '.2f')} +- "
            f"{_num(b.get('dF_kT_error'), '.2f')} | {_num(ref.get('dF_kT'), '.2f')} +- "
            f"{_num(ref.get('dF_kT_error'), '.2f')} | {_num(b.get('dF_error_kT'), '+.2f')} | "
            f"{_num(b.get('z'), '+.2f')} |"
        )
    zs = [abs(b["z"]) for b in basins.values() if isinstance(b.get("z"), (int, float))]
    rare = list(basins.values())[-1] if basins else {}
    err = rare.get("dF_error_kT")
    lines += [
        "",
        f"All basin dF within 2 combined standard errors: "
        f"{_mark(bool(zs) and max(zs) <= BARS['z'])}; rarest basin's error "
        f"{_num(err, '+.2f')} kT (bar <= 0.2 kT: "
        f"{_mark(isinstance(err, (int, float)) and abs(err) <= BARS['rare_dF_error_kT'])}).",
    ]
    return lines


def _num(x: Any, fmt: str) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a"
    return format(x + 0.0, fmt)  # + 0.0: no "-0.00"


def checkpoint_text(path: str | os.PathLike, ckpt: dict[str, Any]) -> str:
    """A plain checkpoint in words: format version, kind, system, config summary, iterations,
    training wall time, target evaluations, hardware, boltzgen version."""
    meta = ckpt.get("metadata") or {}
    config = meta.get("config") or {}
    sysc = config.get("system") or {}
    counters = ckpt.get("counters") or {}
    hw = _hardware_words([{"hardware": ckpt.get("hardware")}])
    written = ckpt.get("boltzgen_version") or "not recorded (an older checkpoint)"
    lines = [
        f"checkpoint: {path}",
        f"format version: {ckpt.get('format_version', 1)}"
        + ("" if "format_version" in ckpt else " (no field: written before it existed)"),
        f"kind: {ckpt.get('kind', 'training')}"
        + (" (weights only, no optimizer state)" if ckpt.get("kind") == "model" else ""),
        f"system: {meta.get('system')} ({sysc.get('solvent')}, {sysc.get('temperature')} K, "
        f"{sysc.get('energy')} energy)",
        f"model: {_flow_words(config) if config else 'no config recorded'}",
        f"iterations: {ckpt.get('iteration')}",
        f"training wall time: {_num(ckpt.get('wall_s'), '.1f')} s",
        f"target evaluations: {counters.get('target_evals')}",
        f"hardware: {hw}",
        f"boltzgen version: {written}",
    ]
    return "\n".join(lines) + "\n"
