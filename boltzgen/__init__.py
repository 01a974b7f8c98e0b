"""boltzgen: Boltzmann generators for molecules.

The package is imported lazily: ``import boltzgen`` is cheap (no torch, no OpenMM); submodules
(`boltzgen.systems`, `boltzgen.energy`, ...) load their heavy dependencies when first used.
"""

from boltzgen.errors import BoltzgenError

__version__ = "0.2.0"

__all__ = ["BoltzgenError", "__version__"]
