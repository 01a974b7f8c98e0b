"""A wheel of the repository is complete: code, the shipped systems, and the CLI find them.

Builds the wheel from a copy of the checkout (so that no build/ folder is left in it or reused
from it), installs it with ``pip --target`` and runs Python isolated (``-I``) from an empty
directory with that folder first on sys.path, so that neither ./systems nor the checkout (an
editable install's finder comes after sys.path) can stand in for the package data.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# top-level entries of a checkout that are no part of the source (caches, venvs, outputs)
_NOT_SOURCE = {"build", "dist", "runs", "out"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory).resolve() == ROOT
    return {
        n
        for n in names
        if n == "__pycache__"
        or n.endswith(".pyc")
        or (top and (n.startswith(".") or n in _NOT_SOURCE or n.endswith(".egg-info")))
    }


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """(wheel file, folder the wheel is installed into with pip --target)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    _pip("wheel", str(src), "--no-deps", "-w", str(tmp / "dist"))
    (wheel,) = (tmp / "dist").glob("boltzgen_mol-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel))
    return wheel, tmp / "site"


def _run_isolated(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BOLTZGEN_SYSTEMS_PATH"}
    env["XDG_DATA_HOME"] = str(cwd)  # no user systems folder either
    prelude = f"import sys; sys.path.insert(0, {str(site)!r}); "
    return subprocess.run(
        [sys.executable, "-I", "-c", prelude + code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_wheel_holds_all_modules_and_systems(wheel_site):
    wheel, _ = wheel_site
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        p.relative_to(ROOT).as_posix()
        for pattern in ("*.py", "*.c", "*.h")  # the spline kernels' source too
        for p in (ROOT / "boltzgen").rglob(pattern)
    }
    assert modules <= names, f"missing from [tool.setuptools] packages: {modules - names}"
    data = {
        "boltzgen/_systems/" + p.relative_to(ROOT / "systems").as_posix()
        for p in (ROOT / "systems").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert data <= names, f"systems files missing from the wheel: {data - names}"
    assert "boltzgen/_systems/aldp/reference/reference.npz" in data
    assert not any(n.endswith(".pyc") for n in names)


def test_installed_wheel_finds_shipped_systems(wheel_site, tmp_path):
    _, site = wheel_site
    code = (
        "import json, boltzgen; from boltzgen import systems; "
        "from boltzgen.config import load_config; "
        "from boltzgen.analysis.reports import reference_path; "
        "print(json.dumps({'file': boltzgen.__file__, "
        "'paths': [str(p) for p in systems.search_paths()], "
        "'available': systems.available_systems(), "
        "'n_atoms': systems.load('aldp').n_atoms, "
        "'npz': str(systems.shipped_path('aldp', 'reference', 'reference.npz')), "
        "'config': load_config('systems/aldp/reverse_kl_quick.yaml').train.objective, "
        "'reference': reference_path('systems/aldp/reference')}))"
    )
    proc = _run_isolated(site, code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(site)
    assert out["paths"] == [str(site / "boltzgen" / "_systems")]
    assert {"aldp", "xylene", "trpzip2"} <= set(out["available"])
    assert out["n_atoms"] == 22
    assert Path(out["npz"]).is_file() and Path(out["npz"]).is_relative_to(site)
    assert out["config"] == "reverse_kl"  # the README's config path works outside a checkout
    assert Path(out["reference"]).is_relative_to(site)  # and so does --reference
    assert not (tmp_path / "systems").exists()


def test_installed_wheel_cli_lists_systems(wheel_site, tmp_path):
    _, site = wheel_site
    code = "from boltzgen.cli import main; raise SystemExit(main(['systems']))"
    proc = _run_isolated(site, code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {"aldp", "xylene", "trpzip2"} <= set(proc.stdout.split())


def test_installed_wheel_loads_the_shipped_model(wheel_site, tmp_path):
    """A wheel install (no checkout on the path, another working directory) finds the shipped
    ALDP model, loads it and draws weighted samples; its CLI prints the card."""
    _, site = wheel_site
    code = (
        "import json, numpy as np, torch; torch.set_num_threads(1); from boltzgen import models; "
        "from boltzgen import native; "
        "m = models.load_model('aldp'); s = models.draw(m, 4, seed=1); "
        "print(json.dumps({'path': str(m.path), 'n': s.n, 'fractions': m.fractions, "
        "'finite': bool(np.isfinite(s.log_weights).all()), 'kernels': native.status()}))"
    )
    proc = _run_isolated(site, code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]).is_relative_to(site) and out["n"] == 4 and out["finite"]
    assert abs(sum(out["fractions"]) - 1) < 1e-12
    if platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("cc"):
        # the kernels are built from the C source installed with the wheel
        assert out["kernels"].startswith("compiled kernels"), out["kernels"]
    proc = _run_isolated(site, "from boltzgen.cli import main; main(['info', 'aldp'])", tmp_path)
    assert proc.returncode == 0 and "component_1.pt" in proc.stdout, proc.stderr
    assert not list(tmp_path.glob("*"))  # nothing written in the working directory


def _requirement(text: str) -> tuple[str, str]:
    """``"name>=1.2"`` -> ``("name", ">=1.2")``; conda's ``pytorch`` is pip's ``torch``."""
    import re

    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", text).groups()
    name = name.lower().replace("_", "-")
    return {"pytorch": "torch"}.get(name, name), spec.replace(" ", "")


def _conda_requirements(path: Path) -> set[tuple[str, str]]:
    import yaml

    env = yaml.safe_load(path.read_text())
    out = set()
    for dep in env["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, spec = _requirement(item)
            if name not in ("python", "pip", "-e"):
                out.add((name, spec))
    return out


def test_conda_environments_agree_with_pyproject():
    """environment.yml is the runtime (pyproject's dependencies, same bounds);
    environment-dev.yml adds exactly the `test` extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement(d) for d in project["dependencies"]}
    test = {_requirement(d) for d in project["optional-dependencies"]["test"]}
    assert _conda_requirements(ROOT / "environment.yml") == runtime
    assert _conda_requirements(ROOT / "environment-dev.yml") == runtime | test
