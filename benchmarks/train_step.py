"""Benchmark: one full reverse-KL training step, boltzgen vs normflows 1.7.3, on alanine dipeptide.

The step: flow sample with log q (latent -> internal coordinates), the internal -> Cartesian
transform with its log-det (boltzgen's `InternalCoordinates`, both libraries), the
torch-native energy (`TorchEnergy`, both), the reverse-KL loss, backward, Adam step. Only the
flow differs: boltzgen's `make_spline_flow` as the run configs build it, and normflows built to
the same architecture (circular rational-quadratic spline couplings with the conditioning dims
splined too, 8 bins, residual conditioners with one block, a random periodic shift after each
block, Gaussian x uniform base; `benchmarks/flows.py` has the builder).

boltzgen runs twice: as it trains (``boltzgen``: spline layers and energy through the
compiled kernels of `boltzgen.native` where they are built, torch's fused Adam) and with its
torch evaluation of both (``boltzgen_without_kernels``: the path where no C compiler is found,
and the state before the kernels), so the gain of the kernels and their ATen calls are
measured side by side too. normflows steps with torch's default Adam, as its users do.

Architectures: ``quick`` (reverse_kl_quick.yaml: 6 blocks x 64 hidden, batch 256) and ``fab``
(FAB's ALDP flow: 12 blocks x 256 hidden, batch 1024). Prints JSON: CPU model, torch's vector
capability, threads; per architecture the median step time of each library (interleaved
repeats, same conditions), the normflows/boltzgen ratio (of the medians, and the median of the
per-repeat ratios), the conditioners alone (`flows.conditioners_step`: the matrix products both
libraries share; normflows / their time bounds the ratio any flow code can reach), ATen calls
per step (torch profiler
events named ``aten::*``, nested calls and backward included) and the peak resident-memory
growth of one step (fresh child process per library, Linux VmHWM).

Run:  python benchmarks/train_step.py [--arch quick fab] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402 (benchmarks/ is on sys.path)
from flows import _perturb, _status_kib, build_normflows, conditioners_step  # noqa: E402

ARCHS = {"quick": (6, 64, 256), "fab": (12, 256, 1024)}  # blocks, hidden, batch
# boltzgen as it runs (compiled spline kernels where built), boltzgen with its torch spline
# evaluation (the path without a C compiler, and the state before the kernels), normflows
LIBS = ("boltzgen", "boltzgen_without_kernels", "normflows")


def _setup(lib: str, arch: str):
    """A ``step()`` closure of one library and architecture (model, optimiser, energy)."""
    from boltzgen import systems
    from boltzgen.coordinates import InternalCoordinates
    from boltzgen.energy import BoltzmannTarget, TorchEnergy
    from boltzgen.flows import circular_mask, make_spline_flow
    from boltzgen.pipeline import minimized_positions

    n_blocks, hidden, batch = ARCHS[arch]
    aldp = systems.load("aldp")
    ic = InternalCoordinates.from_topology(aldp.topology, minimized_positions(aldp))
    target = BoltzmannTarget(TorchEnergy.from_openmm(aldp.system), aldp.kT)
    torch.manual_seed(0)
    if lib.startswith("boltzgen"):
        flow = make_spline_flow(ic.domains, n_blocks=n_blocks, hidden=hidden)

        def draw():
            return flow.sample_and_log_prob(batch)
    else:
        circ = circular_mask(ic.domains).nonzero().flatten().tolist()
        flow = build_normflows("cpu", circ, len(ic.domains), n_blocks, hidden)

        def draw():
            return flow.sample(batch)

    _perturb(flow, 1)
    # boltzgen trains with torch's fused Adam (boltzgen.train.Trainer); normflows as its users do
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=lib.startswith("boltzgen") or None)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        y, log_q = draw()
        x, log_det = ic.forward_and_log_det(y)
        log_p = target.log_prob(x)
        loss = (log_q - log_det - log_p).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    def flow_step() -> None:
        """The flow's part of a step: sample with log q, backward (y enters the loss too)."""
        opt.zero_grad(set_to_none=True)
        y, log_q = draw()
        (log_q + 1e-3 * (y * y).sum(1)).mean().backward()

    step.flow_step = flow_step
    step.flow = flow
    if lib == "boltzgen_without_kernels":
        step = _without_kernels(step)
        step.flow_step = _without_kernels(flow_step)
    return step


def _without_kernels(fn):
    """``fn`` without boltzgen's compiled kernels: splines and energy evaluated by torch."""
    from boltzgen import native

    def run():
        with native.disabled():
            return fn()

    return run


def _aten_calls(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def _memory_child(lib: str, arch: str, threads: int, q) -> None:
    torch.set_num_threads(threads)
    step = _setup(lib, arch)
    step()  # warm-up: lazily allocated buffers and optimiser state are not counted
    import gc

    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident set size (VmHWM)
    step()
    q.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(lib: str, arch: str, threads: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(lib, arch, threads, q))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large blocks returned on free
    try:
        p.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    value = q.get()
    p.join()
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["quick", "fab"], choices=list(ARCHS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {
        **machine(),
        "reps": args.reps,
        "aten_calls": "profiler events named aten::*, nested and backward included, one step",
        "flow_aten_calls": "the same for the flow alone: sample with log q, then backward",
        "archs": {},
    }
    for arch in args.arch:
        steps = {lib: _setup(lib, arch) for lib in LIBS}
        n_blocks, hidden, batch = ARCHS[arch]
        # the conditioners' matrix products alone (shared by both libraries): a bound
        floor = conditioners_step(steps["boltzgen"].flow, batch, "cpu")
        timed = {**steps, "conditioners_only": floor}
        times: dict = {lib: [] for lib in timed}
        for r in range(args.warmup + args.reps):
            for lib, step in timed.items():  # interleaved: the same conditions for both
                t0 = time.perf_counter()
                step()
                if r >= args.warmup:
                    times[lib].append(time.perf_counter() - t0)
        med = {lib: statistics.median(v) for lib, v in times.items()}
        row = {
            "blocks": n_blocks,
            "hidden": hidden,
            "batch": batch,
            "median_step_s": med,
            "all_s": {lib: [round(t, 4) for t in v] for lib, v in times.items()},
            "speedup_normflows_over_boltzgen": med["normflows"] / med["boltzgen"],
            "speedup_kernels": med["boltzgen_without_kernels"] / med["boltzgen"],
            "median_ratio_per_rep": statistics.median(
                n / b for n, b in zip(times["normflows"], times["boltzgen"])
            ),
            "conditioners_share_of_boltzgen": med["conditioners_only"] / med["boltzgen"],
            "speedup_bound_at_zero_overhead": med["normflows"] / med["conditioners_only"],
            "aten_calls_per_step": {lib: _aten_calls(step) for lib, step in steps.items()},
            "flow_aten_calls_per_step": {
                lib: _aten_calls(step.flow_step) for lib, step in steps.items()
            },
        }
        if not args.no_memory:
            row["peak_memory_mib"] = {
                lib: peak_memory_mib(lib, arch, args.threads) for lib in steps
            }
        out["archs"][arch] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
