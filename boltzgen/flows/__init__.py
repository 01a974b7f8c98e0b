"""Normalizing flows over mixed unbounded, bounded and circular coordinates."""

from boltzgen.flows.autoregressive import MaskedAffineAutoregressive, MaskedSplineAutoregressive
from boltzgen.flows.base import (
    Bounded,
    Circular,
    Compose,
    Domain,
    InputOutsideDomainError,
    Inverse,
    Transform,
    Unbounded,
    circular_mask,
    wrap_angle,
    wrap_circular,
)
from boltzgen.flows.coupling import AffineCoupling, SplineCoupling, alternating_mask, random_mask
from boltzgen.flows.distributions import (
    BaseDistribution,
    DiagonalGaussian,
    ProductBase,
    Uniform,
    UniformCircle,
    VonMises,
)
from boltzgen.flows.elementwise import (
    ActNorm,
    CircularShift,
    LULinear,
    Permutation,
    random_permutation,
)
from boltzgen.flows.flow import Flow, make_spline_flow
from boltzgen.flows.nets import MADE, MaskedLinear, ResidualNet, circular_features
from boltzgen.flows.presets import fab_aldp_flow
from boltzgen.flows.splines import DomainSpline, rqs_forward, rqs_inverse, rqs_knots

__all__ = [
    "MADE",
    "ActNorm",
    "AffineCoupling",
    "BaseDistribution",
    "Bounded",
    "Circular",
    "CircularShift",
    "Compose",
    "DiagonalGaussian",
    "Domain",
    "DomainSpline",
    "Flow",
    "InputOutsideDomainError",
    "Inverse",
    "LULinear",
    "MaskedAffineAutoregressive",
    "MaskedLinear",
    "MaskedSplineAutoregressive",
    "Permutation",
    "ProductBase",
    "ResidualNet",
    "SplineCoupling",
    "Transform",
    "Unbounded",
    "Uniform",
    "UniformCircle",
    "VonMises",
    "alternating_mask",
    "circular_mask",
    "circular_features",
    "fab_aldp_flow",
    "make_spline_flow",
    "random_mask",
    "random_permutation",
    "rqs_forward",
    "rqs_inverse",
    "rqs_knots",
    "wrap_angle",
    "wrap_circular",
]
