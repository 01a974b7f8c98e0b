"""Analysis of (reweighted) samples against a reference: dihedrals, Ramachandran, KL divergences.

All functions take numpy arrays (positions in nm, angles in radians, energies in kJ/mol) and
optional log-weights (see `boltzgen.analysis.reweighting`); ``log_w=None`` means equal weights.

KL divergences are between binned distributions: ``KL(ref || sample) = sum_b r_b ln(r_b / s_b)``
(the direction used for Ramachandran plots in the Boltzmann-generator literature, e.g. Midgley et
al. 2023), with sample bins floored at ``eps`` so that a bin the sample misses costs
``r_b ln(r_b / eps)`` instead of infinity.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.analysis.reweighting import WeightError, _check_log_w, histogram
from boltzgen.errors import BoltzgenError, SampleError, SamplesFileError
from boltzgen.units import MOLAR_GAS_CONSTANT

__all__ = [
    "SampleError",
    "SampleSet",
    "SamplesFileError",
    "dihedral",
    "energy_histogram",
    "kl_divergence",
    "load_samples",
    "marginal_kls",
    "phi_psi",
    "ramachandran",
    "ramachandran_kl",
    "samples_from_arrays",
    "torsion_quadruples",
    "torsions",
]

_PERIOD = (-np.pi, np.pi)

#: Samples-file keys that hold backbone torsions (radians, one per sample): ``phi``, ``psi``,
#: ``phi_<n>``, ``psi_<n>``.
BACKBONE_KEY = re.compile(r"^(phi|psi)(_-?\d+)?$")


def _positions(positions: np.ndarray) -> np.ndarray:
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != 3:
        raise SampleError(f"positions must have shape (n, n_atoms, 3), got {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=(1, 2)).sum())
        raise SampleError(f"{bad} of {x.shape[0]} configurations contain NaN or inf positions")
    return x


def dihedral(positions: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Dihedral angle of atoms ``(i, j, k, l)`` in every frame, radians in [-pi, pi).

    IUPAC sign convention (as mdtraj and OpenMM), computed by
    `boltzgen.coordinates.geometry.dihedrals`.

    Args:
        positions: `(n, n_atoms, 3)` nm.
        indices: Four atom indices.

    Returns:
        `(n,)` radians.
    """
    import torch

    from boltzgen.coordinates.geometry import dihedrals

    x = torch.as_tensor(_positions(positions), dtype=torch.float64)
    return dihedrals(x, [list(indices)])[:, 0].numpy()


def phi_psi(positions: np.ndarray, molecule: Any) -> np.ndarray:
    """Backbone phi and psi (radians) of the first residue that has both, `(n, 2)`.

    The atoms come from the topology (`boltzgen.coordinates.backbone_torsions`: atom names
    N, CA, C and the peptide bonds), so any peptide works; for alanine dipeptide phi is
    C(ACE)-N-CA-C and psi N-CA-C-N(NME).

    Args:
        positions: `(n, n_atoms, 3)` nm.
        molecule: A topology (OpenMM or mdtraj), a `MolecularSystem`, or a system name.

    Raises:
        ZMatrixError: no residue with both torsions.
    """
    from boltzgen.coordinates import phi_psi_atoms

    if isinstance(molecule, str):
        molecule = _system_topology(molecule)
    return torsions(positions, phi_psi_atoms(getattr(molecule, "topology", molecule)))


def torsions(positions: np.ndarray, quads: Sequence[Sequence[int]]) -> np.ndarray:
    """`dihedral` of each atom quadruple, stacked: positions `(n, n_atoms, 3)` nm ->
    `(n, len(quads))` radians."""
    return np.stack([dihedral(positions, q) for q in quads], axis=1)


@functools.lru_cache(maxsize=16)
def _system_topology(name: str) -> Any:
    """The `mdtraj.Topology` of a shipped or user system, by name (cached).

    Raises:
        BoltzgenError: unknown system, or one that cannot be loaded.
    """
    from boltzgen import systems

    return systems.load(name, solvent="vacuum").mdtraj_topology


def _system_file(system: str | None, *parts: str) -> Path | None:
    """A file of a shipped or user system's folder, or None (unknown system, no such file)."""
    from boltzgen.systems import system_dir

    if system is None:
        return None
    try:
        path = system_dir(system).joinpath(*parts)
    except BoltzgenError:
        return None
    return path if path.is_file() else None


def ramachandran(
    phi: np.ndarray,
    psi: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int = 60,
) -> np.ndarray:
    """Reweighted Ramachandran histogram: bin probabilities on ``[-pi, pi)^2``, `(bins, bins)`.

    Axis 0 is phi, axis 1 psi; the probabilities sum to one.
    """
    cv = np.stack([np.asarray(phi, np.float64), np.asarray(psi, np.float64)], axis=1)
    hist, _ = histogram(cv, log_w, bins=bins, ranges=[_PERIOD, _PERIOD])
    return hist


def kl_divergence(reference: np.ndarray, sample: np.ndarray, eps: float = 1e-10) -> float:
    """``KL(reference || sample)`` in nats between two histograms of the same shape.

    Both are normalised first; sample bins below `eps` are raised to `eps` (not renormalised,
    so identical histograms give exactly 0).
    """
    r = np.asarray(reference, np.float64).ravel()
    s = np.asarray(sample, np.float64).ravel()
    if r.shape != s.shape:
        raise SampleError(f"histograms differ in shape: {reference.shape} vs {sample.shape}")
    if r.sum() <= 0 or s.sum() <= 0:
        raise SampleError("an empty histogram has no KL divergence")
    r = r / r.sum()
    s = np.maximum(s / s.sum(), eps)
    nz = r > 0
    return float(max(np.sum(r[nz] * np.log(r[nz] / s[nz])), 0.0))


def ramachandran_kl(
    sample_phi_psi: np.ndarray,
    reference_phi_psi: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int = 60,
    eps: float = 1e-10,
    reference_log_w: np.ndarray | None = None,
) -> float:
    """``KL(reference || reweighted sample)`` of Ramachandran histograms, nats.

    Args:
        sample_phi_psi: `(n, 2)` radians; reference_phi_psi: `(m, 2)` radians.
        log_w: `(n,)` log-weights of the sample or None.
        bins: Bins per angle; eps: regularisation of empty sample bins.
        reference_log_w: `(m,)` log-weights of the reference (biased MD) or None.
    """
    s = np.asarray(sample_phi_psi)
    r = np.asarray(reference_phi_psi)
    hs = ramachandran(s[:, 0], s[:, 1], log_w, bins)
    hr = ramachandran(r[:, 0], r[:, 1], reference_log_w, bins)
    return kl_divergence(hr, hs, eps)


def marginal_kls(
    sample: np.ndarray,
    reference: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int = 50,
    periodic: np.ndarray | Sequence[bool] | None = None,
    eps: float = 1e-10,
    reference_log_w: np.ndarray | None = None,
) -> np.ndarray:
    """Per-coordinate ``KL(reference || sample)`` of 1-D marginals, `(D,)` nats.

    Args:
        sample: `(n, D)` coordinates; reference: `(m, D)`.
        log_w: `(n,)` log-weights of the sample or None.
        bins: Bins per coordinate; the range is the reference's (periodic ones: [-pi, pi)).
        periodic: `(D,)` flags of angular coordinates.
        eps: Regularisation of empty sample bins.
        reference_log_w: `(m,)` log-weights of the reference or None.
    """
    s = np.asarray(sample, np.float64)
    r = np.asarray(reference, np.float64)
    if s.ndim != 2 or r.ndim != 2 or s.shape[1] != r.shape[1]:
        raise SampleError(f"need (n, D) and (m, D) arrays, got {s.shape} and {r.shape}")
    lw = _check_log_w(log_w, s.shape[0])
    lw_ref = _check_log_w(reference_log_w, r.shape[0])
    per = np.zeros(s.shape[1], bool) if periodic is None else np.asarray(periodic, bool)
    out = np.empty(s.shape[1])
    for d in range(s.shape[1]):
        lo, hi = _PERIOD if per[d] else (r[:, d].min(), r[:, d].max())
        if hi <= lo:
            hi = lo + 1e-9
        hs, _ = histogram(s[:, d], lw, bins=bins, ranges=(lo, hi))
        hr, _ = histogram(r[:, d], lw_ref, bins=bins, ranges=(lo, hi))
        out[d] = kl_divergence(hr, hs, eps) if hs.sum() > 0 else np.inf
    return out


def torsion_quadruples(bonds: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """All proper torsions ``(i, j, k, l)`` of a bond graph, one per (j, k) bond and end atoms.

    Args:
        bonds: Pairs of bonded atom indices.

    Returns:
        Sorted list of quadruples with ``i < l`` canonical orientation dropped duplicates.
    """
    nbrs: dict[int, set[int]] = {}
    for a, b in bonds:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    quads = set()
    for j, k in bonds:
        for i in nbrs[j] - {k}:
            for m in nbrs[k] - {j, i}:
                q = (i, j, k, m)
                quads.add(min(q, q[::-1]))
    return sorted(quads)


def energy_histogram(
    energies: np.ndarray,
    log_w: np.ndarray | None = None,
    bins: int = 60,
    ranges: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reweighted probability density of potential energies.

    Args:
        energies: `(n,)` kJ/mol; non-finite energies are an error.
        log_w: `(n,)` log-weights or None.
        bins: Number of bins; ranges: `(lo, hi)` kJ/mol, default the data range.

    Returns:
        `(density, edges)`: density in 1/(kJ/mol), shape `(bins,)`, and `(bins + 1,)` edges.
    """
    e = np.asarray(energies, np.float64)
    if e.ndim != 1 or not np.isfinite(e).all():
        raise SampleError("energies must be a finite (n,) array")
    hist, edges = histogram(e, log_w, bins=bins, ranges=ranges, density=True)
    return hist, edges[0]


@dataclass
class SampleSet:
    """The contents of a samples ``.npz`` file, validated.

    Attributes:
        path: The file.
        n: Number of samples.
        system: System name.
        temperature: K.
        log_w: `(n,)` unnormalised log-weights, or None (equal weights, e.g. MD).
        energies: `(n,)` kJ/mol or None.
        cvs: Collective variables, name -> `(n,)` radians: the molecule's backbone torsions
            (``phi``/``psi``, or ``phi_<n>``/``psi_<n>`` by residue number; see
            `boltzgen.coordinates.backbone_cvs`) as stored in the file or computed from
            positions; empty for a molecule without a backbone.
        positions: `(m, n_atoms, 3)` nm or None; `position_index` `(m,)` their sample indices.
        time_series: True for MD frames (``time_ps`` present: correlated in time, so errors use
            a block bootstrap).
    """

    path: str
    n: int
    system: str
    temperature: float
    log_w: np.ndarray | None
    energies: np.ndarray | None
    cvs: dict[str, np.ndarray]
    positions: np.ndarray | None
    position_index: np.ndarray | None
    time_series: bool

    @property
    def kT(self) -> float:  # noqa: N802
        """k_B T in kJ/mol."""
        return MOLAR_GAS_CONSTANT * self.temperature

    @property
    def phi_psi(self) -> np.ndarray | None:
        """`(n, 2)` radians: the ``phi`` and ``psi`` CVs (a molecule with one of each, e.g.
        alanine dipeptide), or None."""
        if "phi" not in self.cvs or "psi" not in self.cvs:
            return None
        return np.stack([self.cvs["phi"], self.cvs["psi"]], axis=1)


def _array(data: Any, key: str, path: str, ndim: int, n: int | None) -> np.ndarray:
    a = np.asarray(data[key])
    if a.ndim != ndim or (n is not None and a.shape[0] != n):
        want = f"({n if n is not None else 'n'}{', ...' if ndim > 1 else ','})"
        raise SamplesFileError(f"{path}: {key!r} has shape {a.shape}, expected {want}")
    return a


def _backbone_cvs(positions: np.ndarray, system: str) -> dict[str, np.ndarray]:
    """The backbone CVs of a shipped or user system by name; empty for unknown systems."""
    from boltzgen.coordinates import backbone_cvs

    try:
        top = _system_topology(system)
    except BoltzgenError:  # unknown system
        return {}
    if positions.shape[1] != top.n_atoms:
        raise SamplesFileError(
            f"positions have {positions.shape[1]} atoms, system {system!r} has {top.n_atoms}"
        )
    quads = backbone_cvs(top)
    if not quads:
        return {}
    values = torsions(positions, list(quads.values()))
    return {name: values[:, k] for k, name in enumerate(quads)}


def _residue_order(key: str) -> tuple[int, str]:
    """Sort key of backbone CV names: by residue number, phi before psi."""
    kind, _, number = key.partition("_")
    return (int(number) if number else -(10**9), kind)


def load_samples(path: str | Path) -> SampleSet:
    """Read and validate a samples file (``boltzgen sample`` or ``boltzgen md`` output).

    Keys: ``positions`` `(n, n_atoms, 3)` nm, ``log_weights`` `(n,)` (or ``log_q`` and
    ``energies``, giving ``-U/kT - log_q``; absent: equal weights), ``energies`` kJ/mol,
    ``temperature`` K, ``system``; optional backbone torsions (``phi``, ``psi``, ``phi_<n>``,
    ``psi_<n>``) in radians for every sample, and ``frame_index`` when ``positions`` holds only
    a subsample of the frames. Backbone torsions not stored are computed from the positions
    when every sample has them and the system is known.

    Raises:
        SamplesFileError: unreadable file, inconsistent shapes, NaN positions or weights, all
            weights zero.
    """
    path = str(path)
    try:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"  # an .npz is a zip archive
    except OSError as exc:
        raise SamplesFileError(f"cannot read samples file {path}: {exc}") from exc
    if not is_zip:
        raise SamplesFileError(f"{path} is not an .npz samples file (boltzgen sample / md output)")
    try:
        data = np.load(path, allow_pickle=False)  # an NpzFile: a mapping read on access
    except Exception as exc:
        raise SamplesFileError(f"cannot read samples file {path}: {exc}") from exc
    return samples_from_arrays(data, path)


def samples_from_arrays(arrays: Mapping[str, Any], source: str = "<arrays>") -> SampleSet:
    """A `SampleSet` of samples-file arrays in memory, validated as `load_samples` validates a
    file; e.g. ``samples_from_arrays(generated.arrays())`` analyses the samples of
    `boltzgen.models.draw` or `boltzgen.pipeline.draw_samples` without writing them.

    Args:
        arrays: The keys of a samples file (see `load_samples`), numpy arrays or scalars.
        source: What `SampleSet.path` and error messages call them.

    Raises:
        SamplesFileError: inconsistent shapes, NaN positions or weights, all weights zero.
    """
    path, data, keys = str(source), arrays, set(arrays.keys())
    n = n_key = None
    stored = sorted((k for k in keys if BACKBONE_KEY.match(k)), key=_residue_order)
    for key in ("log_weights", *stored, "energies", "log_q"):
        if key in keys:
            n = int(np.asarray(data[key]).shape[0]) if np.asarray(data[key]).ndim else None
            n_key = key
            break
    pos = idx = None
    if "positions" in keys:
        pos = np.asarray(data["positions"], dtype=np.float64)
        if pos.ndim != 3 or pos.shape[-1] != 3:
            raise SamplesFileError(
                f"{path}: 'positions' has shape {pos.shape}, expected (n, n_atoms, 3)"
            )
        if not np.isfinite(pos).all():
            bad = int((~np.isfinite(pos)).any(axis=(1, 2)).sum())
            raise SamplesFileError(f"{path}: {bad} configurations have NaN/inf positions")
        if "frame_index" in keys:
            idx = _array(data, "frame_index", path, 1, pos.shape[0]).astype(np.int64)
        else:
            idx = np.arange(pos.shape[0])
            n = pos.shape[0] if n is None else n
            if n != pos.shape[0]:
                raise SamplesFileError(
                    f"{path}: 'positions' has {pos.shape[0]} frames but {n_key!r} has {n} entries"
                )
    if n is None or n == 0:
        raise SamplesFileError(f"{path}: no samples (need positions, phi/psi or log_weights)")
    if idx is not None and (idx.min() < 0 or idx.max() >= n):
        raise SamplesFileError(f"{path}: frame_index outside [0, {n})")
    system = str(data["system"]) if "system" in keys else "unknown"
    temperature = float(data["temperature"]) if "temperature" in keys else 300.0
    energies = (
        _array(data, "energies", path, 1, n).astype(np.float64) if "energies" in keys else None
    )
    log_w = None
    try:
        if "log_weights" in keys:
            log_w = _check_log_w(_array(data, "log_weights", path, 1, n), n)
        elif "log_q" in keys:
            if energies is None:
                raise SamplesFileError(f"{path}: 'log_q' without 'energies' gives no weights")
            log_q = _array(data, "log_q", path, 1, n).astype(np.float64)
            log_w = _check_log_w(-energies / (MOLAR_GAS_CONSTANT * temperature) - log_q, n)
    except WeightError as exc:
        raise SamplesFileError(f"{path}: {exc}") from exc
    cvs = _backbone_cvs(pos, system) if pos is not None and idx.shape[0] == n else {}
    for k in stored:
        cvs[k] = _array(data, k, path, 1, n).astype(np.float64)
    for k, v in cvs.items():
        if not np.isfinite(v).all():
            raise SamplesFileError(f"{path}: CV {k!r} contains NaN or inf")
    return SampleSet(
        path,
        n,
        system,
        temperature,
        log_w,
        energies,
        cvs,
        pos,
        idx,
        time_series="time_ps" in keys,
    )
