"""What a run records about the machine it ran on (training checkpoints, benchmarks, model
cards): CPU model, torch's CPU vector capability, torch version, threads, and the GPU if one
is used."""

from __future__ import annotations

import ctypes
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


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory(mmap_below: int = 64 << 20, trim_above: int = 256 << 20) -> bool:
    """Let glibc's malloc serve blocks below ``mmap_below`` bytes from its heap and keep up to
    ``trim_above`` bytes of freed memory, instead of mapping each large block afresh and
    unmapping it when freed. A training step allocates and frees the same few-MB tensors
    every iteration; mapped anew, every page of them faults in again (~300 page faults per
    quick ALDP step, ~6 % of its time measured on the 2-core AMD EPYC). Called by the CLI's
    train/sample/pipeline commands (not on import: it changes the process's allocator).
    Returns whether it applied (glibc on Linux only)."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_below) and mallopt(_M_TRIM_THRESHOLD, trim_above))
