"""Publication-ready figures of free energies, energies and training curves (matplotlib).

Every function computes what it draws with `boltzgen.analysis.reweighting` /
`boltzgen.analysis`, draws it into the caller's Axes (``ax=``) or into a new Figure, saves it
to each given path (the suffix picks the format: ``.png``, ``.pdf``, ``.svg``) and returns the
Figure. Figures are made without pyplot, so no backend is switched and no global setting
changes; the package style (`STYLE`) applies through `matplotlib.rc_context` to the figures made
here, while drawing into the caller's Axes keeps the caller's settings. A Figure made here shows
inline in Jupyter when it is the last expression of a cell (it renders itself as PNG).

Units: angles are given in radians and drawn in degrees; free energies in kJ/mol when `kT` is in
kJ/mol (the default labels say so), energies in kJ/mol.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from boltzgen.analysis import SampleError, energy_histogram
from boltzgen.analysis.reweighting import free_energy_surface

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
AxesArg = Axes | Sequence[Axes] | np.ndarray


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


class _InlineFigure(Figure):
    """A Figure that IPython displays as PNG without pyplot or ``%matplotlib inline``."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=self.dpi, bbox_inches="tight")
        return buf.getvalue()


def _given_axes(ax: AxesArg, n: int, what: str) -> list[Axes]:
    axes = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"ax: expected {n} matplotlib Axes ({what}), got {ax!r}")
    if any(a.figure is not axes[0].figure for a in axes):
        raise ValueError("ax: the Axes must belong to one figure")
    return axes


@contextmanager
def _panels(
    ax: AxesArg | None,
    n: int,
    what: str,
    figsize: tuple[float, float],
    nrows: int = 1,
    sharex: bool = False,
    sharey: bool = False,
) -> Iterator[tuple[Figure | SubFigure, list[Axes]]]:
    """The caller's `n` Axes and their figure, or a new Figure with `n` panels (`nrows` rows)
    drawn in `STYLE`: everything drawn inside the block keeps the style wherever it is
    rendered later, and the global rcParams stay as they are."""
    if ax is not None:
        axes = _given_axes(ax, n, what)
        yield axes[0].figure, axes
        return
    with matplotlib.rc_context(STYLE):
        fig = _InlineFigure(figsize=figsize)
        grid = fig.subplots(nrows, n // nrows, squeeze=False, sharex=sharex, sharey=sharey)
        yield fig, list(grid.ravel())


def _save(fig: Figure | SubFigure, paths: Paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    root = fig if isinstance(fig, Figure) else fig.figure  # a SubFigure saves its whole figure
    out = []
    with matplotlib.rc_context(STYLE):
        for p in paths:
            p = Path(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            root.savefig(p)
            out.append(p)
    return out


def _unit(kT: float) -> str:
    return "kT" if kT == 1.0 else "kJ/mol"


def plot_ramachandran(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
    paths: Paths | None = None,
    bins: int = 60,
    kT: float = 1.0,
    f_max: float | None = None,
    *,
    ax: AxesArg | None = None,
    labels: tuple[str, str] = (r"$\phi$ (deg)", r"$\psi$ (deg)"),
) -> Figure | SubFigure:
    """Ramachandran free-energy surfaces side by side (e.g. flow raw, reweighted, MD).

    Args:
        panels: ``(title, phi_psi, log_w)`` per panel; phi_psi `(n, 2)` radians (any two
            dihedral CVs), log_w `(n,)` or None.
        paths: File(s) to write (None: none).
        bins: Bins per angle on [-pi, pi).
        kT: Energy unit (kJ/mol) of the colour scale; 1 for kT units.
        f_max: Top of the colour scale (default ``12 kT``).
        ax: One Axes per panel to draw into (a single Axes for one panel); None: a new Figure.
        labels: Axis labels of the two angles (x, y).

    Returns:
        The Figure (``ax.figure`` when `ax` is given); panel k's mesh holds the free energy
        `(second-angle bins, first-angle bins)` of panel k, empty bins masked.
    """
    f_max = 12.0 * kT if f_max is None else f_max
    n = len(panels)
    size = (2.6 * n + 0.6, 2.6)
    with _panels(ax, n, "one per panel", size, sharey=True) as (fig, axes):
        mesh = None
        for a, (title, pp, log_w) in zip(axes, panels):
            fes = free_energy_surface(
                np.asarray(pp), log_w, bins=bins, ranges=[_PERIOD, _PERIOD], kT=kT, n_bootstrap=0
            )
            deg = [np.degrees(e) for e in fes.edges]
            shown = np.where(np.isfinite(fes.free_energy), fes.free_energy, np.nan)
            mesh = a.pcolormesh(
                deg[0], deg[1], shown.T, cmap="viridis", vmin=0.0, vmax=f_max, shading="flat"
            )
            a.set_title(title)
            a.set_xlabel(labels[0])
            a.set_xticks([-180, -90, 0, 90, 180])
            a.set_yticks([-180, -90, 0, 90, 180])
            a.set_aspect("equal")
        axes[0].set_ylabel(labels[1])
        cbar = fig.colorbar(mesh, ax=axes, shrink=0.9)
        cbar.set_label(f"free energy ({_unit(kT)})")
    if paths is not None:
        _save(fig, paths)
    return fig


def plot_fes_1d(
    profiles: Sequence[tuple[str, np.ndarray, np.ndarray | None, int]],
    paths: Paths | None = None,
    xlabel: str = r"$\phi$ (deg)",
    bins: int = 60,
    kT: float = 1.0,
    angular: bool = True,
    n_bootstrap: int = 100,
    seed: int = 0,
    *,
    ax: Axes | None = None,
) -> Figure | SubFigure:
    """1-D free-energy profiles with bootstrap error bands (e.g. reweighted flow vs MD along phi).

    Args:
        profiles: ``(label, cv, log_w, block_length)`` per curve; cv `(n,)` (radians if
            `angular`), block_length the bootstrap block (1 for independent samples, longer for
            MD time series).
        paths: File(s) to write (None: none).
        xlabel: x-axis label.
        bins: Number of bins; angular CVs use [-pi, pi) and are drawn in degrees.
        kT: Energy unit (kJ/mol), 1 for kT units.
        angular: Whether the CV is an angle.
        n_bootstrap: Bootstrap replicates per curve; seed: their seed.
        ax: The Axes to draw into; None: a new Figure.

    Returns:
        The Figure (``ax.figure`` when `ax` is given): one line per curve (bin centres, free
        energy) and a band of +- one bootstrap standard error around it.
    """
    with _panels(ax, 1, "a single panel", (3.4, 2.6)) as (fig, (a,)):
        for label, cv, log_w, block in profiles:
            fes = free_energy_surface(
                np.asarray(cv, np.float64),
                log_w,
                bins=bins,
                ranges=_PERIOD if angular else None,
                kT=kT,
                n_bootstrap=n_bootstrap,
                block_length=block,
                seed=seed,
            )
            x = np.degrees(fes.centers[0]) if angular else fes.centers[0]
            f = np.where(np.isfinite(fes.free_energy), fes.free_energy, np.nan)
            err = np.nan_to_num(fes.error, nan=0.0)
            (line,) = a.plot(x, f, label=label, lw=1.2)
            a.fill_between(x, f - err, f + err, color=line.get_color(), alpha=0.3, lw=0)
        if angular:
            a.set_xlim(-180, 180)
            a.set_xticks([-180, -90, 0, 90, 180])
        a.set_xlabel(xlabel)
        a.set_ylabel(f"free energy ({_unit(kT)})")
        a.legend(frameon=False)
    if paths is not None:
        _save(fig, paths)
    return fig


def plot_energy_distributions(
    sets: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
    paths: Paths | None = None,
    bins: int = 60,
    ranges: tuple[float, float] | None = None,
    *,
    ax: Axes | None = None,
) -> Figure | SubFigure:
    """Potential-energy distributions (e.g. flow raw, reweighted, MD) on shared bins.

    Args:
        sets: ``(label, energies, log_w)``; energies `(n,)` kJ/mol.
        paths: File(s) to write (None: none).
        bins: Number of bins; ranges: `(lo, hi)` kJ/mol, default the 0.5-99.5 % range of all.
        ax: The Axes to draw into; None: a new Figure.

    Returns:
        The Figure (``ax.figure`` when `ax` is given): one step outline per set, its data the
        density (mol/kJ) over the bin edges (kJ/mol).
    """
    if ranges is None:
        allv = np.concatenate([np.asarray(e, np.float64) for _, e, _ in sets])
        allv = allv[np.isfinite(allv)]
        if allv.size == 0:
            raise SampleError("no finite energies to plot")
        lo, hi = np.percentile(allv, [0.5, 99.5])
        ranges = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    with _panels(ax, 1, "a single panel", (3.4, 2.6)) as (fig, (a,)):
        top = 0.0
        for label, e, log_w in sets:
            dens, edges = energy_histogram(e, log_w, bins=bins, ranges=ranges)
            a.stairs(dens, edges, label=label, lw=1.2)
            top = max(top, float(np.max(dens)) if dens.size else 0.0)
        a.set_ylim(0.0, 1.35 * top if top > 0 else 1.0)  # headroom for the legend
        a.set_xlabel("potential energy (kJ/mol)")
        a.set_ylabel("density (mol/kJ)")
        a.legend(frameon=False)
    if paths is not None:
        _save(fig, paths)
    return fig


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
    paths: Paths | None = None,
    x: str | None = None,
    columns: Sequence[str] | None = None,
    *,
    ax: AxesArg | None = None,
) -> Figure | SubFigure:
    """Training curves from the CSV log, one panel per metric.

    Args:
        csv_path: The CSV log (`read_training_log` reads it).
        paths: File(s) to write (None: none).
        x: The x column (default ``step``, ``iteration`` or ``epoch`` if present, else the row).
        columns: Metrics to draw (default all numeric columns other than x).
        ax: One Axes per metric to draw into (a single Axes for one metric); None: a new
            Figure with the panels stacked.

    Returns:
        The Figure (``ax.figure`` when `ax` is given); panel k holds one line, metric k
        against x.
    """
    cols = read_training_log(csv_path)
    if x is None:
        x = next((c for c in ("step", "iteration", "iter", "epoch") if c in cols), None)
    xs = cols[x] if x is not None else np.arange(len(next(iter(cols.values()))), dtype=float)
    names = [c for c in (columns or cols) if c != x and c in cols]
    if not names:
        raise SampleError(f"{csv_path}: no numeric metric columns")
    n = len(names)
    size = (3.6, 1.5 * n + 0.4)
    with _panels(ax, n, "one per metric", size, nrows=n, sharex=True) as (fig, axes):
        for a, name in zip(axes, names):
            a.plot(xs, cols[name], lw=1.0)
            a.set_ylabel(name)
        axes[-1].set_xlabel(x or "row")
    if paths is not None:
        _save(fig, paths)
    return fig
