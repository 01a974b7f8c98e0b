"""Where the largest importance weights of a flow come from: its unbounded internal coordinates
near the splines' tail bound.

Draws ``-n`` flow samples of a checkpoint and prints JSON: the Kish ESS, for thresholds c the
fraction of samples with some unbounded (bond/angle) coordinate beyond |z| = c standard units
and their shares of sum w and sum w^2, and the 20 largest log-weights (minus the median) with
those samples' largest |z|. A flow whose spline tail bound is B puts almost no mass beyond B
(the identity on the Gaussian base there): if the Boltzmann density has mass there, the
largest weights gather at the edge. Run:

    python benchmarks/weight_tails.py runs/aldp_reverse_kl_quick/checkpoint.pt [-n 100000]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from _machine import machine  # benchmarks/ is on sys.path

from boltzgen import pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("-n", "--n-samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=102)
    p.add_argument("--thresholds", type=float, nargs="+", default=[4.0, 4.5, 5.0])
    a = p.parse_args()
    torch.set_num_threads(1)
    run = pipeline.load_run(a.checkpoint)
    s = pipeline.draw_samples(run, a.n_samples, 5000, seed=a.seed)
    lw = s.log_weights - np.median(s.log_weights)
    w = np.exp(lw - lw.max())
    with torch.no_grad():
        z = run.coordinates.to_internal(torch.from_numpy(s.positions).double()).numpy()
    unbounded = np.array([type(d).__name__ == "Unbounded" for d in run.coordinates.domains])
    zmax = np.abs(z[:, unbounded]).max(1)
    top = np.argsort(-lw)[:20]
    out = {
        **machine(),
        "checkpoint": a.checkpoint,
        "tail_bound": run.config.flow.tail_bound,
        "n": int(s.n),
        "ess_fraction": float(w.sum() ** 2 / (w**2).sum() / s.n),
        "beyond": {
            f"{c:g}": {
                "fraction": float((zmax > c).mean()),
                "share_sum_w": float(w[zmax > c].sum() / w.sum()),
                "share_sum_w2": float((w[zmax > c] ** 2).sum() / (w**2).sum()),
            }
            for c in a.thresholds
        },
        "top_log_w_minus_median": np.round(lw[top], 2).tolist(),
        "top_max_abs_z": np.round(zmax[top], 2).tolist(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
