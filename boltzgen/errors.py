"""Exceptions raised by boltzgen. The CLI turns a `BoltzgenError` into one message and exit 2."""

__all__ = ["BoltzgenError", "SystemLoadError", "UnsupportedForceError"]


class BoltzgenError(Exception):
    """Base class of all errors boltzgen raises on bad input."""


class SystemLoadError(BoltzgenError, ValueError):
    """A molecular system could not be found, read or parametrised."""


class UnsupportedForceError(BoltzgenError, NotImplementedError):
    """An `openmm.System` contains a force the torch-native energy cannot compile."""
