"""Normalizing flows over mixed unbounded, bounded and circular coordinates."""

from boltzgen.flows.base import (
    Bounded,
    Circular,
    Compose,
    Domain,
    InputOutsideDomainError,
    Inverse,
    Transform,
    Unbounded,
)

__all__ = [
    "Bounded",
    "Circular",
    "Compose",
    "Domain",
    "InputOutsideDomainError",
    "Inverse",
    "Transform",
    "Unbounded",
]
