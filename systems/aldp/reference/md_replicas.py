"""Independent replicas of the reference's biased MD, run in parallel until a wall-clock deadline.

Each replica is the run that made ``reference.npz`` (``boltzgen md aldp`` with the same phi
well, time step, friction, save interval and platform; see README.md) with its own seed,
started from the system's minimised structure. At the deadline every replica gets SIGTERM,
finishes its chunk and keeps the frames so far. The replicas are packed into one ``.npz``
(``replica``, ``time_ps``, ``phi``, ``psi``, ``energies``, ``log_weights`` of every frame;
positions of every ``stride``-th frame with ``frame_index``; ``settings`` as JSON), which
``build_reference.py --extra`` adds to the reference as independent trajectories.

A replica killed hard still has the frames of its last checkpoint (every 20 ps): they are packed
in its place, and ``--pack-only`` packs a work folder without running anything. Needs only
numpy, torch and OpenMM (no mdtraj), so it also runs on a bare machine::

    python systems/aldp/reference/md_replicas.py --replicas 13 --seed 3001 --deadline-s 480 \\
        --out replicas.npz
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The reference run's settings (README.md): phi well, 1 fs, 1/ps, a frame every 0.1 ps.
BIAS = {"atoms": (4, 6, 8, 14), "height": 17.0, "center_deg": 15.0, "kappa": 2.5}
TIMESTEP_PS = 0.001
FRICTION = 1.0
SAVE_INTERVAL = 100
#: What ``_recover`` reads from an MD checkpoint.
CKPT_KEYS = ("positions", "energies", "time_ps", "log_weights", "settings")


def _one(seed: int, out: Path, n_steps: int) -> int:
    """Run one replica until done or SIGTERM; write its frames to ``out`` (npz)."""
    from boltzgen import systems
    from boltzgen.sampling import md

    system = systems.load("aldp")
    bias = md.TorsionBias(
        BIAS["atoms"], BIAS["height"], math.radians(BIAS["center_deg"]), BIAS["kappa"]
    )
    try:
        result = md.run_md(
            system,
            n_steps,
            save_interval=SAVE_INTERVAL,
            timestep=TIMESTEP_PS,
            friction=FRICTION,
            bias=bias,
            bias_scales=[1.0],
            seed=seed,
            platform="CPU",
            threads=1,
            checkpoint=out.with_suffix(".ckpt.npz"),
            checkpoint_interval=20_000,
            progress=False,
        )
    except md.MDInterrupted as stop:
        result = stop.result
    _write_replica(system, result, out)
    return 0


def _write_replica(system: Any, frames: Any, out: Path) -> None:
    """Write one replica's frames (``positions``, ``energies``, ``time_ps``, ``log_weights``,
    ``settings``: an MD result or its checkpoint) with their phi/psi to ``out`` (npz)."""
    from boltzgen.sampling import md

    cvs = md.backbone_dihedrals(system, frames.positions)
    settings = frames.settings if isinstance(frames.settings, str) else json.dumps(frames.settings)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        positions=frames.positions,
        energies=frames.energies,
        time_ps=frames.time_ps,
        log_weights=frames.log_weights,
        phi=cvs["phi"],
        psi=cvs["psi"],
        settings=settings,
    )
    os.replace(tmp, out)


def _recover(work: Path, seeds: list[int]) -> list[int]:
    """Replicas that ended without writing their frames (killed hard, machine lost): write the
    frames of their last checkpoint (``replica_SEED.ckpt.npz``) instead. Returns those seeds."""
    from types import SimpleNamespace

    from boltzgen import systems

    done, system = [], None
    for seed in seeds:
        out, ckpt = work / f"replica_{seed}.npz", work / f"replica_{seed}.ckpt.npz"
        if out.exists() or not ckpt.exists():
            continue
        system = system or systems.load("aldp")
        with np.load(ckpt) as c:
            frames = SimpleNamespace(**{k: c[k] for k in CKPT_KEYS})
        frames.settings = str(frames.settings)
        _write_replica(system, frames, out)
        done.append(seed)
    return done


def _pack(parts: list[Path], stride: int, out: Path) -> dict:
    """Concatenate replica files into one npz; returns a summary."""
    keys = ("time_ps", "phi", "psi", "energies", "log_weights")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "replica")}
    pos, index, lengths, settings = [], [], [], []
    offset = 0
    for r, path in enumerate(parts):
        with np.load(path) as d:
            n = d["phi"].shape[0]
            for k in keys:
                cols[k].append(np.asarray(d[k]))
            cols["replica"].append(np.full(n, r, dtype=np.int32))
            keep = np.arange(0, n, stride)
            pos.append(d["positions"][keep])
            index.append(keep + offset)
            settings.append(json.loads(str(d["settings"])))
            lengths.append(n)
            offset += n
    np.savez_compressed(
        out,
        **{
            k: np.concatenate(v).astype(np.float32 if k in ("phi", "psi") else v[0].dtype)
            for k, v in cols.items()
        },
        positions=np.concatenate(pos).astype(np.float32),
        frame_index=np.concatenate(index),
        settings=json.dumps(settings),
    )
    return {"replicas": len(parts), "frames": lengths, "ns": sum(lengths) * 1e-4}


def _finish(work: Path, seeds: list[int], stride: int, out: Path) -> dict:
    """Pack the replicas of ``seeds`` in ``work`` into ``out``, recovering from checkpoints the
    ones that left no frames file; returns the pack's summary."""
    recovered = _recover(work, seeds)
    parts = [work / f"replica_{s}.npz" for s in seeds if (work / f"replica_{s}.npz").exists()]
    return {**_pack(parts, stride, out), "seeds": seeds, "from_checkpoints": recovered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--seed", type=int, required=True, help="seed of the first replica (+1 each)")
    ap.add_argument("--deadline-s", type=float, required=True, help="wall seconds to run")
    ap.add_argument("--length-ns", type=float, default=1000.0, help="upper bound per replica")
    ap.add_argument("--stride", type=int, default=10, help="positions of every k-th frame")
    ap.add_argument("--work", default="md_replicas_work")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--pack-only",
        action="store_true",
        help="run nothing: pack the replicas in --work (from their checkpoints where a replica "
        "left no frames file)",
    )
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    n_steps = int(round(args.length_ns * 1000.0 / TIMESTEP_PS))
    if args.one is not None:
        sys.exit(_one(args.one, work / f"replica_{args.one}.npz", n_steps))
    t0 = time.time()
    seeds = [args.seed + r for r in range(args.replicas)]
    if args.pack_only:
        print(json.dumps(_finish(work, seeds, args.stride, Path(args.out))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENMM_CPU_THREADS": "1"}
    procs = []
    for seed in seeds:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(seed),
            "--seed",
            str(seed),
            "--deadline-s",
            "0",
            "--length-ns",
            str(args.length_ns),
            "--work",
            str(work),
            "--out",
            "-",
        ]
        log = open(work / f"replica_{seed}.log", "w")
        procs.append((seed, subprocess.Popen(cmd, env=env, stdout=log, stderr=log)))
    while time.time() - t0 < args.deadline_s and any(p.poll() is None for _, p in procs):
        time.sleep(2.0)
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for _, p in procs:
        p.wait()
    summary = _finish(work, seeds, args.stride, Path(args.out))
    print(json.dumps({**summary, "wall_s": time.time() - t0}))


if __name__ == "__main__":
    main()
