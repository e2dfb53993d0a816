"""The paper's classifier with a ridge term chosen on the validation images.

The published classifier is noise-free, ``A = Kxx^{-1} Y``. A ridge term ``lambda`` (relative to the mean of
``diag(Kxx)``, so that one grid suits every kernel's scale) solves instead

.. math::

    A_\\lambda = \\bigl(K_{xx} + \\lambda \\, \\overline{\\operatorname{diag} K_{xx}} \\, I\\bigr)^{-1} Y,

with the paper's one-hot targets (-1 everywhere, +1 at the class), in float64 by Cholesky; ``lambda = 0`` is the
published classifier with its jitter retries. The validation images pick ``lambda``: the lowest validation error,
the smallest ``lambda`` of those tied. The test images are predicted only from the chosen ``A``, so no test label
or test kernel value takes part in the choice.

One Cholesky factorisation per ``lambda``: :func:`validation_errors` for matrices in memory,
:func:`classify_store_ridge` for a kernel store of any size (each factorisation within the memory budget).

Example::

    >>> from gpytorch_cnngp.ridge import classify_store_ridge
    >>> out = classify_store_ridge("pooled_cnn_gp.h5", [0, 1e-4, 1e-3, 1e-2])  # doctest: +SKIP
    >>> out["ridge"], out["val_error"], out["test_error"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .classify import _mean_diagonal, classify_store, error_rate, one_hot_targets, predict, predict_store, solve_kernel
from .progress import progress_bar

__all__ = ["DEFAULT_RIDGES", "check_ridges", "best_ridge", "validation_errors", "classify_store_ridge"]

DEFAULT_RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
"""The ridge terms tried by default, relative to the mean diagonal of ``Kxx`` (0: the paper's classifier)."""

MAX_RIDGE = 1.0
"""The largest ridge accepted: one mean diagonal. Beyond it the ridge, not the kernel, decides the predictions."""


def check_ridges(ridges: Sequence[float]) -> list[float]:
    """The grid sorted, refused (ValueError, one line) when empty, repeated, negative, not finite or above 1."""
    values = [float(v) for v in ridges]
    if not values:
        raise ValueError("give at least one ridge term (e.g. 0 1e-3)")
    bad = [v for v in values if not (math.isfinite(v) and 0 <= v <= MAX_RIDGE)]
    if bad:
        raise ValueError(
            f"ridge terms are relative to the mean diagonal of Kxx and must lie in [0, {MAX_RIDGE:g}], got {bad[0]!r}"
        )
    if len(set(values)) != len(values):
        raise ValueError(f"ridge terms must not repeat, got {values}")
    return sorted(values)


def best_ridge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The entry with the lowest ``val_error``; ties go to the smallest ``lambda`` (the least regularised)."""
    if not results:
        raise ValueError("no results to choose from")
    return min(results, key=lambda r: (r["val_error"], r["lambda"]))


def validation_errors(
    Kxx: np.ndarray | torch.Tensor,
    y_train: np.ndarray,
    Kvx: np.ndarray | torch.Tensor,
    y_val: np.ndarray,
    ridges: Sequence[float],
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The validation error of the classifier for every ridge term of the grid, for matrices in memory.

    :param Kxx: ``[n, n]`` training kernel (any float dtype; the solve is float64).
    :param y_train: ``[n]`` training labels.
    :param Kvx: ``[m, n]`` kernel between the validation and the training images.
    :param y_val: ``[m]`` validation labels.
    :param ridges: ridge terms relative to the mean diagonal of ``Kxx`` (see :func:`check_ridges`).
    :param device: where to solve (default: where ``Kxx`` is, the CPU for arrays).
    :param progress: a progress bar over the grid.
    :return: one dict per ridge term in ascending order: ``lambda``, ``jitter`` (the absolute term added, after any
        retries), ``val_error``.
    """
    grid = check_ridges(ridges)
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


def classify_store_ridge(
    path: str | os.PathLike[str],
    ridges: Sequence[float],
    device: torch.device | str | None = None,
    *,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The classifier on a complete kernel store with its ridge term chosen on the validation images.

    Each ridge term is one run of :func:`~gpytorch_cnngp.classify.classify_store` that predicts the validation
    images only (its jitter ``lambda * mean(diag Kxx)``, retried upwards as published if the factorisation fails);
    the test images are then predicted from the chosen term's dual coefficients alone.

    :param path: the HDF5 store.
    :param ridges: ridge terms relative to the mean diagonal of ``Kxx`` (see :func:`check_ridges`).
    :param device: where to factorise and predict (see :func:`~gpytorch_cnngp.classify.classify_store`).
    :param log: called with one line per ridge term (its validation error) and the classifier's own notes.
    :param options: passed to :func:`~gpytorch_cnngp.classify.classify_store` (``max_tries``, ``memory_budget``,
        ``scratch_dir``, ``progress``, ``method``); not ``jitter``, ``parts`` or ``variances``.
    :return: the chosen term's result as :func:`~gpytorch_cnngp.classify.classify_store` gives it (its ``A``,
        ``val_error``, ``test_error``, predictions, ``jitter``), plus ``ridge`` (the chosen ``lambda``) and
        ``ridges`` (one dict per term: ``lambda``, ``jitter``, ``jitter_relative``, ``val_error``, ``seconds``);
        ``seconds`` sums every term's solve and prediction.
    """
    grid = check_ridges(ridges)
    refused = sorted({"jitter", "parts", "variances"} & set(options))
    if refused:
        raise TypeError(f"classify_store_ridge sets {', '.join(refused)} itself")
    say = log or (lambda text: None)
    from .store import KernelStore

    with KernelStore.open(path) as store:
        if store.meta.n_val == 0:
            raise ValueError(f"{path} holds no validation images: a ridge term is chosen on them")
        store.require_complete("Kxx")
        scale = _mean_diagonal(store, store.meta.n_train)
    verify = options.pop("verify", True)
    runs: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    totals = {"load": 0.0, "solve": 0.0, "predict": 0.0}
    for i, lam in enumerate(grid):
        # the store's tiles are checked once, before the first factorisation
        out = classify_store(
            path, device, jitter=lam * scale, parts=("val",), verify=verify and i == 0, log=log, **options
        )
        for key in totals:
            totals[key] += out["seconds"][key]
        runs.append(
            {
                "lambda": lam,
                "jitter": out["jitter"],
                "jitter_relative": out["jitter_relative"],
                "val_error": out["val_error"],
                "seconds": out["seconds"],
            }
        )
        say(
            f"ridge {lam:g}: validation error {100 * out['val_error']:.2f}% "
            f"(solve {out['seconds']['solve']:.0f} s{'' if out['jitter'] == lam * scale else ', jitter raised'})"
        )
        if chosen is None or out["val_error"] < chosen["val_error"]:  # ascending grid: ties keep the smaller term
            chosen = {**out, "ridge": lam}  # only the best A so far is kept (n_train x classes floats)
    assert chosen is not None
    t0 = time.perf_counter()
    chosen["test_predictions"], chosen["test_error"] = predict_store(
        path, chosen["A"], "test", memory_budget=options.get("memory_budget")
    )
    totals["predict"] += time.perf_counter() - t0
    chosen["ridges"] = runs
    chosen["seconds"] = totals
    return chosen
