"""Training speed of the quick ALDP config with N torch threads, quiet and under CPU load.

For each thread count, trains ``--iters`` iterations of ``systems/aldp/reverse_kl_quick.yaml``
(after 10 warm-up iterations) once on a quiet machine and once while a competing CPU-bound
process (a Python busy loop) runs, and prints JSON: iterations/s, and the loaded/quiet ratio
(the goal: the CLI default keeps >= 50 % of its quiet speed). Each measurement runs in a fresh
process, so torch's thread pool starts clean.

Run:  python benchmarks/threads.py [--threads 1 2] [--iters 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _machine import machine  # benchmarks/ is on sys.path

CHILD = r"""
import json, subprocess, sys, time
from dataclasses import replace
import torch
torch.set_num_threads(int(sys.argv[1]))
from boltzgen.config import load_config
from boltzgen.pipeline import build_run
from boltzgen.train import Trainer
cfg = load_config("systems/aldp/reverse_kl_quick.yaml")
n = int(sys.argv[3])
cfg = replace(cfg, train=replace(cfg.train, max_iter=n + 10, progress=False))
run = build_run(cfg)
trainer = Trainer(run.model, run.target, cfg.train, sample_filter=run.sample_filter)
trainer.run(stop_at=10)
hog = None
if sys.argv[2] == "load":
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
try:
    t0 = time.perf_counter()
    trainer.run(stop_at=n + 10)
    wall = time.perf_counter() - t0
finally:
    if hog is not None:
        hog.kill()
print(json.dumps({"it_per_s": n / wall}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args()

    out = {
        **{k: v for k, v in machine().items() if k != "threads"},  # each run sets its own
        "iterations": args.iters,
        "runs": [],
    }
    for threads in args.threads:
        row = {"threads": threads}
        for mode in ("quiet", "load"):
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(threads), mode, str(args.iters)],
                capture_output=True,
                text=True,
                check=True,
            )
            row[f"{mode}_it_per_s"] = json.loads(res.stdout.strip().splitlines()[-1])["it_per_s"]
        row["load_over_quiet"] = row["load_it_per_s"] / row["quiet_it_per_s"]
        out["runs"].append(row)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
