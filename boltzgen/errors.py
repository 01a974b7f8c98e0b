"""Exceptions raised by boltzgen, one type per kind of bad input.

Every one is a `BoltzgenError`; the CLI turns it into one ``boltzgen: error: ...`` line and exit
code 2. Most also derive from the built-in exception a caller would expect (`ValueError`, ...).
Each is defined here once and re-exported by the module that raises it.
"""

__all__ = [
    "BoltzgenError",
    "CheckpointError",
    "ConfigError",
    "InputOutsideDomainError",
    "MDError",
    "SampleError",
    "SamplesFileError",
    "SystemLoadError",
    "UnsupportedForceError",
    "WeightError",
    "ZMatrixError",
]


class BoltzgenError(Exception):
    """Base class of all errors boltzgen raises on bad input."""


class ConfigError(BoltzgenError, ValueError):
    """A run configuration or option set is missing, malformed, out of range or has unknown
    keys (YAML run configs, `TrainOptions`, `FABOptions`, CLI options)."""


class SystemLoadError(BoltzgenError, ValueError):
    """A molecular system could not be found, read or parametrised."""


class UnsupportedForceError(BoltzgenError, NotImplementedError):
    """An `openmm.System` contains a force the torch-native energy cannot compile."""


class ZMatrixError(BoltzgenError, ValueError):
    """A Z-matrix is invalid or cannot be built for a molecule."""


class InputOutsideDomainError(BoltzgenError, ValueError):
    """An input lies outside the domain a transform is defined on."""


class MDError(BoltzgenError, ValueError):
    """Invalid MD settings or an unusable MD checkpoint."""


class WeightError(BoltzgenError, ValueError):
    """Log-weights that cannot be used (wrong shape, NaN, all zero weights)."""


class SampleError(BoltzgenError, ValueError):
    """Sample arrays with the wrong shape or non-finite values."""


class SamplesFileError(SampleError):
    """A samples file that cannot be read or has inconsistent arrays."""


class CheckpointError(BoltzgenError):
    """A checkpoint cannot be read or does not fit the run."""
