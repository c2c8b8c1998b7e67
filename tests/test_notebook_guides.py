"""notebooks/03_amortized_vs_local_svi.ipynb runs from top to bottom, shrunk (PPL_LVM_SMALL=1)."""
import os
import re
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_amortized_vs_local_svi.ipynb"


def test_amortized_vs_local_notebook_runs_small(monkeypatch, tmp_path):
    monkeypatch.setenv("PPL_LVM_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # run in a scratch folder: the notebook writes its checkpoints under the working directory
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "held-out images, nats per image" in text
    for label in ("amortized (encoder)", "non-amortized (local", "semi-amortized"):
        assert label in text
    assert re.search(r"semi \{'epoch': \d+", text)
