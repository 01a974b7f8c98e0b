"""OpenMM as a differentiable, batched energy: the reference for any `openmm.System`."""

from __future__ import annotations

import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzgen.energy import _openmm_worker
from boltzgen.energy.base import Energy

__all__ = ["OpenMMEnergy"]


class _OpenMMFunction(torch.autograd.Function):
    """Energies from OpenMM; the backward pass multiplies the stored forces by -grad."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, energy: OpenMMEnergy) -> Tensor:  # noqa: D102
        e, f = energy._evaluate(x.detach().cpu().numpy().astype(np.float64))
        ctx.save_for_backward(torch.as_tensor(f, dtype=x.dtype, device=x.device))
        return torch.as_tensor(e, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (forces,) = ctx.saved_tensors
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        return -grad[:, None, None] * forces, None


def _shutdown(pool: Any) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


class OpenMMEnergy(Energy):
    """Potential energy of an `openmm.System` evaluated by OpenMM, as a torch autograd function.

    ``energy(x)`` maps positions ``(B, n_atoms, 3)`` in nm (float32/float64, any device) to
    energies ``(B,)`` in kJ/mol; its gradient is minus OpenMM's force. A sample with NaN/inf or
    exploded positions (``|x| > 1e4`` nm), or whose energy is not finite, gets ``+inf`` energy and
    zero force; the rest of the batch is unaffected.

    Args:
        system: The `openmm.System`.
        n_workers: 1 evaluates in this process with one context; ``n > 1`` splits each batch over
            a pool of ``n`` spawned worker processes, each with one single-threaded context.
        platform: OpenMM platform name (``"CPU"``, ``"Reference"``, ``"CUDA"``, ...).
        platform_properties: e.g. ``{"Threads": "1"}`` for the in-process context.

    Use as a context manager or call `close` to stop the workers (they also stop when the
    object is garbage-collected or the interpreter exits).
    """

    def __init__(
        self,
        system: Any,
        n_workers: int = 1,
        platform: str = "CPU",
        platform_properties: dict[str, str] | None = None,
    ) -> None:
        super().__init__(system.getNumParticles())
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        import openmm as mm

        self.n_workers = int(n_workers)
        self.platform = platform
        self._system_xml = mm.XmlSerializer.serialize(system)
        self._context: Any = None
        self._pool: Any = None
        self._finalizer: Any = None
        props = dict(platform_properties or {})
        if self.n_workers == 1:
            self._context = _openmm_worker.make_context(self._system_xml, platform, props)
        else:
            worker_props = {**props, "Threads": "1"}
            # spawn: safe with threads and torch; a worker that dies raises BrokenProcessPool
            # in the caller instead of hanging it
            self._pool = ProcessPoolExecutor(
                self.n_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_openmm_worker.init_worker,
                initargs=(self._system_xml, platform, worker_props),
            )
            self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def _evaluate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._pool is None:
            if self._context is None:
                raise RuntimeError("this OpenMMEnergy was closed")
            return _openmm_worker.evaluate(self._context, positions)
        chunks = np.array_split(positions, min(self.n_workers, len(positions)))
        results = list(self._pool.map(_openmm_worker.evaluate_in_worker, chunks))
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def forward(self, x: Tensor) -> Tensor:
        """Energies ``(B,)`` kJ/mol of positions ``(B, n_atoms, 3)`` nm (differentiable)."""
        x = self._check_positions(x)
        if x.shape[0] == 0:
            return x.new_zeros(0)
        return _OpenMMFunction.apply(x, self)

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Energies ``(B,)`` kJ/mol and forces ``(B, n_atoms, 3)`` kJ/mol/nm in one pass."""
        x = self._check_positions(x)
        e, f = self._evaluate(x.detach().cpu().numpy().astype(np.float64))
        kw = {"dtype": x.dtype, "device": x.device}
        return torch.as_tensor(e, **kw), torch.as_tensor(f, **kw)

    def close(self) -> None:
        """Stop the worker pool (if any) and release the OpenMM context."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = None
        self._context = None

    def __enter__(self) -> OpenMMEnergy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        raise TypeError("OpenMMEnergy holds OpenMM contexts and cannot be pickled")
