"""Benchmark: FAB (alpha = 2, AIS toward p^2/q, prioritised buffer) on the FAB paper's toys.

GMM-40: the 2-D mixture of 40 unit Gaussians with means uniform in [-40, 40]^2 (`toys.gmm40`),
a spline flow on x / 40; FAB with the buffer against reverse KL at the same number of target
evaluations. Reports the modes holding >= 1 % of 100k flow samples, the largest deviation of the
reweighted mode weights from 2.5 %, flow ESS, the AIS (toward p) ESS from the trained flow,
log Z errors, target evaluations and wall time.

Many-well 32-D: 16 copies of the 2-D double well (`toys.ManyWell`, 2^16 modes, exact log Z by
quadrature), a spline flow on the raw coordinates, FAB with the buffer. Reports flow ESS, the
log Z error of the flow and of AIS, and the largest error of the reweighted and unweighted
per-well probabilities P(x1 > 0) against quadrature.

Run:  nice -n 5 OMP_NUM_THREADS=1 python benchmarks/fab_toys.py [--gmm-iters 2000]
      [--mw-iters 1500] [--only gmm|manywell]       (prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from boltzgen.energy.toys import ManyWell, Rescale, gmm40
from boltzgen.flows import Unbounded, make_spline_flow
from boltzgen.sampling.ais import AnnealedImportanceSampler
from boltzgen.sampling.generator import BoltzmannGenerator
from boltzgen.train import Trainer, TrainOptions
from boltzgen.train.fab import FABOptions
from boltzgen.train.objectives import log_ess

GMM_FLOW = dict(n_blocks=8, hidden=64, n_bins=8)
GMM_FAB = dict(
    n_intermediate=2,
    transition="hmc",
    n_leapfrog=3,
    step_size=0.05,
    buffer_capacity=4096,
    buffer_min_length=1024,
    n_updates_per_ais=4,
)
MW_FLOW = dict(n_blocks=10, hidden=128, n_bins=8)
MW_FAB = dict(
    n_intermediate=4,
    transition="hmc",
    n_leapfrog=3,
    step_size=0.1,
    buffer_capacity=25600,
    buffer_min_length=2560,
    n_updates_per_ais=4,
)


def _ess_fraction(log_w: torch.Tensor) -> float:
    log_w = log_w[torch.isfinite(log_w)]
    return float(log_ess(log_w.double()).exp()) / max(1, log_w.numel())


def _log_z(log_w: torch.Tensor) -> float:
    return float(torch.logsumexp(log_w.double(), 0) - math.log(log_w.numel()))


def _train(model, target, objective, iters, batch, lr, fab=None) -> tuple[Trainer, float]:
    opts = TrainOptions(
        max_iter=iters,
        batch_size=batch,
        objective=objective,
        lr=lr,
        progress=False,
        dtype="float32",
        seed=0,
    )
    tr = Trainer(model, target, opts, fab_options=fab)
    t0 = time.perf_counter()
    tr.run()
    return tr, time.perf_counter() - t0


def _ais_toward_p(model, target, n, n_intermediate) -> torch.Tensor:
    """Log-weights of AIS (alpha = 1) from the trained flow toward p, in the flow's space."""
    flow, coords = model.flow, model.coordinates
    s = float(coords.scale) if coords is not None else 1.0
    dim = flow.base.dim

    def log_p(y):
        return target.log_prob(y * s) + dim * math.log(s)

    sampler = AnnealedImportanceSampler(dim, n_intermediate, step_size=0.05 / s, alpha=1.0)
    out = None
    for _ in range(3):  # two rounds adapt the step sizes
        with torch.no_grad():
            y, lq = flow.sample_and_log_prob(n)
        out = sampler(y, flow.log_prob, log_p, log_q=lq).log_w
    return out


def _gmm_modes(model, target, n=100_000):
    with torch.no_grad():
        x, lq = model.sample(n, 20_000)
    lw = target.log_prob(x.double()) - lq.double()
    frac, rw = target.mode_fractions(x, lw)
    return frac, rw, lw


def bench_gmm(iters: int) -> dict:
    target = gmm40()

    def model():
        torch.manual_seed(0)
        flow = make_spline_flow([Unbounded()] * 2, seed=0, **GMM_FLOW)
        return BoltzmannGenerator(flow, Rescale(40.0))

    out = {}
    fab, wall = _train(model(), target, "fab", iters, 256, 2e-3, FABOptions(**GMM_FAB))
    evals = fab.counters["target_evals"]
    rkl, wall_r = _train(model(), target, "reverse_kl", evals // 256, 256, 2e-3)
    for name, tr, w in (("fab_buffer", fab, wall), ("reverse_kl", rkl, wall_r)):
        frac, rw, lw = _gmm_modes(tr.model, target)
        ais_lw = _ais_toward_p(tr.model, target, 4096, 8)
        out[name] = {
            "iterations": tr.iteration,
            "target_evals": tr.counters["target_evals"],
            "wall_s": round(w, 1),
            "modes_ge_1pct": int((frac >= 0.01).sum()),
            "min_mode_fraction": round(float(frac.min()), 5),
            "max_abs_reweighted_minus_2.5pct": round(float((rw - 0.025).abs().max()), 5),
            "flow_ess_fraction_100k": round(_ess_fraction(lw), 4),
            "ais8_ess_fraction_4096": round(_ess_fraction(ais_lw), 4),
            "log_z_error_flow": round(_log_z(lw[torch.isfinite(lw)]) - target.log_z, 4),
            "log_z_error_ais8": round(_log_z(ais_lw) - target.log_z, 4),
        }
    return {"settings": {"flow": GMM_FLOW, "fab": GMM_FAB, "batch": 256, "lr": 2e-3}, **out}


def bench_many_well(iters: int) -> dict:
    target = ManyWell(16)
    torch.manual_seed(0)
    flow = make_spline_flow([Unbounded()] * 32, seed=0, **MW_FLOW)
    model = BoltzmannGenerator(flow)
    tr, wall = _train(model, target, "fab", iters, 512, 1e-3, FABOptions(**MW_FAB))
    with torch.no_grad():
        x, lq = model.sample(50_000, 10_000)
        lw = target.log_prob(x.double()) - lq.double()
    ok = torch.isfinite(lw)
    w = torch.softmax(lw[ok], 0)
    pos = (x[ok, 0::2] > 0).double()
    grid, cdf = target.well._grid, target.well._cdf
    p_exact = 1 - float(np.interp(0.0, grid, cdf))
    ais_lw = _ais_toward_p(model, target, 2048, 8)
    return {
        "settings": {"flow": MW_FLOW, "fab": MW_FAB, "batch": 512, "lr": 1e-3},
        "iterations": tr.iteration,
        "target_evals": tr.counters["target_evals"],
        "wall_s": round(wall, 1),
        "flow_ess_fraction_50k": round(_ess_fraction(lw), 4),
        "ais8_ess_fraction_2048": round(_ess_fraction(ais_lw), 4),
        "log_z_exact": round(target.log_z, 4),
        "log_z_error_flow": round(_log_z(lw[ok]) - target.log_z, 4),
        "log_z_error_ais8": round(_log_z(ais_lw) - target.log_z, 4),
        "p_x1_pos_exact": round(p_exact, 4),
        "max_abs_err_p_x1_pos_reweighted": round(float(((w @ pos) - p_exact).abs().max()), 4),
        "max_abs_err_p_x1_pos_flow": round(float((pos.mean(0) - p_exact).abs().max()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gmm-iters", type=int, default=2000)
    p.add_argument("--mw-iters", type=int, default=1500)
    p.add_argument("--only", choices=("gmm", "manywell"), default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    out: dict = {"torch": torch.__version__}
    if args.only in (None, "gmm"):
        out["gmm40"] = bench_gmm(args.gmm_iters)
    if args.only in (None, "manywell"):
        out["many_well_32d"] = bench_many_well(args.mw_iters)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
