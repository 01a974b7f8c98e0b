"""Compact an ALDP MD run (``boltzgen md`` output) into the shipped reference and its README.

Usage (from the repository root)::

    python systems/aldp/reference/build_reference.py RUN.npz --command "boltzgen md aldp ..."

Writes, next to this script:
    reference.npz  phi, psi (radians, float32) and energies (kJ/mol, float32) of every saved frame,
                   time_ps; positions (nm, float32) of every `stride`-th frame with frame_index;
                   temperature, system, settings (a boltzgen samples file, weights uniform).
    reference.pdb  topology (first frame).
    summary.json   basin populations and free energies (whole run and two halves).
    README.md      how the reference was made, its length and the numbers above.

Errors are moving-block bootstrap standard errors over time (blocks of `n / 20` frames); the
README also lists the error against the block length, which levels off once blocks are longer
than the correlation time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml

from boltzgen.analysis import reweighting as rw
from boltzgen.systems import load
from boltzgen.units import MOLAR_GAS_CONSTANT

HERE = Path(__file__).resolve().parent


def _states() -> list[rw.State]:
    spec = yaml.safe_load((HERE.parent / "states.yaml").read_text())
    return rw.states_from_dict(spec, scale=math.pi / 180.0)


def _estimate(
    phi: np.ndarray, psi: np.ndarray, lw: np.ndarray | None, kT: float, block: int, seed: int = 0
) -> dict:
    res = rw.state_free_energies(
        _states(),
        {"phi": phi, "psi": psi},
        lw,
        kT,
        n_bootstrap=1000,
        block_length=block,
        seed=seed,
    )
    return {
        "block_frames": block,
        "states": {
            n: {
                "population": float(p),
                "population_error": float(pe),
                "dF_kJ_per_mol": float(f) + 0.0,
                "dF_kJ_per_mol_error": float(fe),
            }
            for n, p, pe, f, fe in zip(
                res.names,
                res.population,
                res.population_error,
                res.free_energy,
                res.free_energy_error,
            )
        },
    }


def _frames(
    run: np.lib.npyio.NpzFile, extras: list[str], burn_in_ps: float
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict]]:
    """All frames of `run` (trajectory 0) and of the replicas in the `extras` packs (trajectories
    1, 2, ..., each without its first `burn_in_ps`): per-frame arrays, the positions kept and
    their frame indices, and a description of every trajectory."""
    keys = ("phi", "psi", "energies", "time_ps") + (
        ("log_weights",) if "log_weights" in run.files else ()
    )
    n0 = run["phi"].shape[0]
    cols = {k: [np.asarray(run[k], dtype=np.float64)] for k in keys}
    cols["trajectory"] = [np.zeros(n0, dtype=np.int64)]
    index0 = run["frame_index"] if "frame_index" in run.files else np.arange(n0)
    pos, pos_index = [np.asarray(run["positions"])], [np.asarray(index0)]
    seed = json.loads(str(run["settings"])).get("seed")
    trajectories = [{"seed": seed, "frames": int(n0), "burn_in_ps": 0.0}]
    offset = n0
    for path in extras:
        with np.load(path) as pack:
            seeds = [s.get("seed") for s in json.loads(str(pack["settings"]))]
            replica, t = pack["replica"], pack["time_ps"]
            kept = np.flatnonzero(t > burn_in_ps)
            new_index = np.full(t.shape[0], -1)
            for r in np.unique(replica):
                mine = kept[replica[kept] == r]
                new_index[mine] = offset + np.arange(mine.shape[0])
                for k in keys:
                    cols[k].append(np.asarray(pack[k][mine], dtype=np.float64))
                cols["trajectory"].append(np.full(mine.shape[0], len(trajectories)))
                trajectories.append(
                    {"seed": seeds[r], "frames": int(mine.shape[0]), "burn_in_ps": burn_in_ps}
                )
                offset += mine.shape[0]
            mapped = new_index[pack["frame_index"]]
            pos.append(pack["positions"][mapped >= 0])
            pos_index.append(mapped[mapped >= 0])
    data = {k: np.concatenate(v) for k, v in cols.items()}
    return data, np.concatenate(pos), np.concatenate(pos_index), trajectories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="npz written by boltzgen md")
    ap.add_argument("--command", required=True, help="the exact command that made the run")
    ap.add_argument("--stride", type=int, default=3, help="keep positions of every k-th frame")
    ap.add_argument("--wall-time", default="", help="wall-clock time of the run, for the README")
    ap.add_argument("--note", default="", help="a paragraph added to the README")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="an md_replicas.py pack of independent replicas of the same run (repeatable)",
    )
    ap.add_argument(
        "--burn-in-ps", type=float, default=100.0, help="dropped from the start of each replica"
    )
    ap.add_argument(
        "--max-positions", type=int, default=10000, help="keep at most this many positions"
    )
    args = ap.parse_args()

    run = np.load(args.run)
    settings = json.loads(str(run["settings"]))
    system = load(str(run["system"]))
    temperature = float(run["temperature"])
    kT = MOLAR_GAS_CONSTANT * temperature
    dt = float(run["time_ps"][1] - run["time_ps"][0])
    data, pos, pos_index, trajectories = _frames(run, args.extra, args.burn_in_ps)
    phi, psi, lw = data["phi"], data["psi"], data.get("log_weights")
    n = phi.shape[0]
    keep = np.arange(0, pos.shape[0], max(args.stride, -(-pos.shape[0] // args.max_positions)))
    extra = {} if lw is None else {"log_weights": lw.astype(np.float32)}

    np.savez_compressed(
        HERE / "reference.npz",
        phi=phi.astype(np.float32),
        psi=psi.astype(np.float32),
        energies=data["energies"].astype(np.float32),
        time_ps=data["time_ps"].astype(np.float32),
        trajectory=data["trajectory"].astype(np.int16),
        positions=pos[keep].astype(np.float32),
        frame_index=pos_index[keep],
        temperature=np.array(temperature),
        system=np.array(str(run["system"])),
        settings=run["settings"],
        acceptance=run["acceptance"],
        **extra,
    )
    system.to_mdtraj(pos[:1]).save_pdb(str(HERE / "reference.pdb"))

    whole = _estimate(phi, psi, lw, kT, max(1, n // 20))
    h = n // 2
    halves = [
        _estimate(phi[:h], psi[:h], None if lw is None else lw[:h], kT, max(1, h // 20), 1),
        _estimate(phi[h:], psi[h:], None if lw is None else lw[h:], kT, max(1, h // 20), 2),
    ]
    agreement = {}
    for name in whole["states"]:
        a, b = halves[0]["states"][name], halves[1]["states"][name]
        err = math.hypot(a["dF_kJ_per_mol_error"], b["dF_kJ_per_mol_error"])
        diff = a["dF_kJ_per_mol"] - b["dF_kJ_per_mol"]
        agreement[name] = {
            "difference_kJ_per_mol": diff,
            "combined_error": err,
            "z": abs(diff) / err if err > 0 else 0.0,
        }
    blocks = {}
    for frames in sorted({1, 20, 100, 400, 1000, n // 20, n // 10}):
        est = _estimate(phi, psi, lw, kT, max(1, frames), 3)["states"]
        blocks[int(frames)] = {k: v["dF_kJ_per_mol_error"] for k, v in est.items()}
    summary = {
        "n_frames": n,
        "frame_interval_ps": dt,
        "length_ns": n * dt / 1000.0,
        "trajectories": trajectories,
        "temperature_K": temperature,
        "settings": settings,
        "exchange_acceptance": run["acceptance"].tolist(),
        "weighted": lw is not None,
        "ess_fraction": rw.ess_fraction(lw) if lw is not None else 1.0,
        "khat": rw.pareto_khat(lw) if lw is not None else None,
        "whole": whole,
        "halves": halves,
        "half_agreement": agreement,
        "error_vs_block_frames": blocks,
    }
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (HERE / "README.md").write_text(_readme(summary, args, keep.shape[0], kT))
    print((HERE / "README.md").read_text())


def _trajectory_line(trajectories: list[dict], dt: float) -> str:
    """README line on the independent runs the frames come from."""
    if len(trajectories) <= 1:
        return "* A single trajectory."
    first, rest = trajectories[0], trajectories[1:]
    ns = sum(t["frames"] for t in rest) * dt / 1000.0
    return (
        f"* {len(trajectories)} independent trajectories: the first run (seed {first['seed']}, "
        f"{first['frames'] * dt / 1000.0:.3f} ns) and {len(rest)} replicas of it with seeds "
        f"{rest[0]['seed']}-{rest[-1]['seed']} started from the minimised structure, each without "
        f"its first {rest[0]['burn_in_ps']:g} ps ({ns:.3f} ns together; "
        f"{min(t['frames'] for t in rest) * dt / 1000.0:.2f}-"
        f"{max(t['frames'] for t in rest) * dt / 1000.0:.2f} ns each)."
    )


def _readme(s: dict, args: argparse.Namespace, n_pos: int, kT: float) -> str:
    st = s["settings"]
    temps = ", ".join(f"{t:g}" for t in dict.fromkeys(st["temperatures"]))
    swap = f"neighbour swaps every {st['exchange_interval'] * st['timestep_ps']:g} ps"
    n_rep = len(st["temperatures"])
    if st.get("bias"):
        b = st["bias"]
        well = (
            f"B(phi) = -{b['height']:g} kJ/mol exp({b['kappa']:g} (cos(phi - "
            f"{math.degrees(b['center']):g} deg) - 1)) on phi (atoms {b['atoms']}), which lowers "
            "the barrier to the phi > 0 basins"
        )
        if n_rep == 1:
            method = (
                f"biased MD (umbrella sampling) on "
                f"U + {st['bias_scales'][0]:g} B with "
                f"the well {well}. Every frame carries the importance log-weight s B(x) / kT "
                "(`log_weights`), so reweighted averages are unbiased Boltzmann averages of the "
                "unbiased Hamiltonian"
            )
        else:
            method = (
                f"Hamiltonian replica exchange ({n_rep} replicas at {temps} K, {swap}; scales "
                f"{', '.join(f'{x:g}' for x in st['bias_scales'])}) with the well {well}; the "
                "least biased replica is kept"
            )
    else:
        method = f"temperature replica exchange ({temps} K, {swap}; only the 300 K replica kept)"
    lines = [
        "# ALDP MD reference (implicit solvent, 300 K)",
        "",
        "Alanine dipeptide, AMBER ff96 + OBC1 implicit solvent, no cutoff, no constraints "
        '(`boltzgen.systems.load("aldp")`), sampled at '
        f"{s['temperature_K']:g} K by {method}. OpenMM `LangevinMiddleIntegrator`, "
        f"{st['timestep_ps'] * 1000:g} fs step, friction {st['friction_per_ps']:g}/ps, "
        f"seed {st['seed']}, platform {st['platform']} with {st['threads']} thread(s).",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        f"* Length: **{s['length_ns']:.3f} ns**{' per replica' if n_rep > 1 else ''} "
        f"({s['n_frames']} frames at 300 K, one every {s['frame_interval_ps']:g} ps)"
        + (f"; wall time {args.wall_time}" if args.wall_time else "")
        + ".",
        _trajectory_line(s.get("trajectories", []), s["frame_interval_ps"]),
        (
            "* Exchange acceptance per neighbour pair: "
            + ", ".join(f"{a:.2f}" for a in s["exchange_acceptance"])
            + "."
            if s["exchange_acceptance"]
            else "* No replica exchange."
        ),
        (
            f"* Importance weights: Kish ESS {100 * s['ess_fraction']:.1f} % of the frames, "
            f"PSIS k-hat {s['khat']:.2f} ({rw.khat_verdict(s['khat'], s['n_frames'])})."
            if s["weighted"]
            else "* Equal weights (unbiased frames)."
        ),
        "",
        "Produced with (the run is checkpointed; re-running the command resumes it, and a "
        "resumed run is bit-identical to an uninterrupted one):",
        "",
        "```",
        args.command,
        "python systems/aldp/reference/build_reference.py <out>.npz"
        + "".join(f" --extra {Path(e).name}" for e in args.extra)
        + (f" --burn-in-ps {args.burn_in_ps:g}" if args.extra else "")
        + f" --stride {args.stride} --max-positions {args.max_positions} --command '...'",
        "```",
        "",
        "## Files",
        "",
        f"* `reference.npz`: `phi`, `psi` (radians) and `energies` (kJ/mol) of all {s['n_frames']}"
        f" frames, `time_ps` and `trajectory` (which run each frame belongs to); `positions` (nm, "
        f"float32) of {n_pos} frames spread over all runs (indices in `frame_index`); "
        "`temperature`, `system`, `settings` (of the first run). It "
        "is a boltzgen samples file (with `log_weights` when the frames are biased), usable as "
        "`boltzgen evaluate samples.npz --reference systems/aldp/reference`.",
        "* `reference.pdb`: topology. `summary.json`: all numbers below.",
        "",
        "## Basin populations and free energies",
        "",
        "States from `systems/aldp/states.yaml` (see there for the definitions). Errors are one "
        "standard error from a moving-block bootstrap over time (1000 replicates, blocks of "
        "n/20 frames), which accounts for the time correlation of the trajectory. "
        f"kT = {kT:.4f} kJ/mol.",
        "",
        "| state | population | dF (kJ/mol) | dF (kT) |",
        "|---|---|---|---|",
    ]
    for name, v in s["whole"]["states"].items():
        lines.append(
            f"| {name} | {v['population']:.4f} +- {v['population_error']:.4f} | "
            f"{v['dF_kJ_per_mol']:.2f} +- {v['dF_kJ_per_mol_error']:.2f} | "
            f"{v['dF_kJ_per_mol'] / kT:.2f} +- {v['dF_kJ_per_mol_error'] / kT:.2f} |"
        )
    lines += [
        "",
        "## Two independent halves",
        "",
        "First and second half of the run analysed separately (block bootstrap, blocks of "
        "n_half/20 frames). z = |difference| / combined error; |z| < 2 means agreement at the "
        "95 % level.",
        "",
        "| state | first half dF (kJ/mol) | second half dF (kJ/mol) | z |",
        "|---|---|---|---|",
    ]
    for name, ag in s["half_agreement"].items():
        a, b = s["halves"][0]["states"][name], s["halves"][1]["states"][name]
        lines.append(
            f"| {name} | {a['dF_kJ_per_mol']:.2f} +- {a['dF_kJ_per_mol_error']:.2f} | "
            f"{b['dF_kJ_per_mol']:.2f} +- {b['dF_kJ_per_mol_error']:.2f} | {ag['z']:.2f} |"
        )
    lines += [
        "",
        "## Error against bootstrap block length",
        "",
        "Standard error of dF (kJ/mol) for blocks of increasing length; the iid bootstrap "
        "(1 frame) underestimates it, and it levels off once blocks exceed the correlation "
        "time.",
        "",
        "| block (frames) | block (ps) | " + " | ".join(s["whole"]["states"]) + " |",
        "|---|---|" + "---|" * len(s["whole"]["states"]),
    ]
    for frames, errs in s["error_vs_block_frames"].items():
        lines.append(
            f"| {frames} | {int(frames) * s['frame_interval_ps']:g} | "
            + " | ".join(f"{e:.2f}" for e in errs.values())
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
