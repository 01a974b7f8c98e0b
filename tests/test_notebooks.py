"""Every notebook in notebooks/ runs top to bottom without error (small settings), and the ones
that plot show their figures inline."""

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: Notebooks that plot, and how many figures each shows inline (an image/png output).
INLINE_FIGURES = {
    "02_reference_free_energies.ipynb": 2,
    "03_train_and_sample.ipynb": 1,
    "04_fab_gmm40.ipynb": 1,
    "05_pretrained_aldp.ipynb": 1,
}


def test_there_are_notebooks():
    assert NOTEBOOKS
    assert set(INLINE_FIGURES) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [
        o
        for o in outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
    ]
    assert len(images) >= INLINE_FIGURES.get(path.name, 0), "a figure is no longer shown inline"
