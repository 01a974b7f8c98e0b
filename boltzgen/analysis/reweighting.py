"""Importance reweighting: from weighted samples to unbiased expectations and free energies.

Samples ``x_i ~ q`` with unnormalised log-weights ``log w_i = -u(x_i) - log q(x_i)`` (``u = U/kT``)
estimate Boltzmann expectations with the self-normalised estimator ``sum_i w_i f(x_i) / sum_i w_i``.
Everything here takes log-weights (never weights), is written in numpy float64 and accepts
``log_w=None`` for plain, equally weighted samples (MD).

Contents:
    * weights: `normalized_log_weights`, `ess` (a count), `ess_fraction`, `pareto_khat` and
      `khat_verdict` (PSIS reliability, Vehtari et al. 2024, arXiv:1507.02646), `log_z`.
    * estimates: `expectation`, `histogram`, `free_energy_surface`, `state_free_energies`,
      `reweight_to` / `free_energy_difference` (another temperature or Hamiltonian, Zwanzig 1954).
    * errors: bootstrap over samples (iid) or over blocks of a time series (moving-block bootstrap,
      Kuensch 1989), vectorised over replicates.

Units: free energies in units of ``kT`` unless a `kT` in kJ/mol is passed (then kJ/mol).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from boltzgen.errors import WeightError

__all__ = [
    "FreeEnergySurface",
    "State",
    "StateFreeEnergies",
    "WeightError",
    "bootstrap_indices",
    "ess",
    "ess_fraction",
    "expectation",
    "free_energy_difference",
    "free_energy_surface",
    "histogram",
    "khat_verdict",
    "log_z",
    "normalized_log_weights",
    "KHAT_MIN_SAMPLES",
    "pareto_khat",
    "reweight_to",
    "state_free_energies",
    "statistical_inefficiency",
    "states_from_dict",
]


def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(a))) along `axis`; -inf where every entry is -inf."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _check_log_w(log_w: np.ndarray | None, n: int | None = None) -> np.ndarray:
    """Validated float64 log-weights of shape `(n,)`; zeros (uniform weights) for None."""
    if log_w is None:
        if n is None:
            raise WeightError("log_w is None and the number of samples is unknown")
        return np.zeros(n)
    lw = np.asarray(log_w, dtype=np.float64)
    if lw.ndim != 1:
        raise WeightError(f"log-weights must have shape (n_samples,), got {lw.shape}")
    if n is not None and lw.shape[0] != n:
        raise WeightError(f"{lw.shape[0]} log-weights for {n} samples")
    if lw.shape[0] == 0:
        raise WeightError("no samples: the log-weights are empty")
    if np.isnan(lw).any():
        raise WeightError(f"{int(np.isnan(lw).sum())} of {lw.shape[0]} log-weights are NaN")
    if np.isposinf(lw).any():
        raise WeightError(f"{int(np.isposinf(lw).sum())} log-weights are +inf")
    if np.isneginf(lw).all():
        raise WeightError("all weights are zero (every log-weight is -inf)")
    return lw


def normalized_log_weights(log_w: np.ndarray) -> np.ndarray:
    """Log-weights normalised to sum to one: ``log_w - logsumexp(log_w)``.

    Args:
        log_w: `(n,)` unnormalised log-weights (nats); -inf marks zero weight.

    Returns:
        `(n,)` normalised log-weights.

    Raises:
        WeightError: on a wrong shape, NaN or +inf entries, or all weights zero.
    """
    lw = _check_log_w(log_w)
    return lw - _logsumexp(lw)


def ess(log_w: np.ndarray) -> float:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` (a count, between 1 and n)."""
    lw = _check_log_w(log_w)
    if np.all(lw == lw[0]):
        return float(lw.shape[0])  # equal weights: exactly n, free of rounding
    return float(np.exp(2.0 * _logsumexp(lw) - _logsumexp(2.0 * lw)))


def ess_fraction(log_w: np.ndarray) -> float:
    """Kish effective sample size as a fraction of the number of samples (between 1/n and 1)."""
    return ess(log_w) / np.asarray(log_w).shape[0]


def statistical_inefficiency(x: np.ndarray, window: float = 5.0) -> float:
    """Statistical inefficiency ``g = 1 + 2 sum_k rho_k`` of a time series ``x`` ``(n,)``.

    ``n / g`` samples of the series are worth as much as ``n`` independent ones. The
    autocorrelation ``rho_k`` comes from an FFT; the sum stops at the first lag ``M`` with
    ``M >= window * tau(M)`` (Sokal's self-consistent window). Returns 1 for a constant series.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] < 2 or not np.isfinite(x).all():
        raise WeightError("statistical_inefficiency needs a finite (n,) series with n >= 2")
    n = x.shape[0]
    d = x - x.mean()
    if not np.any(d):
        return 1.0
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(d, size)
    acf = np.fft.irfft(f * np.conj(f), size)[:n]
    rho = acf / acf[0]
    tau = 0.5 + np.cumsum(rho[1:])  # tau(M) = 1/2 + sum_{k=1..M} rho_k
    lags = np.arange(1, n)
    ok = lags >= window * tau
    m = int(np.argmax(ok)) if ok.any() else n - 2
    return float(max(1.0, 2.0 * tau[m]))


def log_z(log_w: np.ndarray, kT: float | None = None) -> tuple[float, float]:
    """Importance-sampling estimate of ``log(Z_target / Z_q)`` with its standard error.

    With a normalised proposal and log-weights ``-u(x) - log q(x)`` this is ``log Z`` of the
    unnormalised target ``exp(-u)``. The error is the delta-method standard error of the log of a
    mean, ``sqrt(1/ESS - 1/n)``.

    Args:
        log_w: `(n,)` unnormalised log-weights.
        kT: If given (kJ/mol), return the free energy ``F = -kT log Z`` and its error instead.

    Returns:
        `(estimate, standard_error)`.
    """
    lw = _check_log_w(log_w)
    n = lw.shape[0]
    value = float(_logsumexp(lw) - np.log(n))
    se = float(np.sqrt(max(1.0 / ess(lw) - 1.0 / n, 0.0)))
    if kT is not None:
        return -kT * value, kT * se
    return value, se


def _gpd_fit(x: np.ndarray) -> float:
    """Shape of a generalised Pareto fit to positive exceedances `x` (Zhang & Stephens 2009).

    Profile likelihood over ``theta = xi / sigma`` on Zhang & Stephens' grid, posterior-mean
    theta, then ``xi = mean(log1p(theta x))``, shrunk towards 0.5 as PSIS prescribes.
    """
    x = np.sort(x)
    n = x.shape[0]
    m = 30 + int(np.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    j = np.arange(1, m + 1, dtype=np.float64)
    # Grid of -theta (Zhang & Stephens' b), all below 1 / max(x) so that 1 + theta x > 0.
    b = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * quartile)
    theta = -b
    xi = np.mean(np.log1p(theta[:, None] * x[None, :]), axis=1)
    profile = n * (np.log(theta / xi) - xi - 1.0)
    post = np.exp(profile - _logsumexp(profile))
    theta_hat = float(np.sum(post * theta))
    xi_hat = float(np.mean(np.log1p(theta_hat * x)))
    return (n * xi_hat + 10 * 0.5) / (n + 10)


#: Fewest samples `pareto_khat` takes: its tail of ``ceil(min(n/5, 3 sqrt(n)))`` weights needs 5.
KHAT_MIN_SAMPLES = 21


def pareto_khat(log_w: np.ndarray) -> float:
    """Pareto-smoothed importance sampling diagnostic k-hat (Vehtari et al., arXiv:1507.02646).

    Fits a generalised Pareto distribution to the largest ``min(n/5, 3 sqrt(n))`` weights; its
    shape k-hat says how heavy the weight tail is: below 0.5 the variance of the weights is
    finite and estimates converge at the usual rate; above 0.7 a few samples dominate and
    reweighted results cannot be trusted. See `khat_verdict`.

    Returns:
        k-hat; -inf when the tail weights are all equal (bounded weights, e.g. uniform); +inf
        when fewer than 5 tail weights stand above the cut, i.e. one to four samples carry
        (almost) all the weight.
    """
    lw = _check_log_w(log_w)
    n = lw.shape[0]
    m = int(np.ceil(min(0.2 * n, 3.0 * np.sqrt(n))))
    if n < KHAT_MIN_SAMPLES:
        raise WeightError(
            f"k-hat needs at least {KHAT_MIN_SAMPLES} samples (a Pareto tail of 5 weights), got {n}"
        )
    lw = np.sort(lw - np.max(lw))
    tail = np.exp(lw[-m:])
    cut = np.exp(lw[-m - 1])
    exceed = tail - cut
    if not np.any(exceed > 0) or np.ptp(exceed) <= 1e-12 * max(tail[-1], 1e-300):
        return float("-inf")
    exceed = exceed[exceed > 0]
    if exceed.shape[0] < 5:  # the other tail weights equal the cut or vanish next to these
        return float("inf")
    return _gpd_fit(exceed)


def khat_verdict(khat: float, n: int | None = None) -> str:
    """A plain-language reading of `pareto_khat` (thresholds of Vehtari et al. 2024).

    The "reliable" threshold is ``min(1 - 1/log10(n), 0.7)`` when `n` is given, else 0.7.
    """
    limit = 0.7 if n is None or n <= 10 else min(1.0 - 1.0 / np.log10(n), 0.7)
    if khat <= 0.5:
        return "good: the weights have a light tail; reweighted estimates are reliable"
    if khat <= limit:
        return (
            f"ok: k-hat {khat:.2f} <= {limit:.2f}; estimates are usable but converge slowly, "
            "check them with more samples"
        )
    return (
        f"unreliable: k-hat {khat:.2f} > {limit:.2f}; a few samples dominate the weights, "
        "reweighted results (and their error bars) cannot be trusted"
    )


def expectation(values: np.ndarray, log_w: np.ndarray | None = None) -> np.ndarray:
    """Self-normalised reweighted expectation ``sum_i w_i f_i / sum_i w_i``.

    Args:
        values: `(n, ...)` values ``f(x_i)``.
        log_w: `(n,)` log-weights, or None for equal weights.

    Returns:
        `(...)` the expectation.
    """
    values = np.asarray(values, dtype=np.float64)
    p = np.exp(normalized_log_weights(_check_log_w(log_w, values.shape[0])))
    return np.tensordot(p, values, axes=(0, 0))


def _as_cv(cv: np.ndarray) -> np.ndarray:
    cv = np.asarray(cv, dtype=np.float64)
    if cv.ndim == 1:
        cv = cv[:, None]
    if cv.ndim != 2 or cv.shape[1] not in (1, 2):
        raise WeightError(f"collective variables must have shape (n,) or (n, 2), got {cv.shape}")
    if np.isnan(cv).any():
        raise WeightError(f"{int(np.isnan(cv).any(axis=1).sum())} samples have NaN CV values")
    return cv


def _edges(cv: np.ndarray, bins: int | Sequence[int], ranges: Sequence | None) -> list[np.ndarray]:
    d = cv.shape[1]
    nb = [int(bins)] * d if np.isscalar(bins) else [int(b) for b in bins]
    if ranges is None:
        ranges = [(cv[:, k].min(), cv[:, k].max()) for k in range(d)]
    elif np.isscalar(ranges[0]):
        ranges = [ranges] * d
    return [np.linspace(float(lo), float(hi), b + 1) for (lo, hi), b in zip(ranges, nb)]


def _bin_index(cv: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Flat bin index of each sample as `np.histogramdd` bins it; -1 outside the range."""
    flat = np.zeros(cv.shape[0], dtype=np.int64)
    inside = np.ones(cv.shape[0], dtype=bool)
    for k, e in enumerate(edges):
        nb = e.shape[0] - 1
        idx = np.searchsorted(e, cv[:, k], side="right") - 1
        idx[cv[:, k] == e[-1]] = nb - 1  # the last bin is closed, as in numpy
        inside &= (idx >= 0) & (idx < nb)
        flat = flat * nb + np.clip(idx, 0, nb - 1)
    return np.where(inside, flat, -1)


def histogram(
    cv: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int | Sequence[int] = 50,
    ranges: Sequence | None = None,
    density: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reweighted histogram of one or two collective variables.

    Args:
        cv: `(n,)` or `(n, 2)` CV values.
        log_w: `(n,)` log-weights, or None for equal weights.
        bins: Bins per dimension.
        ranges: `(lo, hi)` or one pair per dimension; default the data range.
        density: Divide the probabilities by the bin areas.

    Returns:
        `(hist, edges)`: probabilities of the bins (summing to the weight inside the range; with
        equal weights exactly ``counts / n``) or densities, shape `(bins,)` or `(bins, bins)`.
    """
    cv = _as_cv(cv)
    lw = _check_log_w(log_w, cv.shape[0])
    edges = _edges(cv, bins, ranges)
    p = _bin_probabilities(_bin_index(cv, edges), lw, edges)
    shape = tuple(e.shape[0] - 1 for e in edges)
    hist = p.reshape(shape)
    if density:
        area = np.ones(shape)
        for k, e in enumerate(edges):
            area = area * np.diff(e).reshape([-1 if i == k else 1 for i in range(len(edges))])
        hist = hist / area
    return hist, edges


def _bin_probabilities(flat: np.ndarray, lw: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Normalised weight per bin; `flat` and `lw` may carry leading replicate axes."""
    n_bins = int(np.prod([e.shape[0] - 1 for e in edges]))
    log_p = lw - _logsumexp(lw)[..., None]
    w = np.where(flat >= 0, np.exp(log_p), 0.0)
    if np.all(lw == lw.reshape(-1)[0]) and flat.ndim == 1:
        # Equal weights: exact counts / n, the plain histogram.
        return np.bincount(flat[flat >= 0], minlength=n_bins) / flat.shape[0]
    lead = flat.shape[:-1]
    n_rep = int(np.prod(lead)) if lead else 1
    offset = (np.arange(n_rep) * n_bins).reshape(lead + (1,))
    idx = np.where(flat >= 0, flat + offset, 0)
    out = np.bincount(idx.reshape(-1), weights=w.reshape(-1), minlength=n_bins * n_rep)
    return out.reshape(lead + (n_bins,))


def bootstrap_indices(
    n: int,
    n_bootstrap: int,
    rng: np.random.Generator,
    block_length: int = 1,
    chunk: int = 64,
) -> Iterator[np.ndarray]:
    """Resampled sample indices, `(replicates, n)` int arrays in chunks of `chunk` replicates.

    ``block_length = 1`` is the ordinary (iid) bootstrap; a longer block length resamples
    overlapping blocks of consecutive samples (moving-block bootstrap), which keeps the time
    correlation of an MD trajectory and gives honest error bars when blocks are longer than the
    correlation time.
    """
    if block_length < 1 or block_length > n:
        raise WeightError(f"block_length must be in [1, {n}], got {block_length}")
    n_blocks = -(-n // block_length)
    done = 0
    while done < n_bootstrap:
        r = min(chunk, n_bootstrap - done)
        starts = rng.integers(0, n - block_length + 1, size=(r, n_blocks))
        idx = (starts[:, :, None] + np.arange(block_length)).reshape(r, -1)[:, :n]
        done += r
        yield idx


@dataclass
class FreeEnergySurface:
    """A free-energy surface ``F = -kT ln p`` on a grid, shifted so that its minimum is 0.

    Attributes:
        free_energy: `(bins,)` or `(bins, bins)`; inf in empty bins. Units of `kT` (kJ/mol when
            a kT in kJ/mol was given, else dimensionless).
        error: Bootstrap standard error of `free_energy` (same shape; nan where undefined).
        probability: Bin probabilities of the full sample.
        edges: Bin edges per dimension.
        kT: The energy unit.
    """

    free_energy: np.ndarray
    error: np.ndarray
    probability: np.ndarray
    edges: list[np.ndarray]
    kT: float

    @property
    def centers(self) -> list[np.ndarray]:
        """Bin centres per dimension."""
        return [0.5 * (e[1:] + e[:-1]) for e in self.edges]


def _free_energy(p: np.ndarray, kT: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -kT * np.log(p)
    finite = np.isfinite(f)
    if finite.any():
        f = f - np.min(f[finite], axis=None)
    return f


def free_energy_surface(
    cv: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int | Sequence[int] = 50,
    ranges: Sequence | None = None,
    kT: float = 1.0,
    n_bootstrap: int = 100,
    block_length: int = 1,
    seed: int = 0,
) -> FreeEnergySurface:
    """Reweighted free-energy surface along one or two CVs with bootstrap error bars.

    Args:
        cv: `(n,)` or `(n, 2)` CV values (e.g. phi/psi in radians).
        log_w: `(n,)` log-weights or None (equal weights).
        bins, ranges: As in `histogram`.
        kT: Energy unit (kJ/mol, or 1 for kT units).
        n_bootstrap: Bootstrap replicates (0: no errors).
        block_length: Samples per bootstrap block (1 for independent samples).
        seed: Seed of the bootstrap.
    """
    cv = _as_cv(cv)
    lw = _check_log_w(log_w, cv.shape[0])
    edges = _edges(cv, bins, ranges)
    flat = _bin_index(cv, edges)
    shape = tuple(e.shape[0] - 1 for e in edges)
    p = _bin_probabilities(flat, lw, edges)
    f = _free_energy(p, kT)
    err = np.full(p.shape, np.nan)
    if n_bootstrap > 1:
        reps = []
        # Each replicate is shifted like the estimate: by the free energy of the estimate's
        # minimum bin, so errors are relative to that reference bin.
        ref = np.argmin(np.where(np.isfinite(f), f, np.inf))
        for idx in bootstrap_indices(
            cv.shape[0], n_bootstrap, np.random.default_rng(seed), block_length
        ):
            pb = _bin_probabilities(flat[idx], lw[idx], edges)
            with np.errstate(divide="ignore", invalid="ignore"):
                fb = -kT * np.log(pb)
                reps.append(fb - fb[:, ref : ref + 1])  # nan where the reference bin is empty
        fb = np.concatenate(reps)
        ok = np.isfinite(fb)
        cnt = ok.sum(axis=0)
        mean = np.where(ok, fb, 0).sum(axis=0) / np.maximum(cnt, 1)
        var = np.where(ok, (fb - mean) ** 2, 0).sum(axis=0) / np.maximum(cnt - 1, 1)
        err = np.where(cnt > 1, np.sqrt(var), np.nan)
    return FreeEnergySurface(f.reshape(shape), err.reshape(shape), p.reshape(shape), edges, kT)


@dataclass(frozen=True)
class State:
    """A region of CV space: for every named CV a union of intervals; the state is their AND.

    Attributes:
        name: The state's name.
        intervals: CV name -> tuple of half-open intervals ``(lo, hi)`` in the CV's units.
    """

    name: str
    intervals: Mapping[str, tuple[tuple[float, float], ...]]

    def contains(self, cvs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Boolean mask `(n,)` of the samples inside the state; `cvs` maps names to `(n,)`."""
        mask = None
        for name, ivs in self.intervals.items():
            if name not in cvs:
                raise WeightError(f"state {self.name!r} uses CV {name!r}, not among {list(cvs)}")
            x = np.asarray(cvs[name])
            m = np.zeros(x.shape[0], dtype=bool)
            for lo, hi in ivs:
                m |= (x >= lo) & (x < hi)
            mask = m if mask is None else mask & m
        if mask is None:
            raise WeightError(f"state {self.name!r} has no intervals")
        return mask


def states_from_dict(spec: Mapping, scale: float = 1.0) -> list[State]:
    """States from a mapping ``{name: {cv: [[lo, hi], ...] or [lo, hi]}}`` (e.g. parsed YAML).

    Args:
        spec: The mapping; a ``states`` key holding it is unwrapped.
        scale: Factor applied to every bound (``np.pi / 180`` turns degrees into radians).
    """
    if "states" in spec:
        spec = spec["states"]
    if not isinstance(spec, Mapping) or not spec:
        raise WeightError("a states definition must map state names to CV intervals")
    states = []
    for name, cvs in spec.items():
        if not isinstance(cvs, Mapping) or not cvs:
            raise WeightError(f"state {name!r}: expected a mapping of CV name to intervals")
        ivs = {}
        for cv_name, raw in cvs.items():
            try:
                arr = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError):  # strings, ragged lists
                arr = np.full(3, np.nan)
            if arr.ndim == 1:
                arr = arr[None, :]
            if (
                arr.ndim != 2
                or arr.shape[1] != 2
                or np.isnan(arr).any()
                or np.any(arr[:, 0] >= arr[:, 1])
            ):
                raise WeightError(
                    f"state {name!r}, CV {cv_name!r}: intervals must be [lo, hi] pairs of "
                    f"numbers with lo < hi, got {raw!r}"
                )
            ivs[str(cv_name)] = tuple((float(lo) * scale, float(hi) * scale) for lo, hi in arr)
        states.append(State(str(name), ivs))
    return states


@dataclass
class StateFreeEnergies:
    """Populations and free energies of states, relative to the first state.

    Attributes:
        names: State names.
        population: `(n_states,)` reweighted probabilities; `population_error` their errors.
        free_energy: `(n_states,)` ``F_i - F_0 = -kT ln(P_i / P_0)``; `free_energy_error` errors.
        kT: Energy unit of the free energies.
    """

    names: list[str]
    population: np.ndarray
    population_error: np.ndarray
    free_energy: np.ndarray
    free_energy_error: np.ndarray
    kT: float


def state_free_energies(
    states: Sequence[State],
    cvs: Mapping[str, np.ndarray],
    log_w: np.ndarray | None = None,
    kT: float = 1.0,
    n_bootstrap: int = 200,
    block_length: int = 1,
    seed: int = 0,
) -> StateFreeEnergies:
    """State populations and free-energy differences with bootstrap standard errors.

    Args:
        states: The states (may overlap or leave gaps; each is estimated on its own). The
            first is the reference of the free energies and must hold samples; a state without
            samples gets population 0, free energy +inf and NaN errors (not visited).
        cvs: CV name -> `(n,)` values, in the units the states use.
        log_w: `(n,)` log-weights or None.
        kT: Energy unit (kJ/mol, or 1 for kT units).
        n_bootstrap: Bootstrap replicates; block_length: samples per block (time series).
        seed: Seed of the bootstrap.
    """
    if not states:
        raise WeightError("no states given")
    masks = np.stack([s.contains(cvs) for s in states])  # (S, n)
    n = masks.shape[1]
    lw = _check_log_w(log_w, n)

    def pops(lw_: np.ndarray, m: np.ndarray) -> np.ndarray:
        # lw_: (..., n), m: (S, ..., n) -> (..., S)
        lp = lw_ - _logsumexp(lw_)[..., None]
        return np.moveaxis(np.sum(np.where(m, np.exp(lp), 0.0), axis=-1), 0, -1)

    p = pops(lw, masks)
    if p[0] <= 0:
        raise WeightError(
            f"no sample (with nonzero weight) falls into the reference state {states[0].name!r}"
        )
    with np.errstate(divide="ignore"):
        f = -kT * np.log(p / p[0])
    p_err = np.full_like(p, np.nan)
    f_err = np.full_like(p, np.nan)
    if n_bootstrap > 1:
        pb = np.concatenate(
            [
                pops(lw[idx], masks[:, idx])
                for idx in bootstrap_indices(
                    n, n_bootstrap, np.random.default_rng(seed), block_length
                )
            ]
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            fb = -kT * np.log(pb / pb[:, :1])
        p_err = pb.std(axis=0, ddof=1)
        ok = np.isfinite(fb)
        f_err = np.array(
            [
                fb[ok[:, k], k].std(ddof=1) if ok[:, k].sum() > 1 else np.nan
                for k in range(len(states))
            ]
        )
        f_err[0] = 0.0
    return StateFreeEnergies([s.name for s in states], p, p_err, f, f_err, kT)


def reweight_to(log_w: np.ndarray | None, delta_u: np.ndarray) -> np.ndarray:
    """Log-weights for another thermodynamic state: ``log w_B = log w_A - (u_B - u_A)``.

    Args:
        log_w: `(n,)` log-weights towards state A (None: samples are from A).
        delta_u: `(n,)` reduced energy differences ``u_B(x) - u_A(x)``, e.g.
            ``U (1/kT_B - 1/kT_A)`` for another temperature or ``(U_B - U_A) / kT`` for another
            force field.
    """
    du = np.asarray(delta_u, dtype=np.float64)
    lw = _check_log_w(log_w, du.shape[0])
    if du.ndim != 1 or np.isnan(du).any():
        raise WeightError("delta_u must be a finite (n,) array")
    return lw - du


def free_energy_difference(
    log_w: np.ndarray | None,
    delta_u: np.ndarray,
    n_bootstrap: int = 200,
    block_length: int = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """Reduced free-energy difference ``f_B - f_A = -ln <exp(-(u_B - u_A))>_A`` (Zwanzig).

    The average over A is the reweighted one, so samples from any proposal serve.

    Returns:
        `(delta_f, standard_error)` in units of kT (multiply by kT for kJ/mol at equal T).
    """
    lw_b = reweight_to(log_w, delta_u)
    lw_a = lw_b + np.asarray(delta_u, dtype=np.float64)
    value = float(-(_logsumexp(lw_b) - _logsumexp(lw_a)))
    if not np.isfinite(value):
        raise WeightError("the free-energy difference is not finite: no overlap of the states")
    se = float("nan")
    if n_bootstrap > 1:
        n = lw_a.shape[0]
        vals = np.concatenate(
            [
                -(_logsumexp(lw_b[idx]) - _logsumexp(lw_a[idx]))
                for idx in bootstrap_indices(
                    n, n_bootstrap, np.random.default_rng(seed), block_length
                )
            ]
        )
        se = float(np.std(vals[np.isfinite(vals)], ddof=1))
    return value, se
