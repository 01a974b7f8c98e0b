"""Conditioner networks: a residual MLP and a masked (MADE) residual MLP.

MADE: Germain et al., "MADE: Masked Autoencoder for Distribution Estimation" (ICML 2015);
the residual variant follows Durkan et al., "Neural Spline Flows" (2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boltzgen.flows.base import Circular, Domain

__all__ = ["MADE", "MaskedLinear", "ResidualNet", "circular_features"]


def circular_features(x: Tensor, circular: Sequence[bool]) -> Tensor:
    """Embed a ``(batch, D)`` vector for a network: circular dims become ``(cos, sin)``.

    Returns ``(batch, D + n_circular)``: the non-circular dims in order, then the cosines,
    then the sines of the circular dims.
    """
    circ = [i for i, c in enumerate(circular) if c]
    if not circ:
        return x
    lin = [i for i, c in enumerate(circular) if not c]
    ang = x[:, circ]
    return torch.cat([x[:, lin], torch.cos(ang), torch.sin(ang)], dim=1)


class ResidualNet(nn.Module):
    """Residual MLP ``in -> hidden -> [block]*n_blocks -> out``.

    Each block is ``h + Linear(Dropout(ReLU(Linear(ReLU(h)))))``. Context, if any, is
    concatenated to the input.

    Args:
        in_features: Input width.
        out_features: Output width.
        hidden: Hidden width.
        n_blocks: Number of residual blocks (depth).
        dropout: Dropout probability inside the blocks.
        context_features: Width of the optional context.
        zero_init: Zero the last layer, so the output is exactly 0 at initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        n_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.context_features = context_features
        self.initial = nn.Linear(in_features + context_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
            )
            for _ in range(n_blocks)
        )
        self.final = nn.Linear(hidden, out_features)
        if zero_init:
            nn.init.zeros_(self.final.weight)
            nn.init.zeros_(self.final.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, transposed: bool = False) -> Tensor:
        """``(batch, in_features)`` (+ context ``(batch, C)``) -> ``(batch, out_features)``,
        or with ``transposed`` the same numbers as ``(out_features, batch)`` contiguous (the
        last layer computed as ``W h^T + b``: one matrix product either way)."""
        if self.context_features:
            if context is None:
                raise ValueError("this network needs a context")
            x = torch.cat([x, context], dim=1)
        h = self.initial(x)
        for block in self.blocks:
            h = h + block(h)
        h = F.relu(h)
        if transposed:
            return torch.addmm(self.final.bias.unsqueeze(1), self.final.weight, h.t())
        return self.final(h)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask ``(out, in)``."""

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked residual MLP: output block ``i`` depends only on inputs ``j < i``.

    Circular inputs are embedded as ``(cos, sin)`` (both with the degree of their dimension).

    Args:
        domains: One domain per dimension D (only circularity matters here).
        n_params: Outputs per dimension; the output has shape ``(batch, D, n_params)``.
        hidden: Hidden width (at least D - 1 for full connectivity).
        n_blocks: Number of masked residual blocks.
        dropout: Dropout probability inside the blocks.
        context_features: Width of the optional context (unmasked input).
        zero_init: Zero the output layer (identity flows).
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        n_params: int,
        hidden: int = 256,
        n_blocks: int = 1,
        dropout: float = 0.0,
        context_features: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        dim = len(domains)
        self.dim = dim
        self.n_params = n_params
        self.circular = [isinstance(d, Circular) for d in domains]
        self.context_features = context_features
        circ = [i for i, c in enumerate(self.circular) if c]
        lin = [i for i, c in enumerate(self.circular) if not c]
        in_deg = torch.tensor(lin + circ + circ) + 1  # degrees 1..D, embedding order
        max_hidden_deg = max(dim - 1, 1)
        hid_deg = torch.arange(hidden) % max_hidden_deg + 1
        out_deg = (torch.arange(dim) + 1).repeat_interleave(n_params)

        m_in = (hid_deg[:, None] >= in_deg[None, :]).float()
        if context_features:
            m_in = torch.cat([m_in, torch.ones(hidden, context_features)], dim=1)
        m_hh = (hid_deg[:, None] >= hid_deg[None, :]).float()
        m_out = (out_deg[:, None] > hid_deg[None, :]).float()
        self.initial = MaskedLinear(m_in)
        self.blocks = nn.ModuleList(
            nn.ModuleList([MaskedLinear(m_hh), MaskedLinear(m_hh)]) for _ in range(n_blocks)
        )
        self.dropout = nn.Dropout(dropout)
        self.final = MaskedLinear(m_out)
        if zero_init:
            nn.init.zeros_(self.final.weight)
            nn.init.zeros_(self.final.bias)
        else:
            nn.init.uniform_(self.final.weight, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(batch, D)`` -> parameters ``(batch, D, n_params)``."""
        h = circular_features(x, self.circular)
        if self.context_features:
            if context is None:
                raise ValueError("this network needs a context")
            h = torch.cat([h, context], dim=1)
        h = self.initial(h)
        for lin1, lin2 in self.blocks:
            h = h + lin2(self.dropout(F.relu(lin1(F.relu(h)))))
        out = self.final(F.relu(h))
        return out.view(x.shape[0], self.dim, self.n_params)
