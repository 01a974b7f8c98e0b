"""Benchmark: training wall time of one run config, an earlier commit against this checkout.

Issue 12 asks for the training wall time of the main command's config at the same iteration
count before and after, on the same machine in the same session. This script checks the
earlier commit out into a temporary git worktree and runs ``python -m boltzgen train CONFIG
--max-iter N`` from each tree (the earlier one through ``PYTHONPATH``, in this Python
environment), alternating ``--repeats`` times so that both see the same conditions, and reads
"trained N iterations in X s" from each run's output. Each run gets a fresh output folder; the
config file is this checkout's for both (a key an older tree does not know is its error, so
pass a config both understand).

``--threads`` is passed to neither run by default: each tree trains with its own default
(the earlier commit used torch's default threads, 2 on a 2-core machine; this one uses 1).
Pass ``--threads N`` to give both the same thread count.

Prints JSON: machine, the commits, per tree the wall times, their median, and the ratio
after/before of the medians.

Run:  python benchmarks/train_wall.py --before 4d9b7bf --max-iter 3000 [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402 (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TRAINED = re.compile(r"trained (\d+) iterations in ([0-9.]+) s")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def train_once(tree: Path, config: Path, max_iter: int, out: Path, threads: int | None) -> float:
    """Seconds of training (the run's own "trained ... in X s") of one run from ``tree``."""
    cmd = [sys.executable, "-m", "boltzgen", "train", str(config), "--max-iter", str(max_iter),
           "--output-dir", str(out), "--no-progress"]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    run = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    match = TRAINED.search(run.stdout + run.stderr)
    if run.returncode != 0 or match is None:
        raise RuntimeError(f"training from {tree} failed:\n{run.stdout}\n{run.stderr}")
    return float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--config", default="systems/aldp/reverse_kl_quick.yaml")
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both runs (default: each tree's own default)",
    )
    args = parser.parse_args()
    config = (ROOT / args.config).resolve()
    before = _git("rev-parse", "--short", args.before)
    after = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    times: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="boltzgen-train-wall-") as tmp:
        old = Path(tmp) / "before"
        _git("worktree", "add", "--detach", str(old), before)
        try:
            for r in range(args.repeats):
                for name, tree in (("before", old), ("after", ROOT)):
                    out = Path(tmp) / f"{name}-{r}"
                    times[name].append(train_once(tree, config, args.max_iter, out, args.threads))
        finally:
            _git("worktree", "remove", "--force", str(old))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        **machine(),
        "config": args.config,
        "max_iter": args.max_iter,
        "threads": args.threads if args.threads is not None else "each tree's default",
        "commits": {"before": before, "after": after + ("+local changes" if dirty else "")},
        "wall_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "median_wall_s": med,
        "ratio_after_over_before": med["after"] / med["before"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
