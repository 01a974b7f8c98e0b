"""Tests of boltzgen.analysis.reweighting against analytic targets and plain numpy histograms."""

import numpy as np
import pytest
from scipy import stats

from boltzgen.analysis import reweighting as rw
from boltzgen.errors import BoltzgenError


def test_normalized_log_weights_stable_and_shift_invariant():
    lw = np.array([1000.0, 999.0, -np.inf, 998.0])
    out = rw.normalized_log_weights(lw)
    assert np.isclose(np.exp(out).sum(), 1.0)
    np.testing.assert_allclose(out, rw.normalized_log_weights(lw - 2000.0))
    w = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(np.exp(out[[0, 1, 3]]), w / w.sum())


def test_ess_count_and_fraction():
    assert rw.ess(np.zeros(50)) == pytest.approx(50.0)
    assert rw.ess_fraction(np.zeros(50)) == pytest.approx(1.0)
    assert rw.ess(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)
    w = np.random.default_rng(0).gamma(2.0, size=200)
    assert rw.ess(np.log(w) + 500.0) == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert rw.ess_fraction(np.log(w)) == pytest.approx(w.sum() ** 2 / (w**2).sum() / 200)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([0.0, np.nan]), "NaN"),
        (np.full(3, -np.inf), "all weights are zero"),
        (np.zeros((2, 2)), "shape"),
        (np.array([0.0, np.inf]), r"\+inf"),
        (np.zeros(0), "empty"),
    ],
)
def test_bad_log_weights_raise_clear_errors(bad, match):
    with pytest.raises(rw.WeightError, match=match) as info:
        rw.ess(bad)
    assert isinstance(info.value, BoltzgenError)


@pytest.mark.parametrize("k", [0.3, 0.6, 1.0])
def test_pareto_khat_recovers_tail_index(k):
    # Weights from a Pareto distribution with tail index 1/k have GPD tail shape k; one
    # estimate from 20000 weights scatters by ~0.07, the mean of five by ~0.03.
    khats = [
        rw.pareto_khat(np.log(np.random.default_rng(s).pareto(1.0 / k, size=20000) + 1.0))
        for s in range(5)
    ]
    assert np.mean(khats) == pytest.approx(k, abs=0.08)


def test_pareto_khat_bounded_weights_and_verdicts():
    assert rw.pareto_khat(np.zeros(100)) == -np.inf
    # one to four samples carry all the weight (the rest underflow next to them): unreliable
    for n_top in (1, 4):
        dominated = np.r_[np.zeros(100 - n_top), 1000.0 + np.arange(n_top)]
        assert rw.pareto_khat(dominated) == np.inf
        assert rw.khat_verdict(rw.pareto_khat(dominated), n=100).startswith("unreliable")
    assert np.isfinite(rw.pareto_khat(np.r_[np.zeros(95), 1000.0 + np.arange(5)]))
    assert rw.khat_verdict(-np.inf).startswith("good")
    assert rw.khat_verdict(0.3).startswith("good")
    assert rw.khat_verdict(0.6, n=10000).startswith("ok")
    assert rw.khat_verdict(0.9, n=10000).startswith("unreliable")
    # With 100 samples the threshold is min(1 - 1/log10(100), 0.7) = 0.5.
    assert rw.khat_verdict(0.55, n=100).startswith("unreliable")


def test_equal_weights_reproduce_plain_histograms_exactly():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 2))
    rngs = [(-3.0, 3.0), (-2.5, 2.5)]
    for lw in (None, np.full(1000, 7.3)):
        h, edges = rw.histogram(x, lw, bins=[12, 9], ranges=rngs)
        counts, e0, e1 = np.histogram2d(x[:, 0], x[:, 1], bins=[12, 9], range=rngs)
        assert np.array_equal(h, counts / 1000)
        np.testing.assert_array_equal(edges[0], e0)
        h1, _ = rw.histogram(x[:, 0], lw, bins=15, ranges=(-2.0, 2.0), density=True)
        d1, _ = np.histogram(x[:, 0], bins=15, range=(-2.0, 2.0))
        np.testing.assert_allclose(h1, d1 / 1000 / (4.0 / 15), rtol=1e-14)
    fes = rw.free_energy_surface(x[:, 0], None, bins=15, ranges=(-2.0, 2.0), kT=2.5, n_bootstrap=0)
    with np.errstate(divide="ignore"):
        f = -2.5 * np.log(d1 / 1000)
    np.testing.assert_allclose(fes.free_energy, f - f.min(), rtol=1e-14)


def test_weighted_histogram_and_expectation_match_direct_sums():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 500)
    lw = rng.normal(size=500)
    w = np.exp(lw) / np.exp(lw).sum()
    h, _ = rw.histogram(x, lw, bins=4, ranges=(-1.0, 1.0))
    direct = [w[(x >= a) & (x < a + 0.5)].sum() for a in (-1.0, -0.5, 0.0, 0.5)]
    np.testing.assert_allclose(h, direct, rtol=1e-12)
    assert rw.expectation(x**2, lw) == pytest.approx((w * x**2).sum())
    np.testing.assert_allclose(
        rw.expectation(np.stack([x, x**2], 1), lw), [(w * x).sum(), (w * x**2).sum()]
    )


# --- analytic target: a two-state Gaussian mixture sampled by a mismatched Gaussian proposal ---
_W, _MU, _SD = np.array([0.75, 0.25]), np.array([-1.2, 1.5]), np.array([0.6, 0.5])
_Q_MU, _Q_SD = 0.8, 1.6  # deliberately off: centred on the minor state, too wide


def _log_target(x):
    # Unnormalised on purpose (the factor exp(3.7) must not matter).
    comps = np.log(_W) + stats.norm.logpdf(x[..., None], _MU, _SD)
    return np.logaddexp.reduce(comps, axis=-1) + 3.7


def _true_df():
    p_b = np.sum(_W * stats.norm.sf(0.0, _MU, _SD))
    return -np.log(p_b / (1.0 - p_b))


def test_reweighted_state_free_energy_unbiased_and_bootstrap_calibrated():
    rng = np.random.default_rng(4)
    states = rw.states_from_dict({"A": {"x": [-np.inf, 0.0]}, "B": {"x": [0.0, np.inf]}})
    true = _true_df()
    n_rep, n = 200, 1000
    est, err = np.empty(n_rep), np.empty(n_rep)
    for r in range(n_rep):
        x = rng.normal(_Q_MU, _Q_SD, n)
        lw = _log_target(x) - stats.norm.logpdf(x, _Q_MU, _Q_SD)
        res = rw.state_free_energies(states, {"x": x}, lw, kT=1.0, n_bootstrap=200, seed=r)
        est[r], err[r] = res.free_energy[1], res.free_energy_error[1]
    # Unbiased: the mean over repeats is within 2 standard errors of the truth.
    assert abs(est.mean() - true) < 2.0 * est.std(ddof=1) / np.sqrt(n_rep)
    # Calibrated: bootstrap errors match the spread over repeats, 95 % intervals cover ~95 %.
    assert np.median(err) / est.std(ddof=1) == pytest.approx(1.0, abs=0.15)
    coverage = np.mean(np.abs(est - true) <= 1.96 * err)
    assert 0.90 <= coverage <= 0.99


def test_free_energy_surface_errors_calibrated_in_a_bin():
    rng = np.random.default_rng(5)
    edges = (-3.0, 3.0)
    fes_true = None
    vals, errs = [], []
    for r in range(100):
        x = rng.normal(_Q_MU, _Q_SD, 2000)
        lw = _log_target(x) - stats.norm.logpdf(x, _Q_MU, _Q_SD)
        fes = rw.free_energy_surface(x, lw, bins=6, ranges=edges, n_bootstrap=100, seed=r)
        ref = np.argmin(fes.free_energy)
        if fes_true is None:
            cdf = np.sum(_W * stats.norm.cdf(np.linspace(*edges, 7)[:, None], _MU, _SD), axis=1)
            p = np.diff(cdf)
            fes_true = -np.log(p / p[ref])
        vals.append(fes.free_energy[4])
        errs.append(fes.error[4])
    vals, errs = np.array(vals), np.array(errs)
    assert abs(vals.mean() - fes_true[4]) < 2.5 * vals.std(ddof=1) / 10.0
    assert 0.88 <= np.mean(np.abs(vals - fes_true[4]) <= 1.96 * errs) <= 0.995


def test_thermodynamic_free_energy_difference_and_log_z():
    # u_A = x^2 / 2, u_B = x^2 / (2 s^2): f_B - f_A = -ln s; proposal N(0.3, 1.3^2).
    rng = np.random.default_rng(6)
    s = 1.4
    df, se, lz = [], [], []
    for r in range(100):
        x = rng.normal(0.3, 1.3, 2000)
        lw = -0.5 * x**2 - stats.norm.logpdf(x, 0.3, 1.3)
        d, e = rw.free_energy_difference(
            lw, 0.5 * x**2 / s**2 - 0.5 * x**2, n_bootstrap=100, seed=r
        )
        df.append(d)
        se.append(e)
        lz.append(rw.log_z(lw))
    df, se = np.array(df), np.array(se)
    assert abs(df.mean() + np.log(s)) < 2.0 * df.std(ddof=1) / 10.0
    assert 0.88 <= np.mean(np.abs(df + np.log(s)) <= 1.96 * se) <= 1.0
    lz = np.array(lz)
    true_lz = 0.5 * np.log(2 * np.pi)
    assert abs(lz[:, 0].mean() - true_lz) < 2.0 * lz[:, 0].std(ddof=1) / 10.0
    assert np.median(lz[:, 1]) / lz[:, 0].std(ddof=1) == pytest.approx(1.0, abs=0.2)
    assert rw.log_z(lw, kT=2.0)[0] == pytest.approx(-2.0 * rw.log_z(lw)[0])


def test_reweight_to_other_temperature_matches_direct_boltzmann():
    # Samples exactly from N(0, 1) (u_A = x^2 / 2) reweighted to u_B = x^2 (variance 1/2).
    x = np.random.default_rng(7).normal(size=200_000)
    lw = rw.reweight_to(None, 0.5 * x**2)
    assert rw.expectation(x**2, lw) == pytest.approx(0.5, rel=0.02)


def test_block_bootstrap_honest_for_correlated_series():
    # AR(1) series: the iid bootstrap underestimates the error, the block bootstrap does not.
    rng = np.random.default_rng(8)
    a, n, n_rep = 0.95, 4000, 60
    noise = rng.normal(size=(n_rep, n))
    x = np.empty_like(noise)
    x[:, 0] = noise[:, 0] / np.sqrt(1 - a**2)
    for t in range(1, n):
        x[:, t] = a * x[:, t - 1] + noise[:, t]
    states = rw.states_from_dict({"low": {"x": [-np.inf, 1.0]}, "high": {"x": [1.0, np.inf]}})
    est, e_iid, e_blk = [], [], []
    for r in range(n_rep):
        cv = {"x": x[r]}
        blk = rw.state_free_energies(states, cv, None, n_bootstrap=100, block_length=200, seed=r)
        iid = rw.state_free_energies(states, cv, None, n_bootstrap=100, block_length=1, seed=r)
        est.append(blk.free_energy[1])
        e_blk.append(blk.free_energy_error[1])
        e_iid.append(iid.free_energy_error[1])
    true_se = np.std(est, ddof=1)
    assert np.median(e_blk) / true_se == pytest.approx(1.0, abs=0.3)
    assert np.median(e_iid) / true_se < 0.5


def test_states_parsing_and_errors():
    st = rw.states_from_dict(
        {"states": {"a": {"phi": [[-180, 0]], "psi": [100, 180]}}}, scale=np.pi / 180
    )
    assert st[0].intervals["psi"] == ((np.radians(100), np.pi),)
    mask = st[0].contains({"phi": np.radians([-90, -90, 10]), "psi": np.radians([120, 0, 120])})
    assert mask.tolist() == [True, False, False]
    with pytest.raises(rw.WeightError, match="lo < hi"):
        rw.states_from_dict({"a": {"x": [2, 1]}})
    with pytest.raises(rw.WeightError, match="not among"):
        st[0].contains({"x": np.zeros(3)})
    # a state nobody visited: population 0, free energy +inf, no error bar
    res = rw.state_free_energies(
        rw.states_from_dict({"a": {"x": [0, 1]}, "b": {"x": [5, 6]}}), {"x": np.full(10, 0.5)}
    )
    np.testing.assert_allclose(res.population, [1.0, 0.0])
    assert res.free_energy[1] == np.inf
    assert np.isnan(res.population_error[1]) or res.population_error[1] == 0.0
    with pytest.raises(rw.WeightError, match="reference state 'b'"):
        rw.state_free_energies(
            rw.states_from_dict({"b": {"x": [5, 6]}, "a": {"x": [0, 1]}}), {"x": np.full(10, 0.5)}
        )


def test_khat_names_the_samples_it_needs():
    rng = np.random.default_rng(0)
    with pytest.raises(rw.WeightError, match=f"at least {rw.KHAT_MIN_SAMPLES} samples.*got 15"):
        rw.pareto_khat(rng.normal(size=15))
    assert np.isfinite(rw.pareto_khat(rng.normal(size=rw.KHAT_MIN_SAMPLES)))


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_statistical_inefficiency_of_an_ar1_process(rho):
    """AR(1), x_t = rho x_{t-1} + e_t: g = (1 + rho) / (1 - rho) exactly."""
    rng = np.random.default_rng(1)
    n = 100_000
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0] / np.sqrt(1 - rho**2)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + e[i]
    g = rw.statistical_inefficiency(x)
    assert g == pytest.approx((1 + rho) / (1 - rho), rel=0.1)
    assert rw.statistical_inefficiency(np.ones(10)) == 1.0
