"""Do exact MCMC moves change a model's ALDP basin populations? A check of the MD reference.

Every ALDP model measured so far puts alpha_R (and alpha_L/C7ax) 1-2 reference standard errors
above the MD reference (alpha_R dF 2.01-2.04 kT against 1.89 +- 0.07). Either the flows miss
part of those basins (importance weights cannot restore what is never proposed) or the MD
estimate is off. This script starts ``--walkers`` chains from a weighted sample set (e.g. the
``samples.npz`` of ``boltzgen pipeline aldp --train``), resampled by their importance weights,
and runs generalised HMC on the Boltzmann density itself (`TorchEnergy`, 300 K; unit masses,
leapfrog step ``--step-ps``, ``--leapfrog`` steps per move, momenta kept with factor
``--keep`` and flipped on rejection; exact, every move Metropolis-tested). If the flows missed
part of a basin, the chains flow into it and its population drifts from the weighted
estimate toward the true one; if not, it stays. Prints JSON: the state fractions every
``--every`` moves, their mean over the second half, and how many chains changed state
between the start and each record (to show the chains decorrelate).

Run:  python benchmarks/aldp_hmc_check.py runs/aldp_recipe/samples.npz [--walkers 2000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _machine import machine  # benchmarks/ is on sys.path

from boltzgen import systems
from boltzgen.analysis import phi_psi
from boltzgen.analysis.cvs import load_states
from boltzgen.energy.torch_energy import TorchEnergy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", help="weighted ALDP samples (.npz with positions, log_weights)")
    ap.add_argument("--walkers", type=int, default=2000)
    ap.add_argument("--moves", type=int, default=3000)
    ap.add_argument("--step-ps", type=float, default=0.0005, help="leapfrog step (ps, unit masses)")
    ap.add_argument("--leapfrog", type=int, default=20)
    ap.add_argument("--keep", type=float, default=0.98, help="momentum kept per move")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    system = systems.load("aldp")
    energy, kT = TorchEnergy.from_openmm(system.system), system.kT  # noqa: N806
    states = load_states(None, "aldp").states

    data = np.load(args.samples, allow_pickle=True)
    lw = data["log_weights"]
    w = np.exp(lw - lw.max())
    idx = rng.choice(len(w), size=args.walkers, p=w / w.sum())
    x = torch.tensor(data["positions"][idx], dtype=torch.float64)

    def assign(x: torch.Tensor) -> np.ndarray:
        pp = phi_psi(x.numpy(), system)  # radians
        cvs = {"phi": pp[:, 0], "psi": pp[:, 1]}
        out = np.full(len(x), -1, dtype=np.int8)
        for k, s in enumerate(states):
            out[(out < 0) & s.contains(cvs)] = k
        return out

    u, f = energy.energy_and_forces(x)
    p = torch.randn_like(x) * kT**0.5
    first = assign(x)
    records, accepted, t0 = [], 0.0, time.perf_counter()
    for move in range(args.moves + 1):
        if move % args.every == 0:
            now = assign(x)
            records.append({
                "move": move,
                "fractions": {s.name: float((now == k).mean()) for k, s in enumerate(states)},
                "changed_since_start": float((now != first).mean()),
                "acceptance": accepted / max(move, 1),
                "wall_s": time.perf_counter() - t0,
            })  # fmt: skip
        if move == args.moves:
            break
        p = args.keep * p + (1 - args.keep**2) ** 0.5 * torch.randn_like(x) * kT**0.5
        h0 = u / kT + 0.5 * (p * p).sum((1, 2)) / kT
        xn, fn, p0 = x.clone(), f.clone(), p.clone()
        p = p + 0.5 * args.step_ps * fn
        for k in range(args.leapfrog):
            xn = xn + args.step_ps * p
            un, fn = energy.energy_and_forces(xn)
            p = p + (args.step_ps if k < args.leapfrog - 1 else 0.5 * args.step_ps) * fn
        h1 = un / kT + 0.5 * (p * p).sum((1, 2)) / kT
        acc = torch.rand_like(h0).log() < (h0 - h1).nan_to_num(-1e30)
        x[acc], u[acc], f[acc] = xn[acc], un[acc], fn[acc]
        p = torch.where(acc[:, None, None], p, -p0)
        accepted += acc.double().mean().item()
    half = [r for r in records if r["move"] >= args.moves // 2]
    print(json.dumps({
        **machine(),
        "samples": args.samples,
        "settings": {k: v for k, v in vars(args).items() if k != "samples"},
        "weighted_start": records[0]["fractions"],
        "second_half_mean": {
            s.name: float(np.mean([r["fractions"][s.name] for r in half])) for s in states
        },
        "records": records,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
