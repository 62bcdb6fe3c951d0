"""experiments/demo.ipynb runs top to bottom in a headless kernel."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains, serves or spawns the CLI


def test_demo_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "experiments" / "demo.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "validation loss" in text and "parity:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # loss curve, attention
    assert (tmp_path / "demo-bundle" / "gptkit.json").exists()
