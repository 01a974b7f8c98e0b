"""Publication-ready figures of free energies, energies and training curves (matplotlib).

Every function computes what it draws with `boltzgen.analysis.reweighting` /
`boltzgen.analysis`, saves the figure to each given path (the suffix picks the format:
``.png``, ``.pdf``, ``.svg``) and returns the plotted data, so that tests (and users) can check
the numbers behind a figure.
matplotlib is imported inside the functions; figures are `matplotlib.figure.Figure` objects
made without pyplot, so no backend is switched and no global setting changes (a notebook's
inline plots keep working).

Units: angles are given in radians and drawn in degrees; free energies in kJ/mol when `kT` is in
kJ/mol (the default labels say so), energies in kJ/mol.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.analysis import SampleError, energy_histogram
from boltzgen.analysis.reweighting import FreeEnergySurface, free_energy_surface

__all__ = [
    "STYLE",
    "plot_energy_distributions",
    "plot_fes_1d",
    "plot_ramachandran",
    "plot_training_curves",
    "read_training_log",
]

_PERIOD = (-np.pi, np.pi)
Paths = str | os.PathLike | Sequence[str | os.PathLike]


#: Sizes for small publication figures, applied per figure through `matplotlib.rc_context`
#: (the global rcParams, and with them a notebook's own figures, stay as they are).
STYLE = {
    "font.size": 9,
    "axes.labelsize": 9,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
}


def _figure(figsize: tuple[float, float]) -> Any:
    """A `matplotlib.figure.Figure` made without pyplot: no backend switch, no global state,
    nothing left open; it saves to files on any backend and shows inline in Jupyter."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        return Figure(figsize=figsize)


def _save(fig: Any, paths: Paths) -> list[Path]:
    import matplotlib

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    with matplotlib.rc_context(STYLE):
        for p in paths:
            p = Path(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(p)
            out.append(p)
    return out


def _unit(kT: float) -> str:
    return "kT" if kT == 1.0 else "kJ/mol"


def plot_ramachandran(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
    paths: Paths,
    bins: int = 60,
    kT: float = 1.0,
    f_max: float | None = None,
) -> list[FreeEnergySurface]:
    """Ramachandran free-energy surfaces side by side (e.g. flow raw, reweighted, MD).

    Args:
        panels: ``(title, phi_psi, log_w)`` per panel; phi_psi `(n, 2)` radians, log_w `(n,)` or
            None.
        paths: File(s) to write.
        bins: Bins per angle on [-pi, pi).
        kT: Energy unit (kJ/mol) of the colour scale; 1 for kT units.
        f_max: Top of the colour scale (default ``12 kT``).

    Returns:
        The `FreeEnergySurface` drawn in each panel (axis 0 phi, axis 1 psi).
    """
    f_max = 12.0 * kT if f_max is None else f_max
    n = len(panels)
    fig = _figure((2.6 * n + 0.6, 2.6))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)
    surfaces = []
    mesh = None
    for ax, (title, pp, log_w) in zip(axes[0], panels):
        pp = np.asarray(pp)
        fes = free_energy_surface(
            pp, log_w, bins=bins, ranges=[_PERIOD, _PERIOD], kT=kT, n_bootstrap=0
        )
        surfaces.append(fes)
        deg = [np.degrees(e) for e in fes.edges]
        shown = np.where(np.isfinite(fes.free_energy), fes.free_energy, np.nan)
        mesh = ax.pcolormesh(
            deg[0], deg[1], shown.T, cmap="viridis", vmin=0.0, vmax=f_max, shading="flat"
        )
        ax.set_title(title)
        ax.set_xlabel(r"$\phi$ (deg)")
        ax.set_xticks([-180, -90, 0, 90, 180])
        ax.set_yticks([-180, -90, 0, 90, 180])
        ax.set_aspect("equal")
    axes[0][0].set_ylabel(r"$\psi$ (deg)")
    cbar = fig.colorbar(mesh, ax=list(axes[0]), shrink=0.9)
    cbar.set_label(f"free energy ({_unit(kT)})")
    _save(fig, paths)
    return surfaces


def plot_fes_1d(
    profiles: Sequence[tuple[str, np.ndarray, np.ndarray | None, int]],
    paths: Paths,
    xlabel: str = r"$\phi$ (deg)",
    bins: int = 60,
    kT: float = 1.0,
    angular: bool = True,
    n_bootstrap: int = 100,
    seed: int = 0,
) -> list[FreeEnergySurface]:
    """1-D free-energy profiles with bootstrap error bands (e.g. reweighted flow vs MD along phi).

    Args:
        profiles: ``(label, cv, log_w, block_length)`` per curve; cv `(n,)` (radians if
            `angular`), block_length the bootstrap block (1 for independent samples, longer for
            MD time series).
        paths: File(s) to write.
        xlabel: x-axis label.
        bins: Number of bins; angular CVs use [-pi, pi) and are drawn in degrees.
        kT: Energy unit (kJ/mol), 1 for kT units.
        angular: Whether the CV is an angle.
        n_bootstrap: Bootstrap replicates per curve; seed: their seed.

    Returns:
        The `FreeEnergySurface` of each curve (bands are +- one standard error).
    """
    fig = _figure((3.4, 2.6))
    ax = fig.subplots()
    out = []
    for label, cv, log_w, block in profiles:
        cv = np.asarray(cv, np.float64)
        ranges = _PERIOD if angular else None
        fes = free_energy_surface(
            cv,
            log_w,
            bins=bins,
            ranges=ranges,
            kT=kT,
            n_bootstrap=n_bootstrap,
            block_length=block,
            seed=seed,
        )
        out.append(fes)
        x = fes.centers[0]
        x = np.degrees(x) if angular else x
        f = np.where(np.isfinite(fes.free_energy), fes.free_energy, np.nan)
        err = np.nan_to_num(fes.error, nan=0.0)
        (line,) = ax.plot(x, f, label=label, lw=1.2)
        ax.fill_between(x, f - err, f + err, color=line.get_color(), alpha=0.3, lw=0)
    if angular:
        ax.set_xlim(-180, 180)
        ax.set_xticks([-180, -90, 0, 90, 180])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"free energy ({_unit(kT)})")
    ax.legend(frameon=False)
    _save(fig, paths)
    return out


def plot_energy_distributions(
    sets: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
    paths: Paths,
    bins: int = 60,
    ranges: tuple[float, float] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Potential-energy distributions (e.g. flow raw, reweighted, MD) on shared bins.

    Args:
        sets: ``(label, energies, log_w)``; energies `(n,)` kJ/mol.
        paths: File(s) to write.
        bins: Number of bins; ranges: `(lo, hi)` kJ/mol, default the 0.5-99.5 % range of all.

    Returns:
        ``(density, edges)`` per set.
    """
    if ranges is None:
        allv = np.concatenate([np.asarray(e, np.float64) for _, e, _ in sets])
        allv = allv[np.isfinite(allv)]
        if allv.size == 0:
            raise SampleError("no finite energies to plot")
        lo, hi = np.percentile(allv, [0.5, 99.5])
        ranges = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    fig = _figure((3.4, 2.6))
    ax = fig.subplots()
    out = []
    for label, e, log_w in sets:
        dens, edges = energy_histogram(e, log_w, bins=bins, ranges=ranges)
        out.append((dens, edges))
        ax.stairs(dens, edges, label=label, lw=1.2)
    top = max((float(np.max(d)) for d, _ in out if d.size), default=1.0)
    ax.set_ylim(0.0, 1.35 * top if top > 0 else 1.0)  # headroom for the legend
    ax.set_xlabel("potential energy (kJ/mol)")
    ax.set_ylabel("density (mol/kJ)")
    ax.legend(frameon=False)
    _save(fig, paths)
    return out


def read_training_log(csv_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Numeric columns of a CSV training log (header row, one row per logged step)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SampleError(f"{csv_path}: no rows in the training log")
    cols: dict[str, np.ndarray] = {}
    for name in rows[0]:
        try:
            cols[name] = np.array(
                [float(r[name]) if r[name] not in ("", None) else np.nan for r in rows]
            )
        except ValueError:
            continue
    return cols


def plot_training_curves(
    csv_path: str | os.PathLike,
    paths: Paths,
    x: str | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Training curves from the CSV log, one panel per metric.

    Args:
        csv_path: The CSV log.
        paths: File(s) to write.
        x: The x column (default ``step``, ``iteration`` or ``epoch`` if present, else the row).
        columns: Metrics to draw (default all numeric columns other than x).

    Returns:
        The columns drawn (x first), as arrays.
    """
    cols = read_training_log(csv_path)
    if x is None:
        x = next((c for c in ("step", "iteration", "iter", "epoch") if c in cols), None)
    xs = cols[x] if x is not None else np.arange(len(next(iter(cols.values()))), dtype=float)
    names = [c for c in (columns or cols) if c != x and c in cols]
    if not names:
        raise SampleError(f"{csv_path}: no numeric metric columns")
    fig = _figure((3.6, 1.5 * len(names) + 0.4))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.plot(xs, cols[name], lw=1.0)
        ax.set_ylabel(name)
    axes[-1, 0].set_xlabel(x or "row")
    _save(fig, paths)
    return {x or "row": xs, **{n: cols[n] for n in names}}
