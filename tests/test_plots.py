"""Tests of boltzgen.analysis.plots: the numbers drawn, ``ax=``, the Figure returned, files,
inline display and matplotlib's global state."""

import sys

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from boltzgen import analysis
from boltzgen.analysis import plots

RNG = np.random.default_rng(4)
PHI_PSI = RNG.uniform(-np.pi, np.pi, (2000, 2))
LOG_W = RNG.normal(size=2000) * 0.3
ENERGIES = RNG.normal(size=2000)


@pytest.fixture
def training_log(tmp_path):
    log = tmp_path / "train.csv"
    log.write_text("step,loss,ess\n0,3.0,0.1\n10,2.0,0.3\n20,1.5,0.5\n")
    return log


def _calls(training_log):
    """Every public plot function: (number of panels, call drawing into `ax`, writing `paths`)."""
    return {
        "plot_ramachandran": (
            2,
            lambda **kw: plots.plot_ramachandran(
                [("raw", PHI_PSI, None), ("rw", PHI_PSI, LOG_W)], bins=10, **kw
            ),
        ),
        "plot_fes_1d": (
            1,
            lambda **kw: plots.plot_fes_1d(
                [("md", PHI_PSI[:, 0], None, 20)], bins=8, n_bootstrap=5, **kw
            ),
        ),
        "plot_energy_distributions": (
            1,
            lambda **kw: plots.plot_energy_distributions([("a", ENERGIES, None)], bins=10, **kw),
        ),
        "plot_training_curves": (2, lambda **kw: plots.plot_training_curves(training_log, **kw)),
    }


PLOT_FUNCTIONS = sorted(n for n in plots.__all__ if n.startswith("plot_"))


def _drawn(ax):
    return len(ax.lines) + len(ax.collections) + len(ax.patches) + len(ax.images)


def _rc_state():
    """The global rcParams (the backend key read separately: reading it resolves the backend)."""
    return matplotlib.get_backend(), {
        k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"
    }


def test_every_plot_function_is_covered(training_log):
    assert sorted(_calls(training_log)) == PLOT_FUNCTIONS


@pytest.mark.parametrize("name", PLOT_FUNCTIONS)
def test_plot_draws_into_given_axes_or_a_new_figure(name, training_log, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n, call = _calls(training_log)[name]
    before = _rc_state()
    user = Figure(figsize=(6, 3))
    axes = user.subplots(1, n, squeeze=False)[0]
    spare = user.add_subplot(2, 2, 4)  # a panel the plot is not given stays empty
    assert all(_drawn(ax) == 0 for ax in axes)
    given = axes[0] if n == 1 else axes
    assert call(ax=given) is user
    assert all(_drawn(ax) > 0 for ax in axes) and _drawn(spare) == 0

    fig = call()
    assert isinstance(fig, Figure) and fig is not user
    assert sum(_drawn(ax) > 0 for ax in fig.axes) >= n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]  # no path, no file

    paths = [tmp_path / "out" / "f.png", tmp_path / "out" / "f.pdf"]
    assert call(ax=given, paths=paths) is user
    assert all(p.stat().st_size > 1000 for p in paths)
    assert _rc_state() == before  # backend and every rcParam as they were
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []  # nothing left open in pyplot


@pytest.mark.parametrize("name", ["plot_ramachandran", "plot_training_curves"])
def test_plot_with_several_panels_wants_one_axes_per_panel(name, training_log):
    n, call = _calls(training_log)[name]
    with pytest.raises(ValueError, match=f"expected {n} matplotlib Axes"):
        call(ax=Figure().subplots(1, n + 1))
    with pytest.raises(ValueError, match="one figure"):
        call(ax=[Figure().subplots() for _ in range(n)])


def test_plots_draw_the_computed_data(tmp_path, training_log):
    fig = plots.plot_ramachandran([("raw", PHI_PSI, None), ("rw", PHI_PSI, LOG_W)], bins=10, kT=2.5)
    drawn = [ax.collections[0].get_array() for ax in fig.axes[:2]]  # (psi, phi) bins
    counts, _, _ = np.histogram2d(*PHI_PSI.T, bins=10, range=[(-np.pi, np.pi)] * 2)
    f = -2.5 * np.log(counts / 2000)
    np.testing.assert_allclose(drawn[0].T, f - f.min(), rtol=1e-12)
    h_rw = analysis.ramachandran(PHI_PSI[:, 0], PHI_PSI[:, 1], LOG_W, bins=10)
    np.testing.assert_allclose(drawn[1].T, -2.5 * np.log(h_rw / h_rw.max()), rtol=1e-10)

    ax = plots.plot_fes_1d([("md", PHI_PSI[:, 0], None, 20)], bins=8, kT=1.0).axes[0]
    c, edges = np.histogram(PHI_PSI[:, 0], bins=8, range=(-np.pi, np.pi))
    centres = np.degrees(0.5 * (edges[1:] + edges[:-1]))
    np.testing.assert_allclose(ax.lines[0].get_xdata(), centres, rtol=1e-12)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), -np.log(c / c.max()), atol=1e-12)
    band = ax.collections[0].get_paths()[0].vertices  # +- one bootstrap standard error
    width = np.array([np.ptp(band[np.isclose(band[:, 0], x), 1]) for x in centres])
    assert np.all(width[np.argmax(c) != np.arange(8)] > 0)

    ax = plots.plot_energy_distributions([("a", ENERGIES, None)], bins=10).axes[0]
    dens, edges, _ = ax.patches[0].get_data()
    ref, _ = np.histogram(ENERGIES, bins=10, range=tuple(np.percentile(ENERGIES, [0.5, 99.5])))
    np.testing.assert_allclose(edges, np.linspace(*np.percentile(ENERGIES, [0.5, 99.5]), 11))
    # The outer 1 % lie outside the range: the density integrates to the mass inside.
    np.testing.assert_allclose(dens, ref / (2000 * np.diff(edges)), rtol=1e-12)

    loss, ess = plots.plot_training_curves(training_log).axes
    np.testing.assert_array_equal(loss.lines[0].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(loss.lines[0].get_ydata(), [3.0, 2.0, 1.5])
    assert (loss.get_ylabel(), ess.get_ylabel(), ess.get_xlabel()) == ("loss", "ess", "step")


def test_own_figures_keep_the_style_and_given_axes_the_callers_settings():
    fig = plots.plot_energy_distributions([("a", ENERGIES, None)])
    fig._repr_png_()  # rendered outside the style context: the style stays
    ax = fig.axes[0]
    assert ax.xaxis.label.get_fontsize() == plots.STYLE["axes.labelsize"]
    assert ax.xaxis.get_major_ticks()[0].label1.get_fontsize() == plots.STYLE["xtick.labelsize"]
    with matplotlib.rc_context({"axes.labelsize": 14}):
        user = Figure()
        ax = user.subplots()
        plots.plot_energy_distributions([("a", ENERGIES, None)], ax=ax)
    assert ax.xaxis.label.get_fontsize() == 14


def test_figures_display_inline_as_png_without_pyplot():
    formatters = pytest.importorskip("IPython.core.formatters")
    fig = plots.plot_fes_1d([("md", PHI_PSI[:, 1], LOG_W, 1)], n_bootstrap=5)
    data, _ = formatters.DisplayFormatter().format(fig)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
