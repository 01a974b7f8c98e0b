"""Iterations/s of the quick ALDP config: 1 process x 2 threads, 1 x 1, 2 processes x 1 thread.

Every setting trains ``systems/aldp/reverse_kl_quick.yaml`` (global batch 256; with 2
processes 128 per rank) for ``--iters`` iterations in a fresh ``boltzgen train`` process (with
``--nproc 2``, torch's launcher and two workers) and is repeated ``--repeats`` times,
interleaved. The rate is taken from the log's ``wall_s`` (training time of rank 0, collectives
included) over the iterations after the first ``--skip``; the process's whole wall time (start,
system build, launcher) is printed too. Prints JSON headed by the machine; on a shared machine
the numbers move with the other jobs.

    nice -n 5 python benchmarks/ddp.py > benchmarks/ddp.out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "systems" / "aldp" / "reverse_kl_quick.yaml"
SETTINGS = {"1 process x 2 threads": (1, 2), "1 process x 1 thread": (1, 1),
            "2 processes x 1 thread": (2, 1)}  # fmt: skip


def run_once(nproc: int, threads: int, iters: int, skip: int) -> dict:
    """Train once in fresh processes; iterations/s after ``skip`` and the whole wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "boltzgen", "train", str(CONFIG), "--max-iter", str(iters),
               "--output-dir", tmp, "--no-progress", "--threads", str(threads),
               "--nproc", str(nproc)]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        total = time.perf_counter() - t0
        with open(Path(tmp) / "log.csv") as fh:
            rows = list(csv.DictReader(fh))
    wall = [float(r["wall_s"]) for r in rows]
    return {
        "its_per_s": round((len(wall) - skip) / (wall[-1] - wall[skip - 1]), 2),
        "process_wall_s": round(total, 1),
    }


def main() -> None:
    """Run every setting ``--repeats`` times and print the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="warm-up iterations left out")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--note", default="", help="what else ran on the machine (printed with the results)"
    )
    args = p.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, (nproc, threads) in SETTINGS.items():
            runs[name].append(run_once(nproc, threads, args.iters, args.skip))
    out = {
        "machine": machine(),
        "note": args.note,
        "config": str(CONFIG.relative_to(ROOT)),
        "global_batch": 256,
        "iterations": args.iters,
        "skipped_warmup_iterations": args.skip,
        "results": {
            name: {
                "its_per_s_median": statistics.median(r["its_per_s"] for r in rs),
                "runs": rs,
            }
            for name, rs in runs.items()
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
