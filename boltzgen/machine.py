"""What a run records about the machine it ran on (training checkpoints, benchmarks, model
cards): CPU model, torch's CPU vector capability, torch version, threads, and the GPU if one
is used."""

from __future__ import annotations

import functools
import platform
from typing import Any

__all__ = ["cpu_model", "machine_info"]


@functools.cache
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    """``{"cpu", "cpu_capability", "torch", "threads"}``, ``"kernels"`` on a CPU (whether
    the compiled kernels of `boltzgen.native` are in use), and ``"device"``, plus ``"gpu"``,
    the CUDA device's name, when ``device`` is given and a CUDA device."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch": str(torch.__version__),  # a TorchVersion: torch.load(weights_only) refuses it
        "threads": torch.get_num_threads(),
    }
    if device is None or torch.device(device).type == "cpu":
        from boltzgen import native

        info["kernels"] = native.status()
    if device is not None:
        dev = torch.device(device)
        info["device"] = str(dev)
        if dev.type == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(dev)
    return info
