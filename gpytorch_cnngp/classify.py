"""The paper's classifier on stored kernels: noise-free GP regression on one-hot targets, argmax predictions.

``A = Kxx^{-1} Y`` by a float64 Cholesky solve (on the GPU when there is one) with no jitter, as published;
``Y`` holds -1 everywhere and +1 at each image's class; the prediction for a test image is
``argmax(K_*x A)``. When the Cholesky factorisation fails, it is retried with a jitter of
``1e-10, 1e-9, ...`` times the mean of the diagonal, and the jitter used is reported. Optional predictive
variances ``k(x*, x*) - k*x Kxx^{-1} kx*`` use the stored diagonals.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CholeskyFailed",
    "one_hot_targets",
    "cholesky_with_jitter",
    "solve_kernel",
    "predict",
    "error_rate",
    "predictive_variances",
    "classify_store",
]


class CholeskyFailed(RuntimeError):
    """Kxx could not be factorised even with the largest jitter tried."""


def one_hot_targets(y: Tensor | np.ndarray, n_classes: int = 10, dtype: torch.dtype = torch.float64) -> Tensor:
    """Regression targets of the paper: ``[n, n_classes]`` with -1 everywhere and +1 at each label."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).long()
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    out = torch.full((y.shape[0], n_classes), -1.0, dtype=dtype, device=y.device)
    out[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return out


def _tensor(x: Tensor | np.ndarray) -> Tensor:
    """A tensor sharing ``x``'s memory when possible (read-only arrays are copied)."""
    if isinstance(x, Tensor):
        return x
    x = np.asarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _as_float64(K: Tensor | np.ndarray, device: torch.device | str | None) -> Tensor:
    K = _tensor(K)
    return K.to(device=device if device is not None else K.device, dtype=torch.float64)


def cholesky_with_jitter(
    Kxx: Tensor | np.ndarray,
    jitter: float = 0.0,
    max_tries: int = 8,
    device: torch.device | str | None = None,
) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``Kxx + jitter I`` in float64, retrying with growing jitter when it fails.

    :param Kxx: the symmetric ``[n, n]`` training kernel (any float dtype; cast to float64).
    :param jitter: the first (absolute) jitter to try; 0 as published.
    :param max_tries: further attempts after the first, with jitter ``10^(k-11) * mean(diag(Kxx))`` for
        ``k = 1..max_tries`` (``1e-10``, ``1e-9``, ... relative), each only if larger than ``jitter``.
    :param device: where to factorise (default: where ``Kxx`` is).
    :return: ``(L, jitter_used)``, the absolute jitter that was added.
    :raises CholeskyFailed: when every attempt fails.
    """
    source = _tensor(Kxx)
    K = _as_float64(source, device)
    owned = K.data_ptr() != source.data_ptr()  # never modify the caller's matrix in place
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"Kxx must be a square matrix, got shape {tuple(K.shape)}")
    if not bool(torch.isfinite(K).all()):
        raise ValueError("Kxx contains NaN or infinite values")
    scale = float(K.diagonal().mean()) if K.shape[0] else 1.0
    candidates = [float(jitter)]
    candidates += [scale * 10.0 ** (k - 11) for k in range(1, max_tries + 1) if scale * 10.0 ** (k - 11) > jitter]
    added = 0.0
    for value in candidates:
        if value != added:
            if not owned:
                K, owned = K.clone(), True
            K.diagonal().add_(value - added)
            added = value
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:
            return L, value
    raise CholeskyFailed(
        f"the Cholesky factorisation of Kxx ({K.shape[0]}x{K.shape[0]}) failed even with a jitter of "
        f"{candidates[-1]:.3g} ({candidates[-1] / scale if scale else float('nan'):.0e} times the mean diagonal "
        f"{scale:.4g})"
    )


def solve_kernel(
    Kxx: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    jitter: float = 0.0,
    max_tries: int = 8,
    device: torch.device | str | None = None,
) -> tuple[Tensor, float]:
    """``A = (Kxx + jitter I)^{-1} Y`` in float64 by Cholesky, retrying with jitter when it fails.

    :param Kxx: ``[n, n]`` training kernel.
    :param Y: ``[n, k]`` targets (or ``[n]``).
    :param jitter: first jitter (0 as published); see :func:`cholesky_with_jitter` for the retries.
    :param max_tries: number of retries with growing jitter.
    :param device: where to solve (default: where ``Kxx`` is).
    :return: ``(A, jitter_used)`` with ``A`` of ``Y``'s shape, float64.
    """
    L, used = cholesky_with_jitter(Kxx, jitter, max_tries, device)
    Yt = _as_float64(Y, L.device)
    vector = Yt.ndim == 1
    A = torch.cholesky_solve(Yt[:, None] if vector else Yt, L)
    return (A[:, 0] if vector else A), used


def predict(Kstar: Tensor | np.ndarray, A: Tensor, chunk_size: int = 8192) -> Tensor:
    """Class predictions ``argmax(K*x A)`` for rows of ``Kstar`` ``[m, n]`` (computed in float64, in chunks)."""
    Kstar = _tensor(Kstar)
    out = []
    for i0 in range(0, Kstar.shape[0], chunk_size):
        block = Kstar[i0 : i0 + chunk_size].to(device=A.device, dtype=torch.float64)
        out.append((block @ A).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def error_rate(predictions: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Fraction of wrong predictions (``nan`` for none)."""
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    return float(np.mean(p != y)) if len(y) else float("nan")


def predictive_variances(
    L: Tensor, Kstar: Tensor | np.ndarray, diag: Tensor | np.ndarray, chunk_size: int = 2048
) -> Tensor:
    """Posterior variances ``k(x*, x*) - k*x Kxx^{-1} kx*`` of the latent function (float64, on ``L``'s device).

    :param L: lower Cholesky factor of ``Kxx`` (with the jitter used, see :func:`cholesky_with_jitter`).
    :param Kstar: ``[m, n]`` cross kernel.
    :param diag: ``[m]`` prior variances ``k(x*, x*)`` (the stored diagonals).
    :return: ``[m]`` variances on the CPU (may be slightly negative from rounding when the prior dominates).
    """
    Kstar = _tensor(Kstar)
    diag = _tensor(diag).to(torch.float64)
    out = []
    for i0 in range(0, Kstar.shape[0], chunk_size):
        block = Kstar[i0 : i0 + chunk_size].to(device=L.device, dtype=torch.float64)
        V = torch.linalg.solve_triangular(L, block.T, upper=False)
        out.append(diag[i0 : i0 + chunk_size] - (V * V).sum(0).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available here")
    return dev


def classify_store(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    jitter: float = 0.0,
    max_tries: int = 8,
    variances: bool = False,
    n_classes: int = 10,
) -> dict[str, Any]:
    """Run the classifier on a complete kernel store.

    :param path: the HDF5 store (see :class:`gpytorch_cnngp.store.KernelStore`).
    :param device: where to factorise and predict (default: the GPU when present, else the CPU).
    :param jitter: first jitter (0 as published).
    :param max_tries: retries with growing jitter when the factorisation fails.
    :param variances: also compute predictive variances from the stored diagonals.
    :param n_classes: number of classes of the one-hot targets.
    :return: a dict with ``val_error`` and ``test_error`` (fractions; ``None`` for an empty part),
        ``jitter`` (absolute) and ``jitter_relative`` (to the mean diagonal), the predictions
        ``val_predictions``/``test_predictions`` (int arrays), ``val_variances``/``test_variances`` when asked,
        the store's metadata (``config``, ``split``, ``n_train``, ...), ``device`` and timings in seconds.
    :raises StoreIncomplete: when the store still has blocks to compute.
    """
    from .store import KernelStore

    dev = _pick_device(device)
    t0 = time.perf_counter()
    with KernelStore.open(path) as store:
        meta = store.meta
        Kxx = torch.from_numpy(store.read("Kxx"))
        scale = float(np.mean(np.diagonal(Kxx.numpy()), dtype=np.float64)) if meta.n_train else 0.0
        cross = {"val": store.read("Kvx"), "test": store.read("Ktx")}
        diags = {"val": store.read("Kvv_diag"), "test": store.read("Ktt_diag")} if variances else {}
        labels = {part: store.labels(part) for part in ("train", "val", "test")}
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    L, used = cholesky_with_jitter(Kxx, jitter, max_tries, dev)
    del Kxx
    Y = one_hot_targets(labels["train"], n_classes).to(L.device)
    A = torch.cholesky_solve(Y, L)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "config": meta.architecture,
        "dataset": meta.dataset,
        "split": meta.split,
        "n_train": meta.n_train,
        "n_val": meta.n_val,
        "n_test": meta.n_test,
        "dtype": meta.dtype,
        "jitter": used,
        "jitter_relative": (used / scale) if scale else 0.0,
        "device": str(dev),
    }
    for part in ("val", "test"):
        pred = predict(cross[part], A).numpy()
        result[f"{part}_predictions"] = pred
        result[f"{part}_error"] = error_rate(pred, labels[part]) if len(pred) else None
        if variances:
            result[f"{part}_variances"] = predictive_variances(L, cross[part], diags[part]).numpy()
    result["seconds"] = {"load": t_load, "solve": t_solve, "predict": time.perf_counter() - t0}
    return result
