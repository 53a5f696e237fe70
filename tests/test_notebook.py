"""Executes docs/notebooks/tour.ipynb end to end and checks the numbers it prints."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "tour.ipynb"


def _stdout(nb) -> str:
    return "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def test_saved_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before saving"


@pytest.mark.slow
def test_tour_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (with the failing cell's traceback) if any cell fails, its asserts included.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = _stdout(nb)
    losses = re.search(r"first_loss=([0-9.]+) final_loss=([0-9.]+)", out)
    assert losses, out[-2000:]
    first, final = map(float, losses.groups())
    assert final < 0.6 * first, (first, final)
    assert "largest difference in the predicted velocity" in out
    assert re.search(r"kept blocks \[[0-9, ]+\]: depth 4", out), out[-2000:]
    assert re.search(r"selected candidate \d+", out), out[-2000:]
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the data, the loss curve, the importance and the candidates
