"""Train a chain of run configs within a wall-clock budget (how the shipped model was trained).

Each stage is a run config with the share of the budget it gets (``CONFIG:SHARE``); a stage
after the first starts from the previous stage's checkpoint (its ``init_from`` is replaced).
Before each stage a short calibration run (``--calibrate`` iterations, same device and config)
times the iterations/s; the stage then runs ``max_iter = rate * seconds``, its seconds being its
share of the budget, the last stage everything left before the deadline. A stage's learning-rate
schedule thus ends when its time does, unlike a run cut off by a signal. Stage outputs go to
``--out/stage<i>/`` (checkpoint.pt, log.csv); a JSON summary is printed and written to
``--out/summary.json``.

    python benchmarks/train_within_budget.py --device cuda --budget-s 420 --out runs/gpu \\
        systems/aldp/recipes/gpu_pretrained/1_reverse_kl.yaml:0.6 \\
        systems/aldp/recipes/gpu_pretrained/2_reweighted.yaml:0.4
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402


def _train(config: Path, device: str, n_iter: int, out: Path) -> float:
    """Run ``boltzgen train`` on ``config``; return its wall time (s)."""
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "boltzgen",
        "train",
        str(config),
        "--device",
        device,
        "--max-iter",
        str(n_iter),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _rate(log_csv: Path, skip: int) -> float:
    """Iterations/s between iteration ``skip`` and the last one of a training log."""
    with open(log_csv) as fh:
        rows = list(csv.DictReader(fh))
    first = next(r for r in rows if int(r["iteration"]) == skip)
    last = rows[-1]
    return (int(last["iteration"]) - skip) / (float(last["wall_s"]) - float(first["wall_s"]))


def _stage_config(config: Path, init_from: Path | None, work: Path, name: str) -> Path:
    data = yaml.safe_load(config.read_text())
    if init_from is not None:
        data["init_from"] = str(init_from.resolve())
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="+", help="CONFIG:SHARE, in training order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--budget-s", type=float, required=True, help="training seconds, all stages"
    )
    parser.add_argument("--calibrate", type=int, default=60, help="iterations of each timing run")
    parser.add_argument("--out", type=Path, default=Path("runs/within_budget"))
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="calibration runs and stage configs (default: OUT/work)",
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "machine": machine(args.device),
        "device": args.device,
        "budget_s": args.budget_s,
        "stages": [],
    }
    previous: Path | None = None
    stages = [s.rsplit(":", 1) for s in args.stages]
    for i, (config, share) in enumerate(stages, start=1):
        cfg = _stage_config(Path(config), previous, work, f"stage{i}")
        cal_dir = work / f"calibration{i}"
        cal_wall = _train(cfg, args.device, args.calibrate, cal_dir)
        rate = _rate(cal_dir / "log.csv", skip=min(20, args.calibrate // 2))
        remaining = deadline - time.perf_counter()
        last = i == len(stages)
        seconds = remaining if last else min(remaining, float(share) * args.budget_s)
        startup = cal_wall - args.calibrate / rate  # loading, minimising, first steps
        n_iter = max(100, int(rate * max(seconds - startup, 0.0)) // 100 * 100)
        out = args.out / f"stage{i}"
        wall = _train(cfg, args.device, n_iter, out)
        previous = out / "checkpoint.pt"
        summary["stages"].append(
            {
                "config": config,
                "iterations": n_iter,
                "wall_s": wall,
                "calibration_its_per_s": rate,
                "calibration_wall_s": cal_wall,
            }
        )
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["total_wall_s"] = time.perf_counter() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
