"""The molecular systems shipped with boltzgen, installed as the data package `boltzgen._systems`.

This folder holds data only (one folder per system, see `boltzgen.systems`); the file makes it a
package so that a wheel and an editable install both find it through importlib.resources. Use
`boltzgen.systems.shipped_path` instead of importing it.
"""

__all__: list[str] = []
