"""notebooks/02_estimating_log_px.ipynb runs from top to bottom, shrunk (PPL_LVM_SMALL=1) as Pyro's
notebooks shrink themselves under test."""
import os
import re
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_estimating_log_px.ipynb"


def test_estimating_log_px_notebook_runs_small(monkeypatch):
    monkeypatch.setenv("PPL_LVM_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "small mode" in text
    assert re.search(r"IS, exact posterior .* gap [+-]0\.000", text)  # the exact proposal is exact
