"""The paper's classifier on stored kernels: noise-free GP regression on one-hot targets, argmax predictions.

``A = Kxx^{-1} Y`` by a float64 Cholesky solve with no jitter, as published; ``Y`` holds -1 everywhere and +1
at each image's class; the prediction for a test image is ``argmax(K_*x A)``. When the Cholesky factorisation
fails, it is retried with a jitter of ``1e-10, 1e-9, ...`` times the mean of the diagonal, and the jitter used
is reported. Optional predictive variances ``k(x*, x*) - k*x Kxx^{-1} kx*`` use the stored diagonals.

The dual coefficients are checked before they are returned: finite, and solving the system to a relative residual
``max_k ||(Kxx + jitter I) a_k - y_k|| / (||Kxx + jitter I||_F ||a_k|| + ||y_k||)`` of at most
:data:`RESIDUAL_TOLERANCE` (one more pass over ``Kxx``). A backward-stable Cholesky solve stays orders of magnitude
below it; a damaged factor (bytes changed in its panels on disk) or a store changed during the solve does not.

:func:`classify_store` works within a memory budget whatever the size of the store: on the CPU it factorises
with :class:`~gpytorch_cnngp.blocked_cholesky.BlockedCholesky` (panels in memory when they fit, else on disk)
and reads the cross kernels in row chunks; on a GPU it factorises the dense float64 matrix there.
:func:`cholesky_with_jitter` and :func:`solve_kernel` are the dense in-memory versions, for matrices at hand.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .blocked_cholesky import BlockedCholesky, NotPositiveDefinite, default_memory_budget, scratch_folder, source_key
from .devices import parse_device
from .memory import parse_bytes

__all__ = [
    "CholeskyFailed",
    "InaccurateSolve",
    "RESIDUAL_TOLERANCE",
    "one_hot_targets",
    "cholesky_with_jitter",
    "solve_kernel",
    "predict",
    "error_rate",
    "predictive_variances",
    "classify_store",
    "predict_store",
    "jitter_schedule",
]


class CholeskyFailed(RuntimeError):
    """Kxx could not be factorised even with the largest jitter tried."""


class InaccurateSolve(CholeskyFailed):
    """The dual coefficients are not finite or do not solve ``(Kxx + jitter I) A = Y`` to the stated residual."""


RESIDUAL_TOLERANCE = 1e-8
"""Largest relative residual accepted for the dual coefficients (see the module docstring). Below float32's
rounding of the stored kernels (6e-8): an accepted ``A`` solves a system nearer ``Kxx`` than the kernels' own
rounding, while a sound solve leaves a residual near float64's rounding (1e-16)."""


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
    _schedule: list[float] | None = None,
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
    candidates = list(_schedule) if _schedule is not None else jitter_schedule(jitter, max_tries, scale)
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
    raise CholeskyFailed(_failure_message(K.shape[0], candidates, scale))


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
    return parse_device(device)


def jitter_schedule(jitter: float, max_tries: int, scale: float) -> list[float]:
    """The jitters tried in order: ``jitter``, then ``10^(k-11) * scale`` for ``k = 1..max_tries`` above it."""
    out = [float(jitter)]
    out += [scale * 10.0 ** (k - 11) for k in range(1, max_tries + 1) if scale * 10.0 ** (k - 11) > jitter]
    return out


def _mean_diagonal(store: Any, n: int, step: int = 1024) -> float:
    """Mean of ``diag(Kxx)``, read in small square blocks."""
    total = 0.0
    buf = np.empty((min(step, max(n, 1)),) * 2, dtype=np.float64)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        block = buf[: r1 - r0, : r1 - r0]
        store.read_into("Kxx", (r0, r1), (r0, r1), block)
        total += float(np.trace(block))
    return total / n if n else 0.0


def _rows_per_chunk(n: int, budget: int, bytes_per_value: int = 12) -> int:
    """Rows of an ``[r, n]`` cross-kernel chunk (float32 as read plus float64) within a quarter of ``budget``."""
    return int(max(1, min(8192, budget // 4 // max(1, n * bytes_per_value))))


_CROSS = {"val": "Kvx", "test": "Ktx"}
_DIAG = {"val": "Kvv_diag", "test": "Ktt_diag"}


def _check_parts(parts: Any) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    bad = [p for p in parts if p not in _CROSS]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be 'val' and/or 'test', each once, got {parts!r}")
    return parts


def _stored_blocks(store: Any, path: Any, part: str, rows: int, device: torch.device) -> Any:
    """``(r0, r1, K)`` for row chunks of a cross kernel, ``K`` float64 on ``device``; NaN/inf is refused."""
    name = _CROSS[part]
    m, n = store.meta.size(part), store.meta.n_train
    buf = np.empty((min(rows, max(m, 1)), n), dtype=np.float32)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        block = buf[: r1 - r0]
        store.read_into(name, (r0, r1), (0, n), block)
        if not np.isfinite(block).all():
            row = r0 + int(np.argwhere(~np.isfinite(block))[0][0])
            raise ValueError(
                f"{path}: {name} holds NaN or infinite values (row {row}): the store is damaged; recompute it"
            )
        yield r0, r1, torch.from_numpy(block).to(device=device, dtype=torch.float64)


def predict_store(
    path: str | os.PathLike[str],
    A: Tensor | np.ndarray,
    part: str = "test",
    *,
    memory_budget: int | str | None = None,
) -> tuple[np.ndarray, float | None]:
    """Predict one part of a complete store from dual coefficients ``A`` (as :func:`classify_store` returns them).

    :param path: the HDF5 store.
    :param A: ``[n_train, n_classes]`` dual coefficients.
    :param part: ``"val"`` or ``"test"``.
    :param memory_budget: bytes (or text such as ``"2GB"``) for the row chunks; default 60% of the memory available.
    :return: ``(predictions, error)``, the error ``None`` for an empty part.
    """
    from .store import KernelStore

    (part,) = _check_parts(part)
    A = _tensor(A).to(torch.float64)
    budget = default_memory_budget() if memory_budget is None else parse_bytes(memory_budget)
    with KernelStore.open(path) as store:
        n = store.meta.n_train
        if A.shape[0] != n:
            raise ValueError(f"A has {A.shape[0]} rows, the store {n} training images")
        store.require_complete(_CROSS[part])
        labels = store.labels(part)
        rows = _rows_per_chunk(n, budget, 12)
        preds = [(K @ A).argmax(1) for _, _, K in _stored_blocks(store, path, part, rows, A.device)]
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return pred, (error_rate(pred, labels) if len(pred) else None)


def _relative_residual(row_blocks: Callable[[], Any], A: Tensor, Y: Tensor, jitter: float) -> float:
    """``max_k ||(K + jitter I) a_k - y_k|| / (||K + jitter I||_F ||a_k|| + ||y_k||)`` (``inf`` when not finite).

    :param row_blocks: yields ``(r0, rows)``: float64 tensors ``K[r0:r0 + m, :]`` on ``A``'s device, in order (not
        modified).
    """
    if not bool(torch.isfinite(A).all()):
        return float("inf")
    r2 = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    k2 = 0.0
    for r0, rows in row_blocks():
        m = rows.shape[0]
        R = rows @ A - Y[r0 : r0 + m] + jitter * A[r0 : r0 + m]
        r2 += (R * R).sum(0)
        diagonal = rows.diagonal(offset=r0)  # K[i, i] for the rows' i: the jitter adds to them
        k2 += float(torch.linalg.vector_norm(rows)) ** 2 + 2 * jitter * float(diagonal.sum()) + m * jitter**2
    den = math.sqrt(max(k2, 0.0)) * torch.linalg.vector_norm(A, dim=0) + torch.linalg.vector_norm(Y, dim=0)
    eta = torch.sqrt(r2) / torch.where(den > 0, den, torch.ones_like(den))
    value = float(eta.max()) if eta.numel() else 0.0
    return value if math.isfinite(value) else float("inf")


def _check_dual(eta: float, where: str) -> None:
    if not eta <= RESIDUAL_TOLERANCE:
        what = "hold NaN or infinite values" if math.isinf(eta) else f"leave a relative residual of {eta:.1e}"
        raise InaccurateSolve(
            f"the dual coefficients {what} (at most {RESIDUAL_TOLERANCE:.0e} is accepted); nothing was written. "
            f"{where} Run the same command again: the factor is computed anew"
        )


def classify_store(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    jitter: float = 0.0,
    max_tries: int = 8,
    variances: bool = False,
    n_classes: int = 10,
    memory_budget: int | str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    method: str = "auto",
    verify: bool = True,
    parts: tuple[str, ...] = ("val", "test"),
) -> dict[str, Any]:
    """Run the classifier on a complete kernel store, in float64, within a memory budget.

    On the CPU, ``Kxx`` is factorised by :class:`~gpytorch_cnngp.blocked_cholesky.BlockedCholesky`: in memory
    when its packed factor fits the budget, else in panels on disk (``scratch_dir``, by default
    ``<store>.factor`` beside the store; resumed after an interruption, deleted when done). On a GPU the dense
    float64 matrix is factorised there (it must fit the device). Cross kernels are read in row chunks, so the
    budget bounds everything but a small fixed overhead.

    :param path: the HDF5 store (see :class:`gpytorch_cnngp.store.KernelStore`).
    :param device: where to factorise and predict (default: the GPU when present, else the CPU).
    :param jitter: first jitter (0 as published); see :func:`jitter_schedule` for the retries.
    :param max_tries: retries with growing jitter when the factorisation fails.
    :param variances: also compute predictive variances from the stored diagonals.
    :param n_classes: number of classes of the one-hot targets.
    :param memory_budget: bytes (or text such as ``"2GB"``) the classifier may use; default 60% of the memory
        available now.
    :param scratch_dir: folder for factor panels that do not fit the budget.
    :param progress: progress bars (factorisation in flops, with ETA).
    :param log: called with one-line notes (resumed factorisation, jitter retries).
    :param method: ``"auto"`` (blocked on the CPU, dense on a GPU), ``"blocked"`` or ``"dense"`` (the whole
        float64 matrix on ``device``; it must fit there).
    :param verify: first check every tile against its checksum and for NaN/inf (one extra read of the store).
    :param parts: the images to predict, ``"val"`` and/or ``"test"``; a part left out is not read, and its error
        and predictions are not in the result (:func:`predict_store` predicts it later from ``A``).
    :return: a dict with ``val_error`` and ``test_error`` (fractions; ``None`` for an empty part),
        ``jitter`` (absolute) and ``jitter_relative`` (to the mean diagonal), ``jitters_tried``, the dual
        coefficients ``A`` (``[n_train, n_classes]`` float64 array), the predictions
        ``val_predictions``/``test_predictions`` (int arrays), ``val_variances``/``test_variances`` when asked,
        the store's metadata (``config``, ``split``, ``n_train``, ...), ``device``, ``memory_budget``,
        ``factor`` (``"memory"``, ``"disk"`` or ``"dense"``), ``residual`` (the relative residual of ``A``, see
        :data:`RESIDUAL_TOLERANCE`) and timings in seconds.
    :raises StoreIncomplete: when the store still has blocks to compute.
    :raises DamagedStore: when committed tiles fail their checksum or hold NaN/inf.
    :raises CholeskyFailed: when ``Kxx`` is not positive definite even with the largest jitter.
    :raises InaccurateSolve: when the dual coefficients are not finite or leave a relative residual above
        :data:`RESIDUAL_TOLERANCE` (nothing is returned; a factor on disk is deleted).
    """
    from .store import KernelStore

    dev = _pick_device(device)
    budget = default_memory_budget() if memory_budget is None else parse_bytes(memory_budget)
    say = log or (lambda text: None)
    parts = _check_parts(parts)
    timings = {"load": 0.0, "solve": 0.0, "predict": 0.0}
    t0 = time.perf_counter()
    with KernelStore.open(path) as store:
        meta = store.meta
        n = meta.n_train
        cross = tuple(_CROSS[part] for part in parts)
        needed = ("Kxx", *cross, *(tuple(_DIAG[part] for part in parts) if variances else ()))
        for name in needed:
            store.require_complete(name)
        if verify:
            store.require_intact(needed, progress=progress)
        labels = {part: store.labels(part) for part in ("train", "val", "test")}
        diags = {part: store.read(_DIAG[part]) for part in parts} if variances else {}
        scale = _mean_diagonal(store, n)
        candidates = jitter_schedule(jitter, max_tries, scale)
        Y = one_hot_targets(labels["train"], n_classes)
        timings["load"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        fac = None
        L = None
        if method not in ("auto", "blocked", "dense"):
            raise ValueError(f"method must be 'auto', 'blocked' or 'dense', got {method!r}")
        if method == "dense" or (method == "auto" and dev.type == "cuda"):
            K = torch.empty((n, n), dtype=torch.float64, device=dev)
            rows = _rows_per_chunk(n, budget, 4)
            buf = np.empty((rows, n), dtype=np.float32)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                store.read_into("Kxx", (r0, r1), (0, n), buf[: r1 - r0])
                K[r0:r1] = torch.from_numpy(buf[: r1 - r0]).to(dev)
            del buf
            try:
                L, used = cholesky_with_jitter(K, candidates[0], max_tries, dev, _schedule=candidates)
                A = torch.cholesky_solve(Y.to(dev), L)
                step = _rows_per_chunk(n, budget, 8)

                def dense_rows() -> Any:
                    for r0 in range(0, n, step):
                        yield r0, K[r0 : r0 + step]

                eta = _relative_residual(dense_rows, A, Y.to(dev), used)
            finally:
                del K
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            _check_dual(eta, "The factorisation on the device gave wrong numbers.")
            tried, mode = [c for c in candidates if c <= used], "dense"
        else:

            def read_rows(r0: int, r1: int, c0: int, out: np.ndarray) -> None:
                store.read_into("Kxx", (r0, r1), (c0, c0 + out.shape[1]), out)

            scratch = scratch_dir if scratch_dir is not None else scratch_folder(path)
            try:
                fac = BlockedCholesky.factor(
                    read_rows,
                    n,
                    jitter_candidates=candidates,
                    memory_budget=int(budget * (0.6 if variances else 1.0)),
                    scratch_dir=scratch,
                    source_key=source_key(path, {"dataset": "Kxx"}),
                    progress=progress,
                    log=say,
                )
            except NotPositiveDefinite:
                raise CholeskyFailed(_failure_message(n, candidates, scale)) from None
            A = fac.solve(Y)
            step = _rows_per_chunk(n, budget // 4, 12)  # beside the factor, which may fill most of the budget

            def stored_rows() -> Any:
                buf = np.empty((min(step, n), n), dtype=np.float32)
                for r0 in range(0, n, step):
                    r1 = min(n, r0 + step)
                    store.read_into("Kxx", (r0, r1), (0, n), buf[: r1 - r0])
                    yield r0, torch.from_numpy(buf[: r1 - r0]).to(torch.float64)

            eta = _relative_residual(stored_rows, A, Y, fac.jitter)
            if not eta <= RESIDUAL_TOLERANCE:
                on_disk = fac.report.on_disk
                fac.close()  # a damaged factor on disk is not resumed from
                _check_dual(
                    eta,
                    f"The factor's panels in {scratch} were damaged, or {path} changed during the solve."
                    if on_disk
                    else f"{path} changed during the solve, or the memory gave wrong numbers.",
                )
            used, tried, mode = fac.jitter, fac.report.attempts, ("disk" if fac.report.on_disk else "memory")
        timings["solve"] = time.perf_counter() - t0

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
            "jitters_tried": tried,
            "device": str(dev),
            "memory_budget": budget,
            "factor": mode,
            "residual": eta,
            "A": A.cpu().numpy(),
        }
        if fac is not None and not variances:
            fac.close()  # predictions need only A
            fac = None
        try:
            for part in parts:
                # variances hold an [n, rows] float64 solve (and its copy) per chunk
                rows = _rows_per_chunk(n, budget, 28 if variances else 12)
                preds, var = [], []
                for r0, r1, Kb in _stored_blocks(store, path, part, rows, A.device):
                    preds.append((Kb @ A).argmax(1).cpu())
                    if variances:
                        if L is not None:
                            V = torch.linalg.solve_triangular(L, Kb.T, upper=False)
                        else:
                            V = fac.forward(Kb.T.cpu())
                        var.append(torch.from_numpy(diags[part][r0:r1]).double() - (V * V).sum(0).cpu())
                    del Kb
                pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
                result[f"{part}_predictions"] = pred
                result[f"{part}_error"] = error_rate(pred, labels[part]) if len(pred) else None
                if variances:
                    result[f"{part}_variances"] = torch.cat(var).numpy() if var else np.zeros(0)
        finally:
            if fac is not None:
                fac.close()
        timings["predict"] = time.perf_counter() - t0
    result["seconds"] = timings
    return result


def _failure_message(n: int, candidates: list[float], scale: float) -> str:
    tried = ", ".join(f"{c:.3g}" for c in candidates)
    return (
        f"the Cholesky factorisation of Kxx ({n}x{n}) failed even with a jitter of {candidates[-1]:.3g} "
        f"({candidates[-1] / scale if scale else float('nan'):.0e} times the mean diagonal {scale:.4g}); jitters "
        f"tried: {tried}. Kxx is not positive definite: check the store (`cnngp kernels --repair` recomputes damaged "
        "tiles), or allow larger jitter with --max-tries"
    )
