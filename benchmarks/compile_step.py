"""Eager vs ``train.compile: true`` (torch.compile, inductor) on the quick ALDP config.

Each mode trains ``systems/aldp/reverse_kl_quick.yaml`` for ``--iters`` iterations in a fresh
process (one torch thread) and reports the first step (which compiles, in the compiled mode),
the median step time of the iterations after ``--skip``, and the projected wall time of the
config's whole run (first step + ``max_iter`` x median). The default of ``train.compile`` is
the mode with the shorter projected run. Prints JSON headed by the machine.

    nice -n 5 python benchmarks/compile_step.py > benchmarks/compile_step.out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "systems" / "aldp" / "reverse_kl_quick.yaml"


def _worker(compile_: bool, iters: int) -> None:
    """One mode in this process: print the step times (s) as JSON."""
    import torch

    from boltzgen import pipeline
    from boltzgen.config import load_config
    from boltzgen.train import Trainer

    torch.set_num_threads(1)
    config = pipeline.with_overrides(load_config(CONFIG), compile=compile_, progress=False)
    run = pipeline.build_run(config)
    trainer = Trainer(run.model, run.target, config.train, sample_filter=run.sample_filter)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "max_iter": config.train.max_iter}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--skip", type=int, default=10, help="iterations left out of the median")
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.worker == "compiled", args.iters)
        return
    out = {"machine": machine(), "note": args.note, "config": str(CONFIG.relative_to(ROOT))}
    out["torch_threads_per_mode"] = 1
    results = {}
    for mode in ("eager", "compiled"):
        cmd = [sys.executable, __file__, "--worker", mode, "--iters", str(args.iters)]
        res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        t = res["times"]
        median = statistics.median(t[args.skip :])
        results[mode] = {
            "first_step_s": round(t[0], 2),
            "median_step_ms": round(1e3 * median, 2),
            "projected_run_s": round(t[0] + res["max_iter"] * median, 1),
        }
    e, c = results["eager"], results["compiled"]
    saved = e["median_step_ms"] - c["median_step_ms"]
    out["results"] = results
    out["step_speedup"] = round(e["median_step_ms"] / c["median_step_ms"], 3)
    out["break_even_iterations"] = (
        round((c["first_step_s"] - e["first_step_s"]) / (saved / 1e3)) if saved > 0 else None
    )
    out["faster_for_the_quick_run"] = min(results, key=lambda k: results[k]["projected_run_s"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
