"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one.

Each writer writes a temporary file in the target's folder, flushes and fsyncs it, then renames
it over the target (`os.replace`, atomic on POSIX and Windows). `atomic_path` does the same for
writers that take a file name (mdtraj's trajectory formats). `read_yaml` reads the YAML inputs
(run configs, system configs, states files) with one-line errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "read_yaml",
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "save_npz",
    "save_torch",
    "to_json_safe",
    "write_json",
]


def _temporary(path: Path) -> Path:
    """A hidden name beside ``path`` with its suffix (for writers that go by the suffix)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    fsynced and renamed to ``path``, on an exception removed (``path`` stays as it was)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) for a writer that takes a file name; on a
    clean exit the file written there is fsynced and renamed to ``path``, on an exception
    removed (``path`` stays as it was)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fh)`` on a binary file handle and put the result at ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        write(fh)


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """`numpy.savez` to ``path`` (exactly that name, no ``.npz`` appended), atomically."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to ``path`` atomically (checkpoints)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def to_json_safe(x: Any) -> Any:
    """``x`` with numpy scalars/arrays as Python numbers/lists and non-finite floats as the
    strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has no such numbers)."""
    if isinstance(x, dict):
        return {k: to_json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented strict JSON (see `to_json_safe`), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json_safe(obj), indent=2) + "\n"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Any:
    """The contents of a YAML file; a missing file or a syntax error raises ``error`` with one
    line naming the file (and the line, column and problem of a syntax error)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise error(f"cannot parse {what} {path}: {where}{problem}") from exc
