"""The paper's classifier with a ridge term chosen on the validation images.

For each ``lambda`` of a grid, ``A = (Kxx + lambda * mean(diag Kxx) * I)^{-1} Y`` with the paper's one-hot targets
(-1 everywhere, +1 at the class), solved in float64 by :func:`gpytorch_cnngp.classify.solve_kernel` (Cholesky;
``lambda = 0`` is the published noise-free classifier, with its jitter retries when the factorisation fails),
and the validation images are classified by ``argmax(Kvx A)``. The ``lambda`` kept is the one with the lowest
validation error, the smallest of those tied. One Cholesky factorisation per ``lambda``: the same order of work
as one eigendecomposition shared by all of them, and the paper's own solve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gpytorch_cnngp.classify import error_rate, one_hot_targets, predict, solve_kernel
from gpytorch_cnngp.progress import progress_bar

__all__ = ["DEFAULT_LAMBDAS", "check_lambdas", "validation_errors", "best"]

DEFAULT_LAMBDAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
"""The ridge terms tried, relative to the mean diagonal of ``Kxx`` (0: the paper's classifier)."""


def check_lambdas(lambdas: Sequence[float]) -> list[float]:
    """The grid sorted, refused (ValueError, one line) when empty, repeated, negative or not finite."""
    values = [float(v) for v in lambdas]
    if not values:
        raise ValueError("give at least one lambda (e.g. --lambdas 0 1e-3)")
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"lambdas must be finite and >= 0 (relative to the mean diagonal of Kxx), got {bad[0]!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"lambdas must not repeat, got {values}")
    return sorted(values)


def validation_errors(
    Kxx: np.ndarray | torch.Tensor,
    y_train: np.ndarray,
    Kvx: np.ndarray | torch.Tensor,
    y_val: np.ndarray,
    lambdas: Sequence[float],
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The validation error of the classifier for every ``lambda`` of the grid.

    :param Kxx: ``[n, n]`` training kernel (any float dtype; the solve is float64).
    :param y_train: ``[n]`` training labels.
    :param Kvx: ``[m, n]`` kernel between the validation and the training images.
    :param y_val: ``[m]`` validation labels.
    :param lambdas: ridge terms relative to the mean diagonal of ``Kxx`` (see :func:`check_lambdas`).
    :param device: where to solve (default: where ``Kxx`` is, the CPU for arrays).
    :param progress: a progress bar over the grid.
    :return: one dict per ``lambda`` in ascending order: ``lambda``, ``jitter`` (the absolute term added, after any
        retries), ``val_error``.
    """
    grid = check_lambdas(lambdas)
    K = torch.as_tensor(np.asarray(Kxx)) if not isinstance(Kxx, torch.Tensor) else Kxx
    scale = float(K.diagonal().double().mean())
    Y = one_hot_targets(np.asarray(y_train))
    out = []
    bar = progress_bar(progress, len(grid), "ridge terms", "solves")
    try:
        for lam in grid:
            A, used = solve_kernel(K, Y, jitter=lam * scale, device=device)
            out.append({"lambda": lam, "jitter": used, "val_error": error_rate(predict(Kvx, A), y_val)})
            del A
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def best(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The entry of :func:`validation_errors` with the lowest validation error; ties go to the smallest ``lambda``."""
    if not results:
        raise ValueError("no results to choose from")
    return min(results, key=lambda r: (r["val_error"], r["lambda"]))
