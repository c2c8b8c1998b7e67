"""Every notebook runs from top to bottom, shrunk (PPL_LVM_SMALL=1) as Pyro's notebooks shrink
themselves under test, and prints what its story needs."""
import os
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")  # the [test] extra; a GPU box may lack it
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]

# notebook -> patterns its printed output must contain
EXPECTED = {
    "01_your_own_model.ipynb": [r"small mode", r"plate_name='digits'", r"IWAE K=100 ",
                                r"non-amortized \(local, S = 3\)", r"amortization gap",
                                r"without globals=: sites \['s'\] are outside the data plate",
                                r"globals='given'"],
    "02_estimating_log_px.ipynb": [r"small mode", r"IS, exact posterior .* gap [+-]0\.000"],
    "03_amortized_vs_local_svi.ipynb": [r"held-out images, nats per image", r"amortized \(encoder\)",
                                        r"non-amortized \(local", r"semi-amortized",
                                        r"semi \{'epoch': \d+", r"paired s\.e\.",
                                        r"rows converged"],
    "04_mixture_of_gaussians.ipynb": [],
    "05_missing_pixels.ipynb": [r"KNNImputer", r"log p\(x_obs\)"],
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_small(name, monkeypatch, tmp_path):
    monkeypatch.setenv("PPL_LVM_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    # run in a scratch folder: notebooks may write checkpoints under their working directory
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    for pattern in EXPECTED[name]:
        assert re.search(pattern, text), pattern


def test_completion_figures_in_the_committed_notebooks_paint_missing_pixels_in_the_one_colour():
    """Every figure a notebook draws of a completion goes through ``plots.completion_grid``, and
    its committed picture (from the full run) has pixels of exactly ``plots.MISSING_COLOR``."""
    import base64
    import io
    import json

    import matplotlib.image
    import numpy as np

    from ppl_lvm import plots

    colour = np.asarray(plots.MISSING_COLOR)
    drawn = 0
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not re.search(r"(\bcomplete|_completion)\(", source):
                continue
            assert "image_grid(" not in source and "imshow(" not in source, (
                f"{path.name}: draw completions with plots.completion_grid")
            pictures = [output["data"]["image/png"] for output in cell.get("outputs", [])
                        if "image/png" in output.get("data", {})]
            assert ("completion_grid(" in source) <= bool(pictures), f"{path.name}: no figure"
            for picture in pictures:
                pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(picture)))[..., :3]
                assert (np.abs(pixels - colour).max(-1) <= 1 / 255).sum() > 0, path.name
                drawn += 1
    assert drawn >= 3  # notebook 01's and notebook 05's completions
