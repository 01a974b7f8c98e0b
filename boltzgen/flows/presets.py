"""Published flow architectures as one-call presets (built with `make_spline_flow`)."""

from __future__ import annotations

from collections.abc import Sequence

from boltzgen.flows.base import Domain
from boltzgen.flows.flow import Flow, make_spline_flow

__all__ = ["fab_aldp_flow"]


def fab_aldp_flow(domains: Sequence[Domain], seed: int = 0, **kwargs: object) -> Flow:
    """The FAB alanine-dipeptide architecture (Midgley et al., ICLR 2023) in one call.

    12 rational-quadratic spline coupling blocks (8 bins, residual conditioners with one block of
    256 hidden units), circular splines on the angles, splines on the conditioning dims too,
    a random circular shift after each block, identity initialisation, and a Gaussian x uniform
    base (`ProductBase`). Keyword arguments override `make_spline_flow` defaults.
    """
    settings: dict = dict(
        n_blocks=12,
        n_bins=8,
        hidden=256,
        n_res_blocks=1,
        layer_type="coupling",
        circular_shift=True,
        identity_spline=True,
        tail_bound=5.0,
        seed=seed,
    )
    settings.update(kwargs)
    return make_spline_flow(domains, **settings)
