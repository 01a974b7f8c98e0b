"""`Flow` = base distribution + transform, and factories for mixed-domain spline flows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzgen.flows.autoregressive import MaskedAffineAutoregressive, MaskedSplineAutoregressive
from boltzgen.flows.base import Circular, Compose, Domain, Transform, Unbounded
from boltzgen.flows.coupling import AffineCoupling, SplineCoupling, random_mask
from boltzgen.flows.distributions import BaseDistribution, ProductBase
from boltzgen.flows.elementwise import ActNorm, CircularShift, LULinear, Permutation

__all__ = ["Flow", "make_spline_flow"]


class Flow(nn.Module):
    """A normalizing flow: ``x = T(z)``, ``z ~ base``; ``T`` maps latent -> data (forward).

    Args:
        base: Base distribution of the latent ``z``.
        transform: Any `Transform` (e.g. a `Compose` of layers, possibly ending in a coordinate
            transform or containing stochastic layers that keep the same contract).
    """

    def __init__(self, base: BaseDistribution, transform: Transform) -> None:
        super().__init__()
        self.base = base
        self.transform = transform

    @staticmethod
    def _context(context: Tensor | None, n: int) -> Tensor | None:
        if context is not None and context.dim() == 1:
            context = context.expand(n, -1)
        return context

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples; return ``(x (n, ...), log q(x) (n,))``.

        ``context`` is ``(n, C)`` or ``(C,)`` (shared by all samples) for conditional flows.
        """
        context = self._context(context, n)
        z, log_p = self.base.sample(n, context)
        x, ld = self.transform.forward_and_log_det(z, context)
        return x, log_p - ld

    def sample(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same as `sample_and_log_prob`: ``(x, log_q)``."""
        return self.sample_and_log_prob(n, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log density ``log q(x)`` of data ``x`` ``(batch, ...)``, shape ``(batch,)``."""
        context = self._context(context, x.shape[0])
        z, ld = self.transform.inverse_and_log_det(x, context)
        return self.base.log_prob(z, context) + ld

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Alias of `log_prob` (so the module can be called in training loops)."""
        return self.log_prob(x, context)


def make_spline_flow(
    domains: Sequence[Domain],
    n_blocks: int = 12,
    n_bins: int = 8,
    hidden: int = 256,
    n_res_blocks: int = 1,
    dropout: float = 0.0,
    layer_type: str = "coupling",
    mixing: str | None = None,
    circular_shift: bool = True,
    actnorm: bool = False,
    identity_spline: bool = True,
    tail_bound: float = 5.0,
    context_features: int = 0,
    base: BaseDistribution | None = None,
    identity_init: bool = True,
    seed: int = 0,
) -> Flow:
    """Build a neural spline flow over a mixed-domain vector.

    Each block (in sampling order) is: optional ActNorm, the spline layer, optional random
    circular shift of the angles, optional mixing. Coupling masks follow FAB: a random half for
    even blocks, its complement for odd blocks. Permutations move domains; a final permutation
    restores the order of ``domains``.

    Args:
        domains: One domain per data dimension (length D).
        n_blocks: Number of spline layers.
        n_bins: Spline bins.
        hidden: Conditioner width.
        n_res_blocks: Residual blocks per conditioner.
        dropout: Conditioner dropout.
        layer_type: ``"coupling"``, ``"autoregressive"`` (MADE spline), ``"affine_coupling"``
            (Real NVP) or ``"maf"`` (masked affine autoregressive).
        mixing: ``None``, ``"reverse"``, ``"permute"`` (random permutation) or ``"lu"``
            (LU-linear on the unbounded dims) between blocks.
        circular_shift: Random shift of the circular dims after each block (if any).
        actnorm: ActNorm (unbounded dims) before each block.
        identity_spline: Coupling layers also spline the conditioning dims (as normflows).
        tail_bound: Spline interval [-B, B] of unbounded dims.
        context_features: Context width for conditional flows (0: unconditional).
        base: Base distribution; default `ProductBase(domains)`.
        identity_init: Initialise every layer as the identity.
        seed: Seed for masks, permutations and shifts (network weights use torch's RNG).

    Returns:
        A `Flow` whose samples live on ``domains``.
    """
    dim = len(domains)
    cur = list(range(dim))  # data dimension sitting at each position
    layers: list[Transform] = []

    def doms() -> list[Domain]:
        return [domains[i] for i in cur]

    has_circ = any(isinstance(d, Circular) for d in domains)
    has_unb = any(isinstance(d, Unbounded) for d in domains)
    mask = random_mask(dim, seed)
    for i in range(n_blocks):
        d = doms()
        if actnorm and has_unb:
            layers.append(ActNorm(d))
        if i % 2 == 0:
            mask = random_mask(dim, seed + i) if dim > 1 else torch.ones(1, dtype=torch.bool)
        else:
            mask = ~mask
        net = dict(
            hidden=hidden,
            n_res_blocks=n_res_blocks,
            dropout=dropout,
            context_features=context_features,
            identity_init=identity_init,
        )
        if layer_type == "coupling":
            layers.append(
                SplineCoupling(
                    d, mask, n_bins, tail_bound=tail_bound, identity_spline=identity_spline, **net
                )
            )
        elif layer_type == "autoregressive":
            layers.append(MaskedSplineAutoregressive(d, n_bins, tail_bound=tail_bound, **net))
        elif layer_type == "affine_coupling":
            unb = torch.tensor([isinstance(x, Unbounded) for x in d])
            if bool((mask & unb).any()):
                layers.append(AffineCoupling(d, mask, **net))
        elif layer_type == "maf":
            layers.append(MaskedAffineAutoregressive(d, **net))
        else:
            raise ValueError(f"unknown layer_type {layer_type!r}")
        if circular_shift and has_circ:
            layers.append(CircularShift(d, seed=seed + 1000 + i))
        if i < n_blocks - 1:
            if mixing == "reverse":
                perm = list(range(dim))[::-1]
            elif mixing == "permute":
                g = torch.Generator().manual_seed(seed + 2000 + i)
                perm = torch.randperm(dim, generator=g).tolist()
            elif mixing == "lu" and has_unb:
                layers.append(LULinear(d))
                perm = None
            elif mixing in (None, "lu"):
                perm = None
            else:
                raise ValueError(f"unknown mixing {mixing!r}")
            if perm is not None:
                layers.append(Permutation(perm))
                cur = [cur[p] for p in perm]
    if cur != list(range(dim)):
        layers.append(Permutation(torch.argsort(torch.tensor(cur))))
    if base is None:
        base = ProductBase(domains)
    return Flow(base, Compose(layers))
