"""The documentation (``docs/``: the README as the guide, the API reference from the docstrings, the notebook
with its saved outputs and the benchmark results) builds with Sphinx with every warning an error.

The notebook is not executed here (``test_notebooks.py`` runs it); a docstring that docutils cannot parse, a
broken cross-reference or a page left out of the table of contents fails the build.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out, doctrees = tmp_path / "html", tmp_path / "doctrees"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(doctrees), str(ROOT / "docs"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in (
        "kernel.CNNGPKernel",
        "models.SharedCovarianceExactGP",
        "engine.gram",
        "layers.conv.Conv2d",
        "architectures.myrtle",
    ):
        assert f'id="gpytorch_cnngp.{name}"' in api, f"{name} missing from the API reference"
    guide = (out / "guide.html").read_text(encoding="utf-8")
    assert "Kernels from architectures" in guide and 'href="results.html"' in guide  # the README is the guide
    assert (out / "notebooks" / "tune_var_weight.html").exists()
