"""The fixed subset sizes, the paper's configurations and the default names of ``cnngp``; its parser and
its commands share them."""

from __future__ import annotations

from pathlib import Path

from .. import settings

DEFAULT_SUBSET = {"n_train": 1500, "n_val": 500, "n_test": 1000}
"""The subset ``cnngp table`` runs by default: the first images of each part of the split."""

FULL_SUBSET = {"n_train": 50000, "n_val": 10000, "n_test": 10000}
"""The paper's setting (``--full``)."""

PAPER_CONFIGS = ("convnet_gp", "residual_cnn_gp", "resnet32_gp")
"""The paper's three configurations (``--paper-scale``)."""

DEFAULT_CONFIG = "convnet_gp"
DEFAULT_SPLIT = "mnist_as_tf"
DEFAULT_WORKDIR = "cnngp-results"


def paper_store_dir() -> Path:
    """Where ``--paper-scale`` keeps its stores: ``$CNNGP_STORE_DIR`` or ``~/.cache/gpytorch_cnngp/paper_table``."""
    return settings.store_dir.value()
