"""The README's library examples run as written (in a scratch folder)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_readme_library_examples_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its library examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:  # one torch thread: tests/conftest.py
        exec(compile(code, str(README), "exec"), namespace)
    samples = namespace["samples"]
    assert samples.n == 2000 and samples.ais_intermediate == 8
    assert (tmp_path / "runs" / "demo" / "samples.npz").is_file()
    assert namespace["result"].iterations == 200
