"""Where a training step's time goes on a device (GPU or CPU), eager and compiled.

For a run config (default: the GPU recipe's stage 1, 8 x 128 flow) each ``--batch-sizes`` entry
trains ``--iters`` steps and reports the median step (after ``--skip``); one more step runs
under the torch profiler, which counts the device kernels launched and sums their time, so the
JSON says how busy the device is (kernel time / step time): a small fraction means the step is
bound by launching kernels from Python, not by arithmetic. Then ``train.compile: true``
(inductor) in a process of its own, stopped after ``--compile-timeout`` s: first (compiling)
step and median step. Prints JSON headed by the machine and writes it to ``--out`` if given.

    python benchmarks/device_step.py --device cuda > benchmarks/device_step.out.json
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
CONFIG = ROOT / "systems" / "aldp" / "recipes" / "gpu_pretrained" / "1_reverse_kl.yaml"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker(config_path: str, device: str, batch: int, iters: int, compile_: bool) -> dict:
    import torch

    from boltzgen import pipeline
    from boltzgen.config import load_config
    from boltzgen.train import Trainer

    torch.set_num_threads(1)
    config = pipeline.with_overrides(
        load_config(config_path),
        device=device,
        batch_size=batch,
        compile=compile_,
        progress=False,
    )
    run = pipeline.build_run(config)
    trainer = Trainer(run.model, run.target, config.train, sample_filter=run.sample_filter)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        trainer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"times": times}
    if not compile_:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.startswith("cuda") else []
        )
        _sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            trainer.step()
            _sync(device)
        wall = time.perf_counter() - t0
        events = prof.events()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        aten = [e for e in events if e.name.startswith("aten::")]
        out["profiled_step_s"] = wall
        out["aten_calls"] = len(aten)
        out["device_kernels"] = len(kernels)
        out["device_kernel_s"] = (
            sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
            / 1e6
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--compile-timeout", type=float, default=150.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        batch, mode = args.worker.split(":")
        res = _worker(args.config, args.device, int(batch), args.iters, mode == "compiled")
        print(json.dumps(res))
        return
    out: dict = {"machine": machine(args.device), "config": args.config, "eager": {}}

    def run(batch: int, mode: str, timeout: float | None) -> dict | None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            f"{batch}:{mode}",
            "--config",
            args.config,
            "--device",
            args.device,
            "--iters",
            str(args.iters),
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode != 0:
            return {"error": res.stderr[-2000:]}
        return json.loads(res.stdout.strip().splitlines()[-1])

    def emit() -> None:
        text = json.dumps(out, indent=1)
        if args.out:
            args.out.write_text(text)
        print(text, flush=True)

    for batch in args.batch_sizes:
        res = run(batch, "eager", None)
        if res is None or "error" in res:
            out["eager"][str(batch)] = res
            continue
        med = statistics.median(res["times"][args.skip :])
        entry = {
            "median_step_ms": round(1e3 * med, 2),
            "samples_per_s": round(batch / med),
            "aten_calls_per_step": res["aten_calls"],
            "device_kernels_per_step": res["device_kernels"],
            "device_kernel_ms_per_step": round(1e3 * res["device_kernel_s"], 2),
            "profiled_step_ms": round(1e3 * res["profiled_step_s"], 2),
        }
        if res["device_kernels"]:
            entry["device_busy_fraction"] = round(res["device_kernel_s"] / med, 3)
        out["eager"][str(batch)] = entry
        emit()
    batch = args.batch_sizes[0]
    t0 = time.perf_counter()
    res = run(batch, "compiled", args.compile_timeout)
    if res is None:
        out["compiled"] = {"batch": batch, "timed_out_after_s": round(time.perf_counter() - t0)}
    elif "error" in res:
        out["compiled"] = {"batch": batch, **res}
    else:
        out["compiled"] = {
            "batch": batch,
            "first_step_s": round(res["times"][0], 2),
            "median_step_ms": round(1e3 * statistics.median(res["times"][args.skip :]), 2),
        }
    emit()


if __name__ == "__main__":
    main()
