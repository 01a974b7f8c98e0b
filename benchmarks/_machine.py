"""What every benchmark prints about the machine it ran on (`boltzgen.machine`)."""

from __future__ import annotations

from boltzgen.machine import cpu_model, machine_info

__all__ = ["cpu_model", "machine"]


def machine(device: str | None = None) -> dict:
    """CPU model, torch's CPU vector capability (AVX2, AVX512, ...), torch version, and the
    torch threads in use (and the GPU's name for a CUDA ``device``): what every benchmark's
    JSON starts with."""
    return machine_info(device)
