"""Helpers shared by the torch-native energy terms (not public API)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__: list[str] = []

#: Coulomb constant 1/(4 pi eps0) in kJ nm / (mol e^2), as OpenMM's ONE_4PI_EPS0.
ONE_4PI_EPS0 = 138.93545764438198


def _f64(values: Any) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _i64(values: Any, shape: tuple[int, ...]) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(shape))


def _val(q: Any) -> float:
    """A float from an OpenMM Quantity (already in OpenMM's MD unit system) or a float."""
    return float(q._value) if hasattr(q, "_value") else float(q)


def _analytic(x: Tensor, fn: Any, term: nn.Module) -> Tensor:
    """Energy ``fn(term, x, need_grad)[0]`` with its analytic gradient in the backward pass.

    Under `torch.compile`, or when ``term.analytic_gradients`` is False (see
    `TorchEnergy.set_analytic_gradients`), the plain differentiable expression is used instead:
    slower, but differentiable any number of times.
    """
    if torch.compiler.is_compiling() or not getattr(term, "analytic_gradients", True):
        return fn(term, x, False)[0]
    return _AnalyticEnergy.apply(x, fn, term)


class _AnalyticEnergy(torch.autograd.Function):
    """An energy whose gradient is computed analytically alongside it (once-differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Any, term: nn.Module) -> Tensor:  # noqa: D102
        energy, grad = fn(term, x, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return energy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_out[:, None, None] * grad, None, None
