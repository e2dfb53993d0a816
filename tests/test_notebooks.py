"""The example notebooks run top to bottom in smoke mode (``CI`` set), as CI runs them.

Each notebook is executed with nbclient in a fresh Jupyter kernel started from this interpreter, so it
sees the installed package; any cell error fails the test. Nothing is written back to the notebook
files (their saved outputs are those of a full run). The notebooks load real MNIST, which
``gpytorch_cnngp.datasets`` downloads (and verifies) on first use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that launches ``sys.executable``, found before any other on this machine."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (this interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched first by jupyter_client
    return "python3"


@pytest.mark.parametrize("name", ["tune_var_weight.ipynb"])
def test_notebook_runs_in_smoke_mode(name, python3_kernel, monkeypatch):
    monkeypatch.setenv("CI", "1")  # the kernel subprocess inherits it: smoke_test = ("CI" in os.environ)
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=python3_kernel,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    smoke_flags = [out.get("text", "") for out in outputs if out.get("output_type") == "stream"]
    assert any("smoke_test=True" in text for text in smoke_flags), "the notebook did not run in smoke mode"
