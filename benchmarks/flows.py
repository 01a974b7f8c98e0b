"""Benchmark: boltzgen vs normflows 1.7.3 on the FAB alanine-dipeptide flow architecture.

60 dimensions (48 unbounded, 12 circular), 12 circular rational-quadratic spline coupling
blocks, 8 bins, residual conditioners with one block of 256 hidden units, random circular
shifts, Gaussian x uniform base. Times ``log_prob(x).mean().backward()`` and
``sample_and_log_prob(n)`` at batch 1024 for both libraries in the same run, interleaved,
and prints JSON with medians, the normflows/boltzgen ratios and peak memory. The conditioners
alone (`conditioners_step`: the matrix products both libraries share) are timed beside them, so
the JSON also says how much of boltzgen's time they are and the largest ratio any flow code
could reach with them (normflows / conditioners).

Run (quick default):  nice -n 10 python benchmarks/flows.py [--reps 7] [--device cpu]
Peak memory: CUDA peak allocation on GPU; on CPU the growth of the peak resident set size
(VmHWM, reset through /proc/self/clear_refs) during one call after a warm-up call, measured in a
fresh child process per library and operation.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch
from _machine import machine

N_DIM, N_CIRC, N_BLOCKS, N_BINS, HIDDEN, TAIL = 60, 12, 12, 8, 256, 5.0


def _masks(n_dim: int = N_DIM, n_blocks: int = N_BLOCKS):
    out, mask = [], None
    for i in range(n_blocks):
        if i % 2 == 0:
            g = torch.Generator().manual_seed(i)
            mask = torch.zeros(n_dim, dtype=torch.bool)
            mask[torch.randperm(n_dim, generator=g)[: n_dim // 2]] = True
        else:
            mask = ~mask
        out.append(mask)
    return out


def build_boltzgen(device: str):
    from boltzgen.flows import Circular, Unbounded, fab_aldp_flow

    domains = [Unbounded()] * (N_DIM - N_CIRC) + [Circular()] * N_CIRC
    return fab_aldp_flow(domains).to(device)


def build_normflows(device: str, ind_circ=None, n_dim=N_DIM, n_blocks=N_BLOCKS, hidden=HIDDEN):
    """normflows 1.7.3 built to boltzgen's architecture: circular RQ-spline couplings (the
    conditioning dims splined too), a random periodic shift after each, Gaussian x uniform base.
    ``ind_circ``: the circular dims (default: the last ``N_CIRC``)."""
    import normflows as nf

    if ind_circ is None:
        ind_circ = list(range(n_dim - N_CIRC, n_dim))
    ind_circ = list(ind_circ)
    n_circ = len(ind_circ)
    bound = torch.full((n_dim,), TAIL)
    bound[ind_circ] = math.pi
    scale = torch.ones(n_dim)
    scale[ind_circ] = 2 * math.pi
    base = nf.distributions.UniformGaussian(n_dim, ind_circ, scale)
    layers = []
    for i, mask in enumerate(_masks(n_dim, n_blocks)):
        layers.append(
            nf.flows.CircularCoupledRationalQuadraticSpline(
                n_dim,
                1,
                hidden,
                ind_circ,
                tail_bound=bound,
                num_bins=N_BINS,
                init_identity=True,
                mask=mask.float(),
            )
        )
        g = torch.Generator().manual_seed(1000 + i)
        shift = (torch.rand(n_circ, generator=g) * 2 - 1) * math.pi
        layers.append(nf.flows.PeriodicShift(ind_circ, bound=math.pi, shift=shift))
    return nf.NormalizingFlow(base, layers).to(device)


def _perturb(model, seed: int) -> None:
    # Move away from the identity initialisation so that the splines do real work.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device))


def _ops(lib: str, model, x: torch.Tensor, n: int):
    def log_prob_backward():
        model.zero_grad(set_to_none=True)
        model.log_prob(x).mean().backward()

    def sample():
        with torch.no_grad():
            if lib == "boltzgen":
                model.sample_and_log_prob(n)
            else:
                model.sample(n)

    return {"log_prob_backward": log_prob_backward, "sample_and_log_prob": sample}


def conditioners_step(model_bg, n: int, device: str):
    """A closure that runs only the conditioners of ``model_bg``'s spline couplings, forward and
    backward at batch ``n`` on random inputs of their widths: the matrix products (and ReLUs)
    that boltzgen and normflows share at the same architecture. Its time bounds the ratio:
    normflows / this = the speed-up of a boltzgen whose everything else cost nothing."""
    from boltzgen.flows import SplineCoupling

    nets = [m.net for m in model_bg.modules() if isinstance(m, SplineCoupling)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, net.initial.in_features, generator=g).to(device) for net in nets]
    gs = [torch.randn(n, net.final.out_features, generator=g).to(device) for net in nets]
    for x in xs:
        x.requires_grad_(True)  # inside a flow every conditioner's input carries a gradient

    def run() -> None:
        for net, x, gout in zip(nets, xs, gs):
            net.zero_grad(set_to_none=True)
            net(x).backward(gout)

    return run


def _data(model_bg, n: int, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        x, _ = model_bg.sample_and_log_prob(n)
    return x.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(lib: str, op: str, n: int, device: str, q) -> None:
    torch.manual_seed(0)
    bg = build_boltzgen(device)
    _perturb(bg, 1)
    model = bg if lib == "boltzgen" else build_normflows(device)
    if lib != "boltzgen":
        _perturb(model, 1)
    x = _data(bg, n, device)
    f = _ops(lib, model, x, n)[op]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        f()
        torch.cuda.synchronize()
        q.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        f()  # warm-up: lazily allocated buffers are not counted
        import gc

        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size (VmHWM), Linux >= 4.0
        f()
        q.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(lib: str, op: str, n: int, device: str) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(lib, op, n, device, q))
    # Large blocks straight from mmap, returned to the OS on free: RSS then tracks live memory.
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        p.start()
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    value = q.get()
    p.join()
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {"boltzgen": build_boltzgen(args.device), "normflows": build_normflows(args.device)}
    for seed, m in enumerate(models.values()):
        _perturb(m, seed + 1)
    x = _data(models["boltzgen"], args.batch, args.device)
    ops = {lib: _ops(lib, m, x, args.batch) for lib, m in models.items()}
    ops["conditioners_only"] = {
        "log_prob_backward": conditioners_step(models["boltzgen"], args.batch, args.device)
    }
    times: dict = {lib: {op: [] for op in ops[lib]} for lib in ops}
    for r in range(args.warmup + args.reps):
        for op in ("log_prob_backward", "sample_and_log_prob"):
            for lib in ops:  # interleaved, same conditions
                if op not in ops[lib]:
                    continue
                _sync(args.device)
                t0 = time.perf_counter()
                ops[lib][op]()
                _sync(args.device)
                if r >= args.warmup:
                    times[lib][op].append(time.perf_counter() - t0)

    from torch.profiler import ProfilerActivity, profile

    aten: dict = {}
    for lib in models:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ops[lib]["log_prob_backward"]()
        aten[lib] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    result: dict = {
        **machine(),
        "architecture": {
            "dims": N_DIM,
            "circular": N_CIRC,
            "blocks": N_BLOCKS,
            "bins": N_BINS,
            "hidden": HIDDEN,
            "batch": args.batch,
        },
        "device": args.device,
        "reps": args.reps,
        "aten_calls_log_prob_backward": aten,
        "params": {lib: sum(p.numel() for p in m.parameters()) for lib, m in models.items()},
        "median_s": {
            lib: {op: statistics.median(v) for op, v in d.items()} for lib, d in times.items()
        },
        "all_s": {
            lib: {op: [round(t, 4) for t in v] for op, v in d.items()} for lib, d in times.items()
        },
    }
    med = result["median_s"]
    result["speedup_normflows_over_boltzgen"] = {
        op: med["normflows"][op] / med["boltzgen"][op] for op in med["boltzgen"]
    }
    # the most any library can gain over normflows with these conditioners: its products alone
    op = "log_prob_backward"
    share = med["conditioners_only"][op] / med["boltzgen"][op]
    result["conditioners_share_of_boltzgen"] = {op: share}
    result["speedup_bound_at_zero_overhead"] = {
        op: med["normflows"][op] / med["conditioners_only"][op]
    }
    if not args.no_memory:
        result["peak_memory_mib"] = {
            lib: {op: peak_memory_mib(lib, op, args.batch, args.device) for op in med[lib]}
            for lib in models
        }
    print(json.dumps(result, indent=2, default=lambda o: np.asarray(o).tolist()))


if __name__ == "__main__":
    main()
