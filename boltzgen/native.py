"""Compiled CPU kernels, built on first use: the spline of the flows, the terms of the energy
and the internal -> Cartesian map.

`boltzgen.flows.DomainSpline`, `boltzgen.energy.TorchEnergy` and the forward map of
`boltzgen.coordinates.InternalCoordinates` evaluate on the CPU through a small C library
(``boltzgen/kernels/kernels.c``, shipped with the package) when they can: loops over SIMD
lanes of batch rows (spline) or configurations (energy, Z-matrix) with glibc's vector math
library for log/tanh/sin/cos (the spline's exp is inlined). Measured on the 2-core AMD EPYC
(AVX-512, one thread): the forward spline of a 256 x 30 batch with per-sample parameters in
0.23 ms against 1.9 ms for the torch evaluation (float32); see the README for the training
step and the energy. The library is built with the system C compiler (``$CC``, else ``cc``)
for this CPU (``-march=native``, or ``$BOLTZGEN_NATIVE_MARCH``) into a per-user cache
(``$BOLTZGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/boltzgen``, else ``~/.cache/boltzgen``),
keyed by the source, the flags, the compiler and the CPU's feature flags, so later processes
load it at once. Each kernel family is checked against its torch evaluation (float64) when
the library is loaded. Where there is no compiler, no libmvec with these functions
(glibc < 2.35, macOS, Windows) or a check fails, boltzgen says so once in its log and keeps
the torch evaluation: results are the same either way, to float rounding.
``BOLTZGEN_NATIVE=0`` switches the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "available",
    "cache_dir",
    "disabled",
    "dtype_supported",
    "enabled",
    "has_storage",
    "kernel",
    "library",
    "relative_error",
    "status",
]

log = logging.getLogger(__name__)

_SOURCES = ("kernels.c", "lanes.h", "rqs.h", "pairs.h", "bonded.h", "zmatrix.h")
# -fno-builtin-{sin,cos}[f]: as builtins, gcc fuses a sin and a cos of one argument into a
# scalar sincos (cexpi) before vectorising, which left the Z-matrix loops scalar; kernels.c
# declares them const with SIMD clones instead (libmvec)
_FLAGS = (
    "-O3",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-builtin-sin",
    "-fno-builtin-sinf",
    "-fno-builtin-cos",
    "-fno-builtin-cosf",
    "-shared",
    "-fPIC",
)
_LIBS = ("-lmvec", "-lm")
_ABI = 5
MAX_BINS = 32  # MAXK of kernels.c

_lock = threading.RLock()
_state: dict = {}


def cache_dir() -> Path:
    """Folder of the built kernels (see the module docstring)."""
    if os.environ.get("BOLTZGEN_CACHE_DIR"):
        root = Path(os.environ["BOLTZGEN_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "boltzgen"
    else:
        root = Path.home() / ".cache" / "boltzgen"
    return root / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def _flags() -> tuple[str, ...]:
    # BOLTZGEN_NATIVE_MARCH: the target CPU (gcc's -march), e.g. x86-64-v3 for AVX2 machines of
    # a cluster built from a newer login node; this CPU by default
    return (f"-march={os.environ.get('BOLTZGEN_NATIVE_MARCH', 'native')}", *_FLAGS)


def _build(cc: str) -> Path:
    here = Path(__file__).parent / "kernels"
    sources = b"".join((here / name).read_bytes() for name in _SOURCES)
    key = hashlib.sha256(
        b"\0".join(
            [
                sources,
                " ".join(_flags() + _LIBS).encode(),
                _compiler_version(cc).encode(),
                _cpu_flags().encode(),
                platform.machine().encode(),
            ]
        )  # fmt: skip
    ).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home (some clusters): this user's folder in the temp dir
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        target = Path(tempfile.gettempdir()) / f"boltzgen-{uid}" / "kernels" / target.name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target, then rename: processes started together (recipes train
    # components in parallel) never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *_flags(), "-o", tmp, str(here / "kernels.c"), *_LIBS]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        head = [i64, i64, i64, i64, i32, i32, p, p, p, p, p, real, real, real, real, real, real]
        fwd = getattr(lib, f"rqs_fwd_{suffix}")
        fwd.argtypes, fwd.restype = [*head, i32, p, p], i32
        bwd = getattr(lib, f"rqs_bwd_{suffix}")
        bwd.argtypes, bwd.restype = [*head, p, p, p, p], i32
        pairs = getattr(lib, f"pairs_eval_{suffix}")
        pairs.argtypes = [i64, i64, *[p] * 13, real, real, real, real, i32, i32, p, p, p]
        pairs.restype = i32
        bonded = getattr(lib, f"bonded_eval_{suffix}")
        bonded.argtypes = [i64, i64, p, i32, i64, p, i64, p, p, p, p, p, p]
        bonded.restype = i32
        zhead = [i64, i64, i64, p, i64, i64, i64, i32, p, p]
        zfwd = getattr(lib, f"zmat_fwd_{suffix}")
        zfwd.argtypes, zfwd.restype = [*zhead, real, p, p, p], i32
        zbwd = getattr(lib, f"zmat_bwd_{suffix}")
        zbwd.argtypes, zbwd.restype = [*zhead, p, p, p, p], i32


_SUFFIXES = {"torch.float32": "f32", "torch.float64": "f64"}  # the kernels' two variants


def dtype_supported(dtype: object) -> bool:
    """Whether the kernels have a variant for this torch dtype (float32, float64)."""
    return str(dtype) in _SUFFIXES


def kernel(lib: ctypes.CDLL, name: str, dtype: object) -> Any:
    """Kernel ``name``'s variant for a torch dtype (`dtype_supported`), e.g. ``rqs_fwd_f32``."""
    return getattr(lib, f"{name}_{_SUFFIXES[str(dtype)]}")


def has_storage(t: object) -> bool:
    """False for tensors without memory of their own (the wrappers of vmap and of vectorised
    jacobians), which only the torch evaluations can take; True for None (no gradient)."""
    if t is None:
        return True
    try:
        t.data_ptr()  # type: ignore[attr-defined]
    except RuntimeError:
        return False
    return True


def relative_error(pairs: list) -> float:
    """Largest ``|got - want|`` over ``(got, want)`` tensor pairs, each relative to the largest
    entry of ``want`` (floored at 1): the measure of the self-checks."""
    worst = 0.0
    for got, want in pairs:
        want = want.detach()
        scale = max(float(want.abs().max()), 1.0)
        worst = max(worst, float((got - want).abs().max()) / scale)
    return worst


def _checks() -> dict:
    """Self-check of each kernel family: a function of the library returning its largest
    relative difference from the torch evaluation (float64)."""
    from boltzgen.coordinates.internal import _native_self_check as zmatrix_check
    from boltzgen.energy.torch_energy import _native_pairs_self_check
    from boltzgen.flows.splines import _native_self_check

    return {"spline": _native_self_check, "energy": _native_pairs_self_check,
            "zmatrix": zmatrix_check}  # fmt: skip


def _load() -> ctypes.CDLL | None:
    if os.environ.get("BOLTZGEN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = "switched off by BOLTZGEN_NATIVE"
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"not built on {platform.system()} {platform.machine()}"
        return None
    cc = os.environ.get("CC", "cc")
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
        if lib.boltzgen_kernels_abi() != _ABI:
            raise RuntimeError("stale kernel library")
        _declare(lib)
        _state["path"] = str(path)
    except Exception as exc:  # noqa: BLE001 (any failure means: keep the torch path)
        _state["reason"] = f"{type(exc).__name__}: {exc}"
        log.info("compiled kernels unavailable (%s); using the torch evaluation",
                 _state["reason"])  # fmt: skip
        return None
    import torch

    failed = []
    with torch.inference_mode(False), torch.enable_grad():  # first use may be under no_grad
        for name, check in _checks().items():
            try:
                err = check(lib)
            except Exception as exc:  # noqa: BLE001
                err = f"{type(exc).__name__}: {exc}"
            if isinstance(err, str) or not err < 1e-9:
                failed.append(f"{name} ({err if isinstance(err, str) else f'{err:.3g}'})")
            else:
                _state.setdefault("enabled", set()).add(name)
    if failed:
        _state["failed"] = "self-check against the torch evaluation failed: " + ", ".join(failed)
        log.info("compiled kernels: %s; those use the torch evaluation", _state["failed"])
    if not _state.get("enabled"):
        _state["reason"] = _state["failed"]
        return None
    _state["reason"] = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on the first call; None where unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def enabled(family: str) -> bool:
    """Whether the compiled kernels of ``family`` (``"spline"``, ``"energy"``, ``"zmatrix"``)
    are in use."""
    if _state.get("off"):
        return False
    return library() is not None and family in _state.get("enabled", ())


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block every caller uses its torch evaluation, as on a machine without a
    compiler (the benchmarks' side-by-side baseline)."""
    _state["off"] = _state.get("off", 0) + 1
    try:
        yield
    finally:
        _state["off"] -= 1


def available() -> bool:
    """Whether compiled kernels are in use (the library built and a self-check passed)."""
    return library() is not None


def status() -> str:
    """One line for logs: where the kernels come from, or why they are not used."""
    if library() is None:
        return f"torch evaluation ({_state.get('reason')})"
    line = f"compiled kernels ({_state['path']})"
    if _state.get("failed"):
        line += f"; {_state['failed']}"
    return line
