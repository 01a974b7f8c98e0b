"""Exact bijections between Cartesian coordinates and (normalised) internal coordinates.

`InternalCoordinates` maps a flat vector of ``3 * n_atoms - 6`` internal coordinates to Cartesian
positions ``(batch, n_atoms, 3)`` (nm) -- the *forward*, sampling direction -- and back, each
direction with its log|det J|. `MixedCoordinates` keeps the Cartesian coordinates of a chosen
atom set (PCA-whitened) and uses internal coordinates for the rest.

**Rigid-body motion.** The six rigid-body degrees of freedom are removed exactly: the forward
map puts the Z-matrix seed (or the first three Cartesian atoms) in a fixed frame -- first atom
at the origin, second on the +x axis, third in the xy plane with y > 0 -- and the inverse map
reads only rotation- and translation-invariant quantities. ``to_cartesian(to_internal(x))``
therefore equals ``canonical(x)``, ``x`` moved rigidly into that frame. The log-dets are those of
the square ``(3N-6) x (3N-6)`` *reduced* map onto the Cartesian components left free in that
frame (x of the second atom, x and y of the third, all of the others).

**Layout** of `InternalCoordinates`' flat vector: ``[bonds (N-1) | angles (N-2) | torsions
(N-3)]`` in Z-matrix row order; `MixedCoordinates`: ``[whitened Cartesian (3M-6) | bonds |
angles | torsions]`` of the ``N - M`` other atoms. Index tensors `bond_indices`,
`angle_indices`, `dihedral_indices`, `circular_indices` (and `cartesian_indices`) name them.

**Normalisation and domains.** Bonds and angles are standardised, ``(q - q0) / s``, and
*unbounded*: the flow's density is negligible near the physical limits (r = 0, angle 0 or pi),
where the map stops being one-to-one. Circular torsions (rotatable bonds, see
`boltzgen.coordinates.zmatrix`) stay angles in [-pi, pi) (*circular*, neither shifted nor
scaled, so the ``phi`` coordinate of alanine dipeptide is phi itself). The other torsions are
shifted by their reference value, wrapped to [-pi, pi) and scaled (*unbounded*). The shift
``q0`` is the value in ``reference_positions`` (e.g. a minimum-energy structure) or else the data
mean; the scale ``s`` is the data standard deviation or else the fixed `DEFAULT_SCALES`.
Normalisation enters the log-det.

Example::

    aldp = boltzgen.systems.load("aldp")
    ic = InternalCoordinates.from_topology(aldp.topology, aldp.positions, data=frames)
    z, log_det = ic.inverse_and_log_det(frames)      # (B, 60), (B,)
    x, log_det = ic.forward_and_log_det(z)           # (B, 22, 3) nm in the seed frame
    phi = z[:, ic.index_of("phi")]                    # circular torsions are plain angles
    keep = is_l_form(x, aldp.topology)                # drop mirrored (D) samples
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzgen import native
from boltzgen.coordinates import geometry
from boltzgen.coordinates.zmatrix import ZMatrix
from boltzgen.errors import ZMatrixError
from boltzgen.flows.base import Circular, Domain, Transform, Unbounded

__all__ = ["DEFAULT_SCALES", "InternalCoordinates", "MixedCoordinates"]

#: Scales (bond nm, angle rad, non-circular torsion rad) used when no data is given.
DEFAULT_SCALES = {"bond": 0.005, "angle": 0.05, "torsion": 0.1}


def _as_tensor(x: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class _ZMatrixTransform(Transform):
    """Shared machinery: rows with three references, placed level by level; normalisation.

    Internally positions are component-major ``(3, n_atoms, batch)`` and coordinates
    ``(dim, batch)`` (see `geometry.component_major`): every gather copies whole rows.
    """

    def __init__(self, zmatrix: ZMatrix, first_full_row: int) -> None:
        super().__init__()
        self.zmatrix = zmatrix
        self.n_atoms = zmatrix.n_atoms
        self.dim = 3 * self.n_atoms - 6
        full = zmatrix.rows[first_full_row:]
        self._full = full
        level = np.zeros(self.n_atoms, dtype=np.int64)
        row_level = np.zeros(len(full), dtype=np.int64)
        for k, (d, c, b, a) in enumerate(full):
            row_level[k] = level[d] = 1 + max(level[c], level[b], level[a])
        n_levels = int(row_level.max()) if len(full) else 0
        self._levels = [np.flatnonzero(row_level == v) for v in range(1, n_levels + 1)]
        self._level_cache: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self._native_cache: dict[torch.dtype, tuple] = {}  # see _native_args
        self.register_buffer("_rows", torch.as_tensor(full, dtype=torch.long), persistent=False)

    # -- helpers -------------------------------------------------------------------------------
    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(
                f"expected Cartesian positions of shape (batch, {self.n_atoms}, 3), got "
                f"{tuple(x.shape)}"
            )

    def _check_z(self, z: Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected internal coordinates (batch, {self.dim}), got {z.shape}")

    def _place_full_rows(self, xt: Tensor, bond: Tensor, angle: Tensor, torsion: Tensor) -> None:
        """Fill component-major positions ``xt`` ``(3, N, B)`` in place for the full rows.

        Rows are placed level by level: all rows whose references are placed go in one batched
        operation. bond/angle/torsion have shape ``(n_full_rows, B)``.
        """
        rs = bond * torch.sin(angle)
        local = torch.stack(
            [-bond * torch.cos(angle), rs * torch.cos(torsion), rs * torch.sin(torsion)]
        )
        for k, atoms, refs in self._level_index(xt.device):
            p = torch.index_select(xt, 1, refs).unflatten(1, (3, -1))
            loc = torch.index_select(local, 1, k)
            xt[:, atoms] = geometry.place_local(p[:, 0], p[:, 1], p[:, 2], loc)

    def _level_index(self, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level: row positions, placed atoms and references ``[a..., b..., c...]``."""
        key = str(device)
        if key not in self._level_cache:
            out = []
            for lv in self._levels:
                r = self._full[lv]
                refs = np.concatenate([r[:, 3], r[:, 2], r[:, 1]])
                out.append(tuple(torch.as_tensor(v, device=device) for v in (lv, r[:, 0], refs)))
            self._level_cache[key] = out
        return self._level_cache[key]

    def _full_internal(self, xt: Tensor) -> list[Tensor]:
        """Bonds, angles, torsions ``(n_full_rows, B)`` of the full rows from ``(3, N, B)``."""
        d, c, b, a = geometry.gather(xt, self._rows)
        b1, b2, b3 = b - a, c - b, d - c
        n1, n2 = geometry.cross(b1, b2), geometry.cross(b2, b3)
        norm_b2 = geometry.norm(b2)
        angle = torch.atan2(geometry.norm(n2), -geometry.dot(b2, b3))  # angle b-c-d
        tors = torch.atan2(norm_b2 * geometry.dot(b1, n2), geometry.dot(n1, n2))
        return [geometry.norm(b3), angle, geometry.wrap_angle(tors)]

    def _setup_normalisation(
        self,
        raw_ref: Tensor | None,
        raw_data: Tensor | None,
        kinds: list[str],
        circular: np.ndarray,
    ) -> None:
        """Shift and scale per dimension from reference values ``(D,)`` or data ``(n, D)``."""
        n = len(kinds)
        torsion = torch.tensor([k == "torsion" for k in kinds])
        circ = torch.zeros(n, dtype=torch.bool)
        circ[torsion.nonzero().flatten()] = torch.as_tensor(circular, dtype=torch.bool)
        if raw_ref is not None:
            shift = raw_ref.clone()
        elif raw_data is not None:
            shift = raw_data.mean(0)
            ang = raw_data[:, torsion]
            shift[torsion] = torch.atan2(ang.sin().mean(0), ang.cos().mean(0))
        else:
            raise ValueError("give reference_positions or data to normalise the coordinates")
        if raw_data is not None:
            dev = raw_data - shift
            dev[:, torsion] = geometry.wrap_angle(dev[:, torsion])
            scale = dev.std(0).clamp_min(1e-6)
        else:
            scale = torch.tensor([DEFAULT_SCALES.get(k, 1.0) for k in kinds], dtype=torch.float64)
        fixed = circ | torch.tensor([k == "pca" for k in kinds])  # left as they are
        shift[fixed], scale[fixed] = 0.0, 1.0
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.register_buffer("_torsion_mask", torsion[:, None], persistent=False)
        self.register_buffer("_log_scale_sum", scale.log().sum(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_log_scale_sum)
        self.domains: list[Domain] = [Circular() if c else Unbounded() for c in circ.tolist()]
        kind = np.array(kinds)
        for name, sel in (
            ("bond_indices", kind == "bond"),
            ("angle_indices", kind == "angle"),
            ("dihedral_indices", kind == "torsion"),
            ("circular_indices", circ.numpy()),
        ):
            self.register_buffer(name, torch.as_tensor(np.flatnonzero(sel)), persistent=False)

    def _normalise(self, raw_t: Tensor) -> Tensor:
        """``(D, B)`` raw coordinates -> normalised ``(B, D)``."""
        dev = raw_t - self.shift.to(raw_t.dtype)[:, None]
        dev = torch.where(self._torsion_mask, geometry.wrap_angle(dev), dev)
        return (dev / self.scale.to(raw_t.dtype)[:, None]).T.contiguous()

    def _denormalise(self, z: Tensor) -> Tensor:
        """Normalised ``(B, D)`` -> raw ``(D, B)``."""
        return (z * self.scale.to(z.dtype) + self.shift.to(z.dtype)).T.contiguous()

    #: Batches larger than this are processed in chunks of this many frames (cache-friendly).
    chunk_size: int = 8192

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Coordinates ``(batch, 3N-6)`` -> Cartesian ``(batch, N, 3)`` nm in the fixed frame.

        Returns:
            Positions and log|det| of the reduced Jacobian, shape ``(batch,)``.
        """
        self._check_z(z)
        return self._chunked(self._forward, z)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Cartesian ``(batch, N, 3)`` nm -> coordinates ``(batch, 3N-6)``; rigid motion dropped.

        Returns:
            Coordinates and log|det| of the reduced Jacobian, shape ``(batch,)``.
        """
        self._check_x(x)
        return self._chunked(self._inverse, x)

    def _chunked(self, fn: Any, inp: Tensor) -> tuple[Tensor, Tensor]:
        if inp.shape[0] <= self.chunk_size:
            return fn(inp)
        parts = [fn(c) for c in inp.split(self.chunk_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def index_of(self, name: str) -> int:
        """Position in the flat vector of a named torsion (``"phi"``, ``"psi_3"``)."""
        return int(self.dihedral_indices[self.zmatrix.dihedral_index(name)])

    def to_internal(self, x: Tensor) -> Tensor:
        """Cartesian ``(batch, n_atoms, 3)`` nm -> flat ``(batch, 3N-6)`` coordinates."""
        return self.inverse_and_log_det(x)[0]

    def to_cartesian(self, z: Tensor) -> Tensor:
        """Flat ``(batch, 3N-6)`` coordinates -> Cartesian ``(batch, n_atoms, 3)`` nm."""
        return self.forward_and_log_det(z)[0]


class InternalCoordinates(_ZMatrixTransform):
    """Bonds, angles and torsions of a Z-matrix as a bijector (forward: internal -> Cartesian).

    Args:
        zmatrix: A Z-matrix with three seed rows (no Cartesian atoms).
        reference_positions: ``(n_atoms, 3)`` nm (e.g. a minimum-energy structure): shifts.
        data: ``(n_frames, n_atoms, 3)`` nm: shifts (if no reference) and scales.
        circular: Override the Z-matrix's circular torsions: ``"all"``, ``"none"`` or one bool
            per torsion.

    Attributes:
        domains: Per output dimension `Unbounded()` or `Circular()`.
        bond_indices, angle_indices, dihedral_indices, circular_indices: flat positions.
    """

    def __init__(
        self,
        zmatrix: ZMatrix,
        reference_positions: Any = None,
        data: Any = None,
        circular: str | Sequence[bool] | None = None,
    ) -> None:
        if zmatrix.cartesian_atoms:
            raise ZMatrixError("this Z-matrix has Cartesian atoms; use MixedCoordinates")
        super().__init__(zmatrix, first_full_row=3)
        self.seed = tuple(int(i) for i in zmatrix.rows[:3, 0])
        self._seed_c2_is_z1 = int(zmatrix.rows[2, 1]) == self.seed[1]
        n = self.n_atoms
        kinds = ["bond"] * (n - 1) + ["angle"] * (n - 2) + ["torsion"] * (n - 3)
        circ = _circular_mask(circular, zmatrix)
        raw_ref = None
        if reference_positions is not None:
            raw_ref = self._raw(geometry.component_major(_positions(reference_positions)))[:, 0]
        raw_data = None
        if data is not None:
            raw_data = self._raw(geometry.component_major(_positions(data))).T
        self._setup_normalisation(raw_ref, raw_data, kinds, circ)

    @classmethod
    def from_topology(
        cls,
        topology: Any,
        reference_positions: Any = None,
        data: Any = None,
        circular: str | Sequence[bool] | None = None,
        torsions: str = "relative",
    ) -> InternalCoordinates:
        """``InternalCoordinates(ZMatrix.from_topology(topology, torsions=torsions), ...)``."""
        zmatrix = ZMatrix.from_topology(topology, torsions=torsions)
        return cls(zmatrix, reference_positions, data=data, circular=circular)

    def _raw(self, xt: Tensor) -> Tensor:
        """Raw coordinates ``(D, B)`` from component-major positions ``(3, N, B)``."""
        z0, z1, z2 = self.seed
        c2, b2 = (z1, z0) if self._seed_c2_is_z1 else (z0, z1)
        r, t, p = self._full_internal(xt)
        u, v = xt[:, z2] - xt[:, c2], xt[:, b2] - xt[:, c2]
        seed_r = torch.stack([geometry.norm(xt[:, z1] - xt[:, z0]), geometry.norm(u)])
        seed_t = geometry.angle_between(u, v)[None]
        return torch.cat([seed_r, r, seed_t, t, p])

    def _split(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.n_atoms
        return raw[: n - 1], raw[n - 1 : 2 * n - 3], raw[2 * n - 3 :]

    def _log_det_raw(self, raw: Tensor) -> Tensor:
        bond, angle, _ = self._split(raw)
        return (
            bond[1].abs().log()
            + 2 * bond[2:].abs().log().sum(0)
            + angle[1:].sin().abs().log().sum(0)
        )

    def _forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if _native_applies(z):  # the compiled kernels of boltzgen.native, where built
            return _NativeZMatrix.apply(z, self)
        return self._forward_torch(z)

    def _forward_torch(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The forward map as torch operations (the reference of the compiled kernels)."""
        raw = self._denormalise(z)
        bond, angle, torsion = self._split(raw)
        z0, z1, z2 = self.seed
        xt = z.new_zeros(3, self.n_atoms, z.shape[0])
        xt[0, z1] = bond[0]
        r2, t2 = bond[1], angle[0]
        if self._seed_c2_is_z1:
            xt[0, z2] = bond[0] - r2 * torch.cos(t2)
        else:
            xt[0, z2] = r2 * torch.cos(t2)
        xt[1, z2] = r2 * torch.sin(t2)
        self._place_full_rows(xt, bond[2:], angle[1:], torsion)
        x = xt.permute(2, 1, 0).contiguous()
        return x, self._log_det_raw(raw) + self._log_scale_sum.to(z.dtype)

    def _inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._raw(geometry.component_major(x))
        return self._normalise(raw), -self._log_det_raw(raw) - self._log_scale_sum.to(x.dtype)

    def canonical(self, x: Tensor) -> Tensor:
        """``x`` ``(batch, N, 3)`` moved rigidly into the seed frame (as the forward map gives)."""
        return geometry.canonical_frame(x, *self.seed)

    @property
    def frame_atoms(self) -> tuple[int, int, int]:
        """The three atoms that fix the frame (origin, +x axis, xy plane)."""
        return self.seed


class MixedCoordinates(_ZMatrixTransform):
    """Whitened Cartesian coordinates of chosen atoms plus internal coordinates of the rest.

    The chosen atoms (``zmatrix.cartesian_atoms``, e.g. the backbone) are moved into the frame of
    the first three of them, which drops the six rigid-body degrees of freedom exactly and
    leaves ``3M - 6`` coordinates; these are whitened by PCA fitted on ``data``
    (``w = L^-1/2 V^T (y - mean)``, log-det ``-1/2 sum log L``). The other atoms are placed by
    their Z-matrix rows, normalised as in `InternalCoordinates`.

    Args:
        zmatrix: A Z-matrix with at least three Cartesian atoms
            (``ZMatrix.from_topology(top, cartesian_atoms=...)``).
        data: ``(n_frames, n_atoms, 3)`` nm, at least ``3M - 5`` frames: PCA, shifts, scales.
        reference_positions: ``(n_atoms, 3)`` nm: shifts of the internal coordinates instead.
        circular: As in `InternalCoordinates`.
    """

    def __init__(
        self,
        zmatrix: ZMatrix,
        data: Any,
        reference_positions: Any = None,
        circular: str | Sequence[bool] | None = None,
    ) -> None:
        if not zmatrix.cartesian_atoms:
            raise ZMatrixError("MixedCoordinates needs a Z-matrix with Cartesian atoms")
        super().__init__(zmatrix, first_full_row=0)
        self.cartesian_atoms = zmatrix.cartesian_atoms
        m, n_int = len(self.cartesian_atoms), len(zmatrix.rows)
        self.n_cartesian = 3 * m - 6
        data = _positions(data)
        self._check_x(data)
        if data.shape[0] <= self.n_cartesian:
            raise ValueError(
                f"PCA of {m} Cartesian atoms needs more than {self.n_cartesian} frames, "
                f"got {data.shape[0]}"
            )
        self.register_buffer("_cart", torch.as_tensor(self.cartesian_atoms), persistent=False)
        y = self._reduced(data)
        mean = y.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((y - mean).T))
        if evals.min() <= 1e-12 * evals.max():
            raise ValueError("the Cartesian atoms' covariance is singular; give more varied data")
        self.register_buffer("pca_mean", mean)
        self.register_buffer("_whiten", evecs * evals.rsqrt())  # y -> w:  (y - mean) @ _whiten
        self.register_buffer("_colour", (evecs * evals.sqrt()).T)  # w -> y:  w @ _colour + mean
        self.register_buffer("_pca_log_det", 0.5 * evals.log().sum(), persistent=False)
        kinds = ["pca"] * self.n_cartesian + ["bond"] * n_int + ["angle"] * n_int
        kinds += ["torsion"] * n_int
        circ = _circular_mask(circular, zmatrix)
        raw_data = self._raw(data).T
        raw_ref = None
        if reference_positions is not None:
            raw_ref = self._raw(_positions(reference_positions))[:, 0]
        self._setup_normalisation(raw_ref, raw_data, kinds, circ)
        self.register_buffer("cartesian_indices", torch.arange(self.n_cartesian), persistent=False)

    @classmethod
    def from_topology(
        cls,
        topology: Any,
        cartesian_atoms: Sequence[int],
        data: Any,
        reference_positions: Any = None,
        circular: str | Sequence[bool] | None = None,
        torsions: str = "relative",
    ) -> MixedCoordinates:
        """``MixedCoordinates(ZMatrix.from_topology(topology, cartesian_atoms, ...), data)``."""
        zmatrix = ZMatrix.from_topology(topology, cartesian_atoms, torsions=torsions)
        return cls(zmatrix, data, reference_positions=reference_positions, circular=circular)

    def _reduced(self, x: Tensor) -> Tensor:
        """The ``3M - 6`` free Cartesian components ``(B, 3M-6)`` in the frame."""
        f = self.cartesian_atoms
        xc = geometry.canonical_frame(x, f[0], f[1], f[2])
        rest = xc[:, self._cart[3:]].reshape(x.shape[0], -1)
        return torch.cat([xc[:, f[1], :1], xc[:, f[2], :2], rest], dim=-1)

    def _raw(self, x: Tensor) -> Tensor:
        """Raw coordinates ``(D, B)`` from positions ``(B, N, 3)``."""
        w = (self._reduced(x) - self.pca_mean.to(x.dtype)) @ self._whiten.to(x.dtype)
        return torch.cat([w.T, *self._full_internal(geometry.component_major(x))])

    def _split(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k, n = self.n_cartesian, len(self._full)
        return raw[:k], raw[k : k + n], raw[k + n : k + 2 * n], raw[k + 2 * n :]

    def _log_det_raw(self, raw: Tensor) -> Tensor:
        _, bond, angle, _ = self._split(raw)
        return 2 * bond.abs().log().sum(0) + angle.sin().abs().log().sum(0)

    def _forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._denormalise(z)
        w, bond, angle, torsion = self._split(raw)
        y = w.T @ self._colour.to(z.dtype) + self.pca_mean.to(z.dtype)
        f = self.cartesian_atoms
        xt = z.new_zeros(3, self.n_atoms, z.shape[0])
        xt[0, f[1]] = y[:, 0]
        xt[:2, f[2]] = y[:, 1:3].T
        xt[:, self._cart[3:]] = y[:, 3:].reshape(z.shape[0], -1, 3).permute(2, 1, 0)
        self._place_full_rows(xt, bond, angle, torsion)
        x = xt.permute(2, 1, 0).contiguous()
        log_det = self._log_det_raw(raw) + self._log_scale_sum.to(z.dtype)
        return x, log_det + self._pca_log_det.to(z.dtype)

    def _inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._raw(x)
        log_det = -self._log_det_raw(raw) - self._log_scale_sum.to(x.dtype)
        return self._normalise(raw), log_det - self._pca_log_det.to(x.dtype)

    def canonical(self, x: Tensor) -> Tensor:
        """``x`` moved rigidly into the frame of the first three Cartesian atoms."""
        return geometry.canonical_frame(x, *self.cartesian_atoms[:3])

    @property
    def frame_atoms(self) -> tuple[int, int, int]:
        """The three atoms that fix the frame (origin, +x axis, xy plane)."""
        f = self.cartesian_atoms
        return (f[0], f[1], f[2])


def _refresh_log_scale_sum(module: _ZMatrixTransform, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the log-det constant follows the loaded ``scale`` (it is
    derived from it, not saved)."""
    with torch.no_grad():
        module._log_scale_sum.copy_(module.scale.log().sum())


def _native_applies(z: Tensor) -> bool:
    return (
        z.device.type == "cpu"
        and native.dtype_supported(z.dtype)
        and z.dim() == 2
        and z.shape[0] > 0
        and native.has_storage(z)
        and native.enabled("zmatrix")
    )


def _native_args(lib: ctypes.CDLL, ic: InternalCoordinates, z: Tensor, kernel: str) -> tuple:
    """The kernel and its leading arguments (the Z-matrix, seed and normalisation)."""
    dtype = z.dtype
    consts = ic._native_cache.get(dtype)
    # buffers changed in place (load_state_dict) or replaced
    version = (ic.shift.data_ptr(), ic.shift._version, ic.scale.data_ptr(), ic.scale._version)
    if consts is None or consts[0] != version:
        rows = ic._rows.detach().to("cpu", torch.int64).contiguous()
        scale = ic.scale.detach().to("cpu", dtype).contiguous()
        shift = ic.shift.detach().to("cpu", dtype).contiguous()
        consts = (version, rows, scale, shift, float(ic._log_scale_sum))
        ic._native_cache[dtype] = consts
    _, rows, scale, shift, log_scale_sum = consts
    z0, z1, z2 = ic.seed
    head = (z.shape[0], ic.n_atoms, rows.shape[0], rows.data_ptr(), z0, z1, z2,
            int(ic._seed_c2_is_z1), scale.data_ptr(), shift.data_ptr())  # fmt: skip
    fn = native.kernel(lib, f"zmat_{kernel}", dtype)
    return fn, head, log_scale_sum


def _native_forward(lib: ctypes.CDLL, ic: InternalCoordinates, z: Tensor) -> tuple:
    fn, head, log_scale_sum = _native_args(lib, ic, z, "fwd")
    x = z.new_empty(z.shape[0], ic.n_atoms, 3)
    ld = z.new_empty(z.shape[0])
    if fn(*head, log_scale_sum, z.data_ptr(), x.data_ptr(), ld.data_ptr()):
        raise RuntimeError("Z-matrix kernel refused its arguments")
    return x, ld


def _native_backward(
    lib: ctypes.CDLL, ic: InternalCoordinates, z: Tensor, g_x: Tensor | None, g_ld: Tensor | None
) -> Tensor:
    fn, head, _ = _native_args(lib, ic, z, "bwd")
    g_z = torch.empty_like(z)
    ptr = [None if g is None else g.data_ptr() for g in (g_x, g_ld)]
    if fn(*head, z.data_ptr(), *ptr, g_z.data_ptr()):
        raise RuntimeError("Z-matrix kernel refused its arguments")
    return g_z


class _NativeZMatrix(torch.autograd.Function):
    """`InternalCoordinates`' forward map through the compiled kernels (analytic backward)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, ic: InternalCoordinates) -> tuple[Tensor, Tensor]:  # noqa: D102
        ctx.ic = ic
        ctx.save_for_backward(z)  # the input itself: double backward differentiates through it
        ctx.set_materialize_grads(False)
        return _native_forward(native.library(), ic, z.contiguous())

    @staticmethod
    def backward(ctx: Any, g_x: Tensor | None, g_ld: Tensor | None) -> tuple:  # noqa: D102
        (z,) = ctx.saved_tensors
        # zero gradients (None, or torch's storage-less zero tensors) are left out
        g_x, g_ld = (None if g is None or g._is_zerotensor() else g for g in (g_x, g_ld))
        if g_x is None and g_ld is None:
            return None, None
        if torch.is_grad_enabled() or not (native.has_storage(g_x) and native.has_storage(g_ld)):
            # create_graph or vmapped gradients: differentiate the torch evaluation
            with torch.enable_grad():
                zz = z if z.requires_grad else z.detach().requires_grad_(True)
                x, ld = ctx.ic._forward_torch(zz)
                outs = [(o, g) for o, g in ((x, g_x), (ld, g_ld)) if g is not None]
                (g_z,) = torch.autograd.grad(
                    [o for o, _ in outs], zz, [g for _, g in outs],
                    create_graph=torch.is_grad_enabled(),
                )  # fmt: skip
            return g_z, None
        g_x = None if g_x is None else g_x.contiguous()
        g_ld = None if g_ld is None else g_ld.contiguous()
        return _native_backward(native.library(), ctx.ic, z.contiguous(), g_x, g_ld), None


def _native_self_check(lib: ctypes.CDLL) -> float:
    """Largest difference (positions, log-dets, gradients; float64, relative to the largest
    entry) between the compiled kernels and the torch evaluation on two small branched
    Z-matrices (third seed atom bonded to the first and to the second seed atom);
    `boltzgen.native` keeps the torch evaluation if it misses by more than 1e-9."""
    g = torch.Generator().manual_seed(0)
    compared = []
    for seed_row in ([2, 1, 0], [2, 0, 1]):
        zm = ZMatrix([[0], [1, 0], seed_row, [3, 2, 1, 0], [4, 2, 1, 3], [5, 3, 2, 1],
                      [6, 1, 2, 3]])  # fmt: skip
        ref = torch.randn(7, 3, generator=g, dtype=torch.float64) * 0.15
        ic = InternalCoordinates(zm, reference_positions=ref)
        z = torch.randn(37, ic.dim, generator=g, dtype=torch.float64)
        zz = z.clone().requires_grad_(True)
        x, ld = ic._forward_torch(zz)
        g_x = torch.randn(x.shape, generator=g, dtype=torch.float64)
        g_ld = torch.randn(ld.shape, generator=g, dtype=torch.float64)
        (g_z,) = torch.autograd.grad((x, ld), zz, (g_x, g_ld))
        n_x, n_ld = _native_forward(lib, ic, z)
        compared += [(n_x, x), (n_ld, ld), (_native_backward(lib, ic, z, g_x, g_ld), g_z)]
    return native.relative_error(compared)


def _positions(x: Any) -> Tensor:
    x = _as_tensor(x)
    return x.unsqueeze(0) if x.ndim == 2 else x


def _circular_mask(circular: str | Sequence[bool] | None, zmatrix: ZMatrix) -> np.ndarray:
    n = zmatrix.n_torsions
    if circular is None:
        return zmatrix.circular.copy()
    if isinstance(circular, str):
        if circular not in ("all", "none"):
            raise ValueError(f"circular must be 'all', 'none' or a mask, got {circular!r}")
        return np.full(n, circular == "all")
    mask = np.asarray(circular, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"circular mask needs {n} entries, got {mask.shape}")
    return mask
