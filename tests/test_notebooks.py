"""Every notebook runs top to bottom on a small slice (PATCHLAB_NB_QUICK=1) and shows its plotly figures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
            path.name
        )


@pytest.mark.real
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, smol, monkeypatch):
    monkeypatch.setenv("PATCHLAB_NB_QUICK", "1")
    monkeypatch.setenv("PATCHLAB_QUIET", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(PLOTLY in o.get("data", {}) for o in outputs), "no interactive figure shown"
