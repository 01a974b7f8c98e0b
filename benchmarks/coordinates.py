"""Throughput of the coordinate layer: ALDP Cartesian <-> internal for a large batch on CPU.

Prints one JSON document: per dtype, thread count and direction, the median wall time over
repeats and frames per second, plus the median time for both directions together.

    PYTHONPATH=$PWD python benchmarks/coordinates.py --frames 100000 --repeats 7 --threads 1 2
"""

import argparse
import json
import platform
import statistics
import time

import torch

from boltzgen import systems
from boltzgen.coordinates import InternalCoordinates, MixedCoordinates, ZMatrix


def _time(fn, arg, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _both_ways(args):
    transform, x = args
    z, _ = transform.inverse_and_log_det(x)
    transform.forward_and_log_det(z)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed", action="store_true", help="also time MixedCoordinates")
    args = parser.parse_args()

    aldp = systems.load("aldp")
    g = torch.Generator().manual_seed(args.seed)
    ref = torch.tensor(aldp.positions)
    x64 = ref + 0.01 * torch.randn(args.frames, aldp.n_atoms, 3, generator=g, dtype=torch.float64)
    transforms = {
        "internal": InternalCoordinates(ZMatrix.from_topology(aldp.topology), aldp.positions)
    }
    if args.mixed:
        zm = ZMatrix.from_topology(aldp.topology, cartesian_atoms=[1, 4, 6, 8, 10, 14, 16, 18])
        transforms["mixed"] = MixedCoordinates(zm, data=x64[:2000])

    results = []
    for name, transform in transforms.items():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                x = x64.to(dtype)
                with torch.no_grad():
                    z = transform.to_internal(x)  # warm-up
                    transform.to_cartesian(z)
                    t_inv = _time(transform.inverse_and_log_det, x, args.repeats)
                    t_fwd = _time(transform.forward_and_log_det, z, args.repeats)
                    t_both = _time(_both_ways, (transform, x), args.repeats)
                results.append(
                    {
                        "transform": name,
                        "dtype": str(dtype).replace("torch.", ""),
                        "threads": threads,
                        "cartesian_to_internal_s": round(t_inv, 4),
                        "internal_to_cartesian_s": round(t_fwd, 4),
                        "both_ways_s": round(t_both, 4),
                        "cartesian_to_internal_frames_per_s": round(args.frames / t_inv),
                        "internal_to_cartesian_frames_per_s": round(args.frames / t_fwd),
                    }
                )
    print(
        json.dumps(
            {
                "benchmark": "coordinates",
                "system": "aldp (22 atoms, 60 internal coordinates)",
                "frames": args.frames,
                "repeats": args.repeats,
                "statistic": "median wall time",
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
