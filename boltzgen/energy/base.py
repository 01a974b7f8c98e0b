"""The energy contract shared by `OpenMMEnergy` and `TorchEnergy`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Energy"]


class Energy(nn.Module):
    """A potential energy: positions ``(B, n_atoms, 3)`` in nm -> energies ``(B,)`` in kJ/mol.

    Calling the module is differentiable; ``-grad`` is the force. Subclasses implement
    `forward`; `energy_and_forces` defaults to autograd.
    """

    def __init__(self, n_atoms: int) -> None:
        super().__init__()
        self.n_atoms = int(n_atoms)

    def _check_positions(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(
                f"positions must have shape (batch, {self.n_atoms}, 3) in nm, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"positions must be a floating-point tensor, got {x.dtype}")
        return x

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Energies ``(B,)`` kJ/mol and forces ``(B, n_atoms, 3)`` kJ/mol/nm (detached)."""
        x = self._check_positions(x).detach().requires_grad_(True)
        with torch.enable_grad():
            energy = self(x)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        return energy.detach(), -grad
