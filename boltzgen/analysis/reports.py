"""Reports of (reweighted) samples: the numbers `boltzgen reweight`, `evaluate` and `pipeline`
print and write, as JSON-ready dicts, and the states files they use.

`reweight_report` gives ESS, k-hat, log Z, state populations and free energies with bootstrap
errors and a free-energy surface; `evaluate_samples` compares samples with a reference (KL
divergences, per-torsion marginals, state free energies) and draws the plots; `load_states`
reads a states YAML file (states over the molecule's backbone torsions and over dihedrals the
file defines: `boltzgen.analysis.cvs`); `sample_cvs` gives the CV values of a samples file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from boltzgen.analysis import reweighting as rw
from boltzgen.analysis.cvs import (
    StatesFile,
    _as_states_file,
    _check_states,
    cv_label,
    fes_cvs,
    load_states,
    sample_cvs,
)
from boltzgen.analysis.reweighting import State
from boltzgen.analysis.samples import SampleSet, _system_file
from boltzgen.errors import BoltzgenError, WeightError
from boltzgen.units import MOLAR_GAS_CONSTANT

__all__ = [
    "MIN_STATE_ESS",
    "evaluate_samples",
    "load_states",
    "print_report",
    "reference_path",
    "reference_populations",
    "reweight_report",
    "sample_cvs",
    "time_series_inefficiency",
]


def time_series_inefficiency(
    samples: SampleSet, cvs: Mapping[str, np.ndarray] | None = None
) -> float:
    """The largest statistical inefficiency (`reweighting.statistical_inefficiency`) of an MD
    samples file's energies and (cos, sin) of its CVs (`cvs`, name -> `(n,)` radians; default
    the file's own, `SampleSet.cvs`): ``n / g`` frames are worth as much as independent
    samples."""
    series = []
    if samples.energies is not None:
        series.append(samples.energies)
    for angle in (samples.cvs if cvs is None else cvs).values():
        series += [np.cos(angle), np.sin(angle)]
    return max((rw.statistical_inefficiency(s) for s in series), default=1.0)


def reference_populations(system: str) -> dict[str, tuple[float, float]]:
    """State populations ``{name: (p, error)}`` of a system's shipped MD reference
    (``reference/summary.json``; empty if there is none)."""
    import json

    path = _system_file(system, "reference", "summary.json")
    if path is None:
        return {}
    try:
        states = json.loads(path.read_text())["whole"]["states"]
        return {k: (v["population"], v["population_error"]) for k, v in states.items()}
    except (OSError, KeyError, ValueError):
        return {}


def _block_length(samples: SampleSet, requested: int | None) -> int:
    """Bootstrap block: as requested; else 1 for independent samples, n/20 for MD frames."""
    if requested is not None:
        if requested < 1 or requested > samples.n:
            raise BoltzgenError(f"--block-length must be in [1, {samples.n}], got {requested}")
        return requested
    return max(1, samples.n // 20) if samples.time_series else 1


def _states_json(res: Any, kT: float) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "population": float(p),
            "population_error": float(pe),
            "dF_kJ_per_mol": float(f) + 0.0,
            "dF_kJ_per_mol_error": float(fe),
            "dF_kT": float(f / kT) + 0.0,
            "dF_kT_error": float(fe / kT),
        }
        for name, p, pe, f, fe in zip(
            res.names,
            res.population,
            res.population_error,
            res.free_energy,
            res.free_energy_error,
        )
    ]


def reweight_report(
    samples: SampleSet,
    states: StatesFile | Sequence[State] | None,
    cv: str | None = None,
    bins: int = 60,
    n_bootstrap: int = 200,
    block_length: int | None = None,
    target_temperature: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The numbers ``boltzgen reweight`` prints and writes, as a JSON-ready dict.

    Args:
        samples: The samples file's contents.
        states: A `StatesFile` (`load_states`) or a list of states over the samples' CVs.
        cv: CV(s) of the free-energy surface, comma-separated (see `fes_cvs`; None: default).
        bins: FES bins per CV; n_bootstrap, block_length, seed: the bootstrap's.
        target_temperature: Also reweight to this temperature (K).

    Raises:
        BoltzgenError: a state or ``cv`` naming a CV the samples do not have, and the errors of
            `sample_cvs`; checked before any bootstrap runs.
    """
    sf = _as_states_file(states)
    cvs_all = sample_cvs(samples, sf.cvs)
    _check_states(sf, list(cvs_all), f"the CVs of {samples.path}")
    names = fes_cvs(list(cvs_all), sf, cv)
    n = samples.n
    lw = samples.log_w if samples.log_w is not None else np.zeros(n)
    block = _block_length(samples, block_length)
    if target_temperature is not None and samples.energies is None:
        raise BoltzgenError("--target-temperature needs 'energies' in the samples file")
    report: dict[str, Any] = {
        "samples": samples.path,
        "system": samples.system,
        "temperature_K": samples.temperature,
        "n_samples": n,
        "weighted": samples.log_w is not None,
        "ess": rw.ess(lw),
        "ess_fraction": rw.ess_fraction(lw),
        "block_length": block,
    }
    if samples.time_series:
        g = time_series_inefficiency(samples, cvs_all)
        report["statistical_inefficiency"] = g
        report["ess_time_series"] = report["ess"] / g
    khat = rw.pareto_khat(lw) if n >= rw.KHAT_MIN_SAMPLES else float("nan")
    report["khat"] = khat
    report["khat_verdict"] = rw.khat_verdict(khat, n) if np.isfinite(khat) or khat < 0 else ""
    if samples.log_w is not None:
        report["log_z"], report["log_z_error"] = rw.log_z(lw)
    kT = samples.kT
    if sf.states:
        try:
            res = rw.state_free_energies(sf.states, cvs_all, lw, kT, n_bootstrap, block, seed)
        except WeightError as exc:  # states and weights are valid: the reference state is empty
            report["states_error"] = str(exc)
        else:
            report["reference_state"] = res.names[0]
            report["states"] = _states_json(res, kT)
            for row, st in zip(report["states"], sf.states, strict=True):
                inside = st.contains(cvs_all)
                row["n_samples"] = int(inside.sum())
                row["n_eff"] = float(rw.ess(lw[inside])) if inside.any() else 0.0
    if names:
        fes = rw.free_energy_surface(
            np.stack([cvs_all[c] for c in names], 1),
            lw,
            bins=bins,
            ranges=[(-math.pi, math.pi)] * len(names),
            kT=kT,
            n_bootstrap=min(n_bootstrap, 100),
            block_length=block,
            seed=seed,
        )
        report["fes"] = {
            "cvs": names,
            "units": "radians; free energy kJ/mol (minimum 0; inf: empty bin)",
            "edges": [e.tolist() for e in fes.edges],
            "free_energy": fes.free_energy.tolist(),
            "error": fes.error.tolist(),
        }
    if target_temperature is not None:
        t2 = float(target_temperature)
        du = samples.energies / (MOLAR_GAS_CONSTANT * t2) - samples.energies / kT
        df, df_err = rw.free_energy_difference(lw, du, n_bootstrap, block, seed)
        lw2 = rw.reweight_to(lw, du)
        block_t2: dict[str, Any] = {
            "temperature_K": t2,
            "delta_f_reduced": df,
            "delta_f_reduced_error": df_err,
            "ess": rw.ess(lw2),
            "ess_fraction": rw.ess_fraction(lw2),
        }
        if "states" in report:
            kT2 = MOLAR_GAS_CONSTANT * t2
            try:
                res2 = rw.state_free_energies(
                    sf.states, cvs_all, lw2, kT2, n_bootstrap, block, seed
                )
            except WeightError as exc:
                block_t2["states_error"] = str(exc)
            else:
                block_t2["states"] = _states_json(res2, kT2)
        report["target_temperature"] = block_t2
    return report


MIN_STATE_ESS = 10.0  # below this effective sample count a state's numbers are flagged


def _print_states(rows: list[dict[str, Any]], out: Any) -> None:
    has_eff = all("n_eff" in r for r in rows)
    head = f"  {'state':<16} {'population':>18} {'dF (kJ/mol)':>18} {'dF (kT)':>16}"
    print(head + (f" {'ESS in state':>13}" if has_eff else ""), file=out)
    flagged = []
    for r in rows:
        line = (
            f"  {r['name']:<16} {r['population']:>9.4f} +- {r['population_error']:<6.4f}"
            f" {r['dF_kJ_per_mol']:>8.2f} +- {r['dF_kJ_per_mol_error']:<6.2f}"
            f" {r['dF_kT']:>7.2f} +- {r['dF_kT_error']:<5.2f}"
        )
        if has_eff:
            line += f" {r['n_eff']:>13.1f}"
            if r["n_eff"] < MIN_STATE_ESS:
                line += "  *"
                flagged.append(r["name"])
        print(line, file=out)
    if flagged:
        print(
            f"  * effective sample count below {MIN_STATE_ESS:g} in {', '.join(flagged)}: "
            "too few weighted samples there, the numbers (and error bars) are not reliable",
            file=out,
        )


def print_report(report: dict[str, Any], out: IO[str] | None = None) -> None:
    """The human-readable table of a `reweight_report`."""
    out = out or sys.stdout
    print(
        f"{report['samples']}: {report['n_samples']} samples of {report['system']} "
        f"at {report['temperature_K']:g} K ({'weighted' if report['weighted'] else 'unweighted'})",
        file=out,
    )
    print(
        f"  ESS    {report['ess']:.1f} of {report['n_samples']} "
        f"({100 * report['ess_fraction']:.1f} %)",
        file=out,
    )
    if "ess_time_series" in report:
        print(
            f"  ESS of the time series {report['ess_time_series']:.1f} (Kish ESS / statistical "
            f"inefficiency {report['statistical_inefficiency']:.1f} of the correlated frames)",
            file=out,
        )
    print(f"  k-hat  {report['khat']:.2f}  {report['khat_verdict']}", file=out)
    if "log_z" in report:
        print(f"  log Z  {report['log_z']:.3f} +- {report['log_z_error']:.3f}", file=out)
    if "states" in report:
        print(
            f"  free energies relative to {report['reference_state']} "
            f"(bootstrap errors, block = {report['block_length']} samples):",
            file=out,
        )
        _print_states(report["states"], out)
    if "states_error" in report:
        print(f"  state free energies not estimated: {report['states_error']}", file=out)
    if "target_temperature" in report:
        t = report["target_temperature"]
        print(
            f"  reweighted to {t['temperature_K']:g} K: f(T2) - f(T) = "
            f"{t['delta_f_reduced']:.3f} +- {t['delta_f_reduced_error']:.3f} "
            f"(reduced); ESS {100 * t['ess_fraction']:.1f} %",
            file=out,
        )
        if "states" in t:
            _print_states(t["states"], out)


def reference_path(ref: str | Path) -> str:
    """A reference ``.npz``, or the ``reference.npz`` in a folder (e.g. systems/aldp/reference,
    found among the shipped systems outside a checkout: `boltzgen.systems.resolve_path`)."""
    from boltzgen.systems import resolve_path

    p = resolve_path(ref)
    if p.is_dir():
        p = p / "reference.npz"
    if not p.is_file():
        raise BoltzgenError(
            f"reference {ref!r} not found (an .npz or a directory with reference.npz)"
        )
    return str(p)


def _bond_graph(system: str, positions: np.ndarray) -> list[tuple[int, int]]:
    """Bonds of the system's topology; by distance (< 0.19 nm) if it cannot be loaded."""
    from boltzgen import systems

    try:
        top = systems.load(system).mdtraj_topology
        if top.n_atoms == positions.shape[1]:
            return [(b[0].index, b[1].index) for b in top.bonds]
    except BoltzgenError:
        pass
    d = np.linalg.norm(positions[0][:, None] - positions[0][None], axis=-1)
    i, j = np.nonzero(np.triu(d < 0.19, k=1))
    return list(zip(i.tolist(), j.tolist()))


def evaluate_samples(
    samples: SampleSet,
    reference: SampleSet,
    states: StatesFile | Sequence[State] | None,
    out_dir: str | Path | None = None,
    bins: int = 60,
    n_bootstrap: int = 100,
    block_length: int | None = None,
    seed: int = 0,
    training_log: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of `samples` against `reference`; plots into `out_dir` when given (with the
    curves of a CSV `training_log` too).

    Metrics: ESS, k-hat, ``KL(reference || sample)`` of the 2-D histogram of two CVs raw and
    reweighted (``ramachandran_kl_*``, over ``ramachandran_cvs``: phi and psi when the molecule
    has one of each, else the states file's first two; see `fes_cvs`), per-torsion marginal
    KLs (from positions), state free energies of both with errors and their difference, mean
    potential energies. Plots: that 2-D free-energy surface, a 1-D profile per CV of the
    surface and of the states, energy distributions.
    """
    from boltzgen import analysis

    sf = _as_states_file(states)
    cvs_s = sample_cvs(samples, sf.cvs)
    cvs_r = sample_cvs(reference, sf.cvs)
    if sf.states:
        _check_states(sf, list(cvs_s), f"the CVs of {samples.path}")
        _check_states(sf, list(cvs_r), f"the CVs of {reference.path}")
    common = [c for c in cvs_s if c in cvs_r]
    pair = fes_cvs(common, sf)
    n = samples.n
    lw = samples.log_w if samples.log_w is not None else np.zeros(n)
    block = _block_length(samples, block_length)
    block_ref = _block_length(reference, None)
    m: dict[str, Any] = {
        "samples": samples.path,
        "reference": reference.path,
        "n_samples": n,
        "n_reference": reference.n,
        "ess": rw.ess(lw),
        "ess_fraction": rw.ess_fraction(lw),
        "khat": rw.pareto_khat(lw) if n >= rw.KHAT_MIN_SAMPLES else float("nan"),
        "bins": bins,
    }
    m["khat_verdict"] = rw.khat_verdict(m["khat"], n)
    if len(pair) == 2:
        pp = np.stack([cvs_s[c] for c in pair], 1)
        ref_pp = np.stack([cvs_r[c] for c in pair], 1)
        m["ramachandran_cvs"] = pair
        m["ramachandran_kl_raw"] = analysis.ramachandran_kl(
            pp, ref_pp, None, bins, reference_log_w=reference.log_w
        )
        m["ramachandran_kl_reweighted"] = analysis.ramachandran_kl(
            pp, ref_pp, lw, bins, reference_log_w=reference.log_w
        )
    if samples.positions is not None and reference.positions is not None:
        if samples.positions.shape[1] != reference.positions.shape[1]:
            raise BoltzgenError(
                f"samples have {samples.positions.shape[1]} atoms, the reference "
                f"{reference.positions.shape[1]}"
            )
        quads = analysis.torsion_quadruples(_bond_graph(samples.system, reference.positions))
        if quads:
            ts = analysis.torsions(samples.positions, quads)
            tr = analysis.torsions(reference.positions, quads)
            kls = analysis.marginal_kls(
                ts,
                tr,
                lw[samples.position_index],
                bins=50,
                periodic=np.ones(len(quads), bool),
                reference_log_w=None
                if reference.log_w is None
                else reference.log_w[reference.position_index],
            )
            m["torsion_marginal_kl"] = {
                "mean": float(np.mean(kls)),
                "max": float(np.max(kls)),
                "per_torsion": [{"atoms": list(q), "kl": float(k)} for q, k in zip(quads, kls)],
            }
    if sf.states:
        kT = samples.kT
        res = rw.state_free_energies(sf.states, cvs_s, lw, kT, n_bootstrap, block, seed)
        ref = rw.state_free_energies(
            sf.states,
            cvs_r,
            reference.log_w,
            reference.kT,
            n_bootstrap,
            block_ref,
            seed,
        )
        rows = []
        for s, r in zip(_states_json(res, kT), _states_json(ref, reference.kT)):
            diff = s["dF_kJ_per_mol"] - r["dF_kJ_per_mol"]
            err = math.hypot(s["dF_kJ_per_mol_error"], r["dF_kJ_per_mol_error"])
            rows.append(
                {
                    "name": s["name"],
                    "sample": s,
                    "reference": r,
                    "dF_difference_kJ_per_mol": diff,
                    "dF_difference_error_kJ_per_mol": err,
                }
            )
        m["states"] = rows
    if samples.energies is not None and reference.energies is not None:
        m["mean_energy_kJ_per_mol"] = float(rw.expectation(samples.energies, lw))
        m["reference_mean_energy_kJ_per_mol"] = float(
            rw.expectation(reference.energies, reference.log_w)
        )
    if out_dir is not None:
        profiles = pair + [c for c in sf.cv_names if c in common and c not in pair]
        m["plots"] = _evaluate_plots(
            samples,
            reference,
            (cvs_s, cvs_r, pair, profiles),
            lw,
            (block, block_ref),
            Path(out_dir),
            bins,
            n_bootstrap,
            seed,
        )
        if training_log is not None:
            from boltzgen.analysis import plots

            paths = [Path(out_dir) / "training.png", Path(out_dir) / "training.pdf"]
            plots.plot_training_curves(training_log, paths)
            m["plots"].extend(str(p) for p in paths)
    return m


def _evaluate_plots(
    samples: SampleSet,
    reference: SampleSet,
    cvs: tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str], list[str]],
    lw: np.ndarray,
    blocks: tuple[int, int],
    out: Path,
    bins: int,
    n_bootstrap: int,
    seed: int,
) -> list[str]:
    """Figures of `evaluate_samples`; ``cvs`` is (sample CVs, reference CVs, the 2-D surface's
    pair, the CVs with a 1-D profile)."""
    from boltzgen.analysis import plots

    cvs_s, cvs_r, pair, profiles = cvs
    written: list[str] = []

    def both(stem: str) -> list[Path]:
        paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
        written.extend(str(p) for p in paths)
        return paths

    kT = reference.kT
    if len(pair) == 2:
        pp = np.stack([cvs_s[c] for c in pair], 1)
        ref_pp = np.stack([cvs_r[c] for c in pair], 1)
        plots.plot_ramachandran(
            [
                ("samples (raw)", pp, None),
                ("samples (reweighted)", pp, lw),
                ("MD reference", ref_pp, reference.log_w),
            ],
            both("ramachandran"),
            bins=bins,
            kT=kT,
            labels=(cv_label(pair[0]), cv_label(pair[1])),
        )
    for name in profiles:
        plots.plot_fes_1d(
            [
                ("reweighted samples", cvs_s[name], lw, blocks[0]),
                ("MD reference", cvs_r[name], reference.log_w, blocks[1]),
            ],
            both(f"fes_{name}"),
            xlabel=cv_label(name),
            bins=bins,
            kT=kT,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    if samples.energies is not None and reference.energies is not None:
        plots.plot_energy_distributions(
            [
                ("samples (raw)", samples.energies, None),
                ("samples (reweighted)", samples.energies, lw),
                ("MD reference", reference.energies, reference.log_w),
            ],
            both("energies"),
        )
    return written
