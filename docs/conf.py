"""Sphinx configuration: the README as the user guide, an API reference from the docstrings, the notebook
rendered with its saved outputs (never executed here). Build with ``sphinx-build -W docs docs/_build``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the working tree, installed or not

import gpytorch_cnngp  # noqa: E402

project = "gpytorch-cnngp"
author = "gpytorch-cnngp developers"
release = version = gpytorch_cnngp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (the README) and the notebook
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "notebooks/*.py", "notebooks/.ipynb_checkpoints"]

nb_execution_mode = "off"  # the notebook is shown with the outputs of its last full run
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"gpytorch-cnngp {release}"


def _readme_as_guide(app, docname: str, source: list[str]) -> None:
    """Read the README in as ``guide``; its links to the benchmark results point at their page here."""
    if docname == "guide":
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        source[0] = text.replace("](benchmarks/RESULTS.md)", "](results.md)")


def setup(app) -> None:
    app.connect("source-read", _readme_as_guide)
