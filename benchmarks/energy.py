"""Energy throughput: OpenMM (one CPU context looping; a 2-worker pool) vs TorchEnergy.

Prints JSON: microseconds per sample (median over repeats) for energy and energy+forces at
batch 1, 64, 1024 and 8192, all measured in this one run, and the speed-up ratios of
TorchEnergy over one OpenMM CPU context, next to the CPU model, torch's CPU capability
(AVX2/AVX512), the torch version and thread counts. Usage::

    python benchmarks/energy.py [--system aldp] [--repeats 5] [--batches 1 64 1024 8192]
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path

from boltzgen import native, systems
from boltzgen.energy import OpenMMEnergy, TorchEnergy


def _time(fn, repeats, min_time=0.2):
    """Median seconds per call; each repeat loops until min_time has passed."""
    fn()  # warm-up
    per_call = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        per_call.append((time.perf_counter() - t0) / n)
    return statistics.median(per_call)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="aldp")
    p.add_argument("--solvent", default="implicit")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 8192])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip torch.compile timings"
    )
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    s = systems.load(args.system, solvent=args.solvent)
    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(0)
    te = TorchEnergy.from_openmm(s.system)
    tc = TorchEnergy.from_openmm(s.system).compile_energy(dynamic=False) if args.compile else None
    compile_s = {}
    single = OpenMMEnergy(s.system, n_workers=1, platform="CPU")
    # for a 22-atom molecule OpenMM's threading overhead dominates: a 1-thread context is shown too
    single1 = OpenMMEnergy(
        s.system, n_workers=1, platform="CPU", platform_properties={"Threads": "1"}
    )
    pool = OpenMMEnergy(s.system, n_workers=2, platform="CPU")
    results = []
    for batch in args.batches:
        x = torch.tensor(s.positions[None] + 0.01 * rng.standard_normal((batch, s.n_atoms, 3)))
        x = x.to(dtype)
        row = {"batch": batch}
        # OpenMM is timed on at most 1024 samples (it is linear in the batch)
        xo = x[: min(batch, 1024)]
        row["openmm_energy_forces_us"] = (
            1e6 * _time(lambda xo=xo: single.energy_and_forces(xo), args.repeats) / len(xo)
        )
        row["openmm_1thread_energy_forces_us"] = (
            1e6 * _time(lambda xo=xo: single1.energy_and_forces(xo), args.repeats) / len(xo)
        )
        row["openmm_pool2_energy_forces_us"] = (
            1e6 * _time(lambda xo=xo: pool.energy_and_forces(xo), args.repeats) / len(xo)
        )

        def torch_energy(x=x):
            with torch.no_grad():
                te(x)

        row["torch_energy_us"] = 1e6 * _time(torch_energy, args.repeats) / batch
        row["torch_energy_forces_us"] = (
            1e6 * _time(lambda x=x: te.energy_and_forces(x), args.repeats) / batch
        )
        # the same without the compiled kernels (boltzgen.native): the torch evaluation
        with native.disabled():
            row["torch_energy_forces_without_kernels_us"] = (
                1e6 * _time(lambda x=x: te.energy_and_forces(x), args.repeats) / batch
            )
        if tc is not None:
            t0 = time.perf_counter()
            tc.energy_and_forces(x)  # compile for this shape (timed once, not in the ratio)
            compile_s[batch] = time.perf_counter() - t0
            row["torch_compiled_energy_forces_us"] = (
                1e6 * _time(lambda x=x: tc.energy_and_forces(x), args.repeats) / batch
            )
            row["speedup_compiled_energy_forces_vs_openmm"] = (
                row["openmm_energy_forces_us"] / row["torch_compiled_energy_forces_us"]
            )
        row["speedup_energy_forces_vs_openmm"] = (
            row["openmm_energy_forces_us"] / row["torch_energy_forces_us"]
        )
        row["speedup_energy_forces_vs_openmm_1thread"] = (
            row["openmm_1thread_energy_forces_us"] / row["torch_energy_forces_us"]
        )
        row["speedup_energy_forces_vs_pool2"] = (
            row["openmm_pool2_energy_forces_us"] / row["torch_energy_forces_us"]
        )
        results.append(row)
    pool.close()
    print(
        json.dumps(
            {
                "benchmark": "energy",
                "system": f"{args.system}/{args.solvent}",
                "n_atoms": s.n_atoms,
                "torch_dtype": args.dtype,
                "torch_version": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "openmm_threads": {"single": "default", "single1": 1, "pool2": "default x 2"},
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "cpu_count": os.cpu_count(),
                "cpu_model": cpu_model(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "kernels": native.status(),
                "machine": platform.machine(),
                "compile_seconds": compile_s,
                "statistic": f"median of {args.repeats} repeats, microseconds per sample",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
