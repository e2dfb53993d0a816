"""Hyperparameter leaves for gradient tests: every weighted layer's variances replaced by tensors that require grad."""

from __future__ import annotations

import torch


def variance_leaves(model, seed: int) -> list[torch.Tensor]:
    """Every weighted layer gets its own float64 variances in [0.2, 2) that require grad; returns them in order."""
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for layer in model.kernel_layers():
        if "var_weight" in getattr(layer, "hyperparameter_names", ()):
            for name in ("var_weight", "var_bias"):
                leaf = (0.2 + 1.8 * torch.rand((), generator=gen, dtype=torch.float64)).requires_grad_(True)
                setattr(layer, name, leaf)
                leaves.append(leaf)
    return leaves
