"""A float64 Cholesky factorisation and solves whose memory is bounded by a budget, not by ``n^2``.

The paper's classifier needs ``A = Kxx^{-1} Y`` for ``Kxx`` of ``n = 50,000`` training images: 10 GB as
stored (float32), 20 GB as one float64 copy, 40 GB for the usual "factorise a copy" of it. This module
factorises ``Kxx`` in float64 in a fixed amount of memory:

*Algorithm: left-looking blocked Cholesky by column panels.* Panel ``j`` holds columns ``[c0, c1)`` of the
lower factor ``L`` from row ``c0`` down; it is stored transposed, ``Lt_j = L[c0:n, c0:c1]^T`` of shape
``[b, n - c0]``, so that it is filled straight from the rows ``Kxx[c0:c1, c0:n]`` (which equal the columns by
symmetry) and every later use of it reads contiguous rows. To factorise panel ``j``: read its rows of
``Kxx`` (adding the jitter to the diagonal), subtract ``L[c0:n, k] L[c0:c1, k]^T`` for every earlier panel
``k`` (level-3 products, streamed in column chunks), factorise the ``b x b`` diagonal block, and solve for
the rest with it. Only panel ``j``, a chunk of one earlier panel and a chunk of the stored rows are in
memory at a time. Why this one:

* it computes the same float64 factor as a dense LAPACK ``potrf`` up to rounding order (no float32
  factor to refine, which could fail to converge on the ill-conditioned noise-free kernels of the paper);
* left-looking writes each panel once and only reads afterwards, so a kill at any moment loses at most the
  panel being computed: finished panels are kept on disk with a record of how many are done and the CRC-32
  of each, and the next run checks them and resumes from there (from the first damaged panel, if one no longer
  matches its checksum; the store itself is only ever read);
* the flops are the dense ``n^3 / 3`` in matrix-matrix products of panel width, and the extra disk traffic
  is about ``n^3 / (6 b)`` values read, mostly from the page cache;
* when the whole packed factor fits the budget, the same code keeps the panels in memory: about half of one
  float64 copy of ``Kxx`` in all, nothing written to disk.

Its answer is tested against a dense float64 Cholesky solve. ``dask.array``'s Cholesky was not used: it
keeps its blocks in worker memory, so it does not bound memory on one machine without a spilling setup of
its own, and needs the whole matrix as a Dask array.

Example::

    >>> fac = BlockedCholesky.factor(read_rows, n, jitter_candidates=[0.0], memory_budget=2**30)
    >>> A = fac.solve(Y)          # (L L^T)^{-1} Y, float64
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .memory import available_memory, format_bytes, freed_memory_returned
from .progress import progress_bar

__all__ = [
    "default_memory_budget",
    "NotPositiveDefinite",
    "BudgetTooSmall",
    "BlockedCholesky",
    "plan_panel_width",
]

RowReader = Callable[[int, int, int, np.ndarray], None]
"""``read(r0, r1, c0, out)`` fills ``out`` (``[r1 - r0, w]``, float32) with ``K[r0:r1, c0:c0 + w]``."""


def default_memory_budget() -> int:
    """The classifier's default budget: 60% of the memory available now (2 GB when that is unknown)."""
    avail = available_memory()
    return int(0.6 * avail) if avail else 2 * 10**9


class NotPositiveDefinite(RuntimeError):
    """The matrix is not positive definite to float64 precision: its factorisation broke down."""

    def __init__(self, jitter: float, column: int) -> None:
        self.jitter = jitter
        self.column = column
        super().__init__(f"the factorisation broke down at column {column} with jitter {jitter:.3g}")


class BudgetTooSmall(ValueError):
    """The memory budget cannot hold even a narrow panel of the factor."""


# --------------------------------------------------------------------------------------------------------------
# the plan


def plan_panel_width(n: int, memory_budget: int, *, in_memory: bool | None = None) -> tuple[int, bool]:
    """Panel width ``b`` and whether the factor is kept in memory, for an ``n x n`` matrix and a byte budget.

    Kept in memory when the packed factor (about ``n (n + b) / 2`` float64 values) and the working buffers fit
    in the budget. Otherwise panels live on disk and the budget holds the current panel plus the streamed
    chunks: the panel ``[b, n]`` takes most of it, and ``b`` is the widest that fits with its buffers.

    :raises BudgetTooSmall: when the budget cannot hold a panel of width 1 and its buffers.
    """
    n = max(int(n), 1)
    b_mem = int(min(n, max(64, min(2048, n // 8 or 1))))
    packed = _packed_values(n, b_mem) * 8
    buffers = _buffer_bytes(n, b_mem, in_memory=True)
    fits = packed + buffers <= _HEADROOM * memory_budget
    if in_memory is None:
        in_memory = fits
    if in_memory:
        if not fits:
            raise BudgetTooSmall(
                f"the factor of a {n}x{n} matrix needs {format_bytes(packed + buffers)} in memory; the budget is "
                f"{format_bytes(memory_budget)}"
            )
        return b_mem, True
    # disk: panel [b, n] float64 plus streamed chunks (see _buffer_bytes); b as wide as the budget allows,
    # at most a quarter of n (keeps the streamed chunks small) and 4096 (wider gains nothing in the products)
    narrowest = min(n, _MIN_PANEL)  # narrower panels would reread the factor too many times
    need = int(_buffer_bytes(n, narrowest, in_memory=False) / _HEADROOM)
    if need > memory_budget:
        raise BudgetTooSmall(
            f"a memory budget of {format_bytes(memory_budget)} is too small for the blocked factorisation of a "
            f"{n}x{n} matrix: it needs at least {format_bytes(need)} (a panel of {narrowest} columns and its buffers)"
        )
    lo, hi = narrowest, max(narrowest, min(n // 4, 4096))
    while lo < hi:  # the widest panel whose buffers fit
        mid = (lo + hi + 1) // 2
        fit = _buffer_bytes(n, mid, in_memory=False) <= _HEADROOM * memory_budget
        lo, hi = (mid, hi) if fit else (lo, mid - 1)
    return lo, False


_MIN_PANEL = 32


def _edges(n: int, b: int) -> list[int]:
    return list(range(0, n, b)) + [n]


def _packed_values(n: int, b: int) -> int:
    edges = _edges(n, b)
    return sum((c1 - c0) * (n - c0) for c0, c1 in pairwise(edges))


def _chunk_cols(n: int) -> int:
    """Columns of the chunks streamed while factorising: an eighth of a row, at least 128."""
    return int(min(n, max(128, n // 8)))


def _solve_cols(n: int, b: int) -> int:
    """Columns of the panel chunks read by the solves: never narrower than a panel (its diagonal block)."""
    return int(min(n, max(b, _chunk_cols(n))))


_HEADROOM = 0.9  # the planned buffers take at most this share of the budget; the rest is for library temporaries


def _buffer_bytes(n: int, b: int, *, in_memory: bool) -> int:
    """Working memory besides the stored panels, counted for the widest panel ``b``.

    Factorising: the float32 rows as read (``b x cols``), the product of an update chunk, and the triangular
    solve's output and its column-major copy (``b x cols`` float64 each). On disk also the panel itself
    (``b x n``), its rows of an earlier panel (``b x b``) and the earlier panel's chunk (``b x cols``).
    """
    cols = _chunk_cols(n)
    # + the diagonal block: a contiguous copy, its factor and that factor transposed (b x b each)
    work = b * cols * 4 + 3 * b * cols * 8 + 3 * b * b * 8
    if in_memory:
        return work
    return b * n * 8 + b * b * 8 + b * cols * 8 + work


# --------------------------------------------------------------------------------------------------------------
# panel storage


class _MemoryPanels:
    """Panels as arrays in memory."""

    on_disk = False

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = shapes
        self._panels = [np.empty(shape) for shape in shapes]
        self.done = 0

    def work(self, j: int) -> np.ndarray:
        return self._panels[j]

    def commit(self, j: int, panel: np.ndarray) -> None:
        self.done = j + 1

    def read(self, j: int, col0: int, col1: int, out: np.ndarray | None = None) -> np.ndarray:
        return self._panels[j][:, col0:col1]  # a view: no buffer needed

    def reset(self) -> None:
        self.done = 0

    def close(self, *, delete: bool) -> None:
        self._panels = []


class _DiskPanels:
    """Panels in one float64 file, one after another (row-major), with a JSON record of those finished and the
    CRC-32 of each (checked by :meth:`first_damaged` before a run resumes from them).

    Reads and writes go through ``pread``/``pwrite`` into our own buffers, never ``mmap``, so that the pages
    read count against the page cache, not against this process's memory.
    """

    on_disk = True

    def __init__(self, folder: Path, shapes: list[tuple[int, int]], key: dict[str, Any]) -> None:
        self.folder = folder
        self.shapes = shapes
        self.offsets = np.concatenate([[0], np.cumsum([r * c for r, c in shapes])]).astype(np.int64) * 8
        self.key = key
        folder.mkdir(parents=True, exist_ok=True)
        self.data_path = folder / "factor.f64"
        self.record_path = folder / "progress.json"
        self.done = 0
        self.crcs: list[int] = []
        record = self._load_record()
        if record is not None and record.get("key") == key and self.data_path.exists():
            try:
                self.crcs = [int(c) for c in record.get("crc", [])]
                self.done = int(record.get("done", 0))
            except (TypeError, ValueError):
                self.crcs, self.done = [], 0
            if not 0 <= self.done <= min(len(self.crcs), len(shapes)):
                self.done, self.crcs = 0, []  # a record without a checksum per finished panel: start again
            del self.crcs[self.done :]
        else:
            with suppress(FileNotFoundError):
                self.record_path.unlink()
            with open(self.data_path, "wb"):
                pass
        self._fd = os.open(self.data_path, os.O_RDWR)
        self._work = np.empty(max((r * c for r, c in shapes), default=0))

    @staticmethod
    def recorded_width(folder: Path, n: int, source: dict[str, Any]) -> int | None:
        """The panel width of finished panels in ``folder`` for this matrix, if there are any."""
        try:
            record = json.loads((folder / "progress.json").read_text())
            key = record["key"]
            if key["n"] == n and key["source"] == source and int(record["done"]) > 0:
                return int(key["b"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _load_record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None

    def work(self, j: int) -> np.ndarray:
        rows, cols = self.shapes[j]
        return self._work[: rows * cols].reshape(rows, cols)

    def commit(self, j: int, panel: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(panel)).cast("B")
        offset, written = int(self.offsets[j]), 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], offset + written)
        os.fsync(self._fd)
        self.done = j + 1
        del self.crcs[j:]
        self.crcs.append(zlib.crc32(data) & 0xFFFFFFFF)
        self._write_record()

    def _write_record(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done, "crc": self.crcs}))
        os.replace(tmp, self.record_path)

    def first_damaged(self) -> int | None:
        """The first finished panel whose bytes on disk no longer match their checksum (or are missing)."""
        raw = self._work.view(np.uint8)  # the largest panel's size: each panel is read in one piece
        for j in range(self.done):
            begin, end = int(self.offsets[j]), int(self.offsets[j + 1])
            crc = 0
            try:
                for start in range(begin, end, len(raw)):
                    piece = raw[: min(len(raw), end - start)]
                    self._pread_into(piece, start)
                    crc = zlib.crc32(piece, crc)
            except OSError:
                return j  # the file is shorter than its finished panels
            if crc & 0xFFFFFFFF != self.crcs[j]:
                return j
        return None

    def truncate(self, j: int) -> None:
        """Forget panels ``j, j + 1, ...``: they are computed again."""
        self.done = min(self.done, j)
        del self.crcs[self.done :]
        self._write_record()

    def read(self, j: int, col0: int, col1: int, out: np.ndarray | None = None) -> np.ndarray:
        rows, cols = self.shapes[j]
        width = col1 - col0
        if out is None:
            out = np.empty((rows, width))
        out = out[: rows * width].reshape(rows, width) if out.ndim == 1 else out
        if width == cols:
            self._pread_into(out.reshape(-1), int(self.offsets[j]))
        else:
            for r in range(rows):
                self._pread_into(out[r], int(self.offsets[j]) + (r * cols + col0) * 8)
        return out

    def _pread_into(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                raise OSError(f"{self.data_path} is shorter than expected (a damaged factor file)")
            got += n

    def reset(self) -> None:
        self.done = 0
        with suppress(FileNotFoundError):
            self.record_path.unlink()

    def close(self, *, delete: bool) -> None:
        with suppress(OSError):
            os.close(self._fd)
        self._work = np.empty(0)
        if delete:
            shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# factorisation and solves


@dataclass
class FactorReport:
    """What one factorisation did."""

    jitter: float
    attempts: list[float]
    seconds: float
    panel_width: int
    on_disk: bool
    resumed_panels: int


class BlockedCholesky:
    """The lower Cholesky factor of ``K + jitter I`` held as column panels, in memory or on disk.

    Make one with :meth:`factor`; then :meth:`solve` gives ``(K + jitter I)^{-1} Y`` and :meth:`forward` gives
    ``L^{-1} B`` (for predictive variances). :meth:`close` frees the panels (and deletes the disk copy).
    """

    def __init__(self, n: int, b: int, panels: _MemoryPanels | _DiskPanels, report: FactorReport) -> None:
        self.n = n
        self.b = b
        self._panels = panels
        self.report = report
        self.edges = _edges(n, b) if n else [0]

    @property
    def jitter(self) -> float:
        """The absolute jitter added to the diagonal."""
        return self.report.jitter

    # ---- factorisation

    @classmethod
    def factor(
        cls,
        read_rows: RowReader,
        n: int,
        *,
        jitter_candidates: Sequence[float] = (0.0,),
        memory_budget: int | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
        source_key: dict[str, Any] | None = None,
        in_memory: bool | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> BlockedCholesky:
        """Factorise ``K + jitter I`` for the first jitter in ``jitter_candidates`` that succeeds.

        :param read_rows: fills a buffer with rows of ``K`` (see :data:`RowReader`); only the part on and above
            the diagonal is read.
        :param n: the matrix size.
        :param jitter_candidates: absolute jitters to try in order (a breakdown restarts with the next).
        :param memory_budget: bytes for the panels and buffers (default :func:`default_memory_budget`).
        :param scratch_dir: folder for the panels when they do not fit the budget (required then).
        :param source_key: identifies ``K`` (e.g. the store's path, size and time); a scratch folder holding
            finished panels of the same key and jitter is resumed.
        :param in_memory: force panels in memory (``True``) or on disk (``False``); default: by the budget.
        :param progress: show a progress bar in floating-point operations, with its ETA.
        :param log: called with one-line notes (a resumed factor, a jitter retry).
        :raises NotPositiveDefinite: when every jitter fails (its ``jitter`` is the last one tried).
        :raises BudgetTooSmall: when the budget cannot hold a panel.
        """
        budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        if n == 0:
            return cls(0, 1, _MemoryPanels([]), FactorReport(float(jitter_candidates[0]), [], 0.0, 1, False, 0))
        b, mem = plan_panel_width(n, budget, in_memory=in_memory)
        if not mem and scratch_dir is not None:
            # an interrupted factorisation keeps its panel width if this budget can hold it (the default budget
            # follows the memory available, which changes between runs)
            earlier = _DiskPanels.recorded_width(Path(scratch_dir), n, source_key or {})
            if earlier and earlier != b and _buffer_bytes(n, earlier, in_memory=False) <= _HEADROOM * budget:
                b = earlier
        edges = _edges(n, b)
        shapes = [(c1 - c0, n - c0) for c0, c1 in pairwise(edges)]
        candidates = [float(j) for j in jitter_candidates]
        started = time.perf_counter()
        attempts: list[float] = []
        resumed = 0
        panels: _MemoryPanels | _DiskPanels | None = None
        # jitters that already failed for this matrix in an interrupted run are not tried again
        failed_path = None if mem or scratch_dir is None else Path(scratch_dir) / "failed.json"
        failed_key = {"n": n, "b": b, "source": source_key or {}}
        failed: list[float] = []
        if failed_path is not None:
            with suppress(OSError, ValueError, AttributeError):
                record = json.loads(failed_path.read_text())
                if record.get("key") == failed_key:
                    failed = [float(x) for x in record.get("failed", [])]
        try:
            for jitter in candidates:
                attempts.append(jitter)
                if jitter in failed and jitter != candidates[-1]:
                    if log:
                        log(f"skipping jitter {jitter:.3g}: it failed for this matrix in an earlier run")
                    continue
                if mem:
                    panels = _MemoryPanels(shapes) if panels is None else panels
                    panels.reset()
                else:
                    if scratch_dir is None:
                        raise BudgetTooSmall(
                            f"the factor of a {n}x{n} matrix ({format_bytes(_packed_values(n, b) * 8)}) does not fit "
                            f"a memory budget of {format_bytes(budget)}, and no scratch folder was given for it"
                        )
                    key = {"n": n, "b": b, "jitter": jitter, "source": source_key or {}}
                    if panels is not None:
                        panels.close(delete=False)
                    panels = _DiskPanels(Path(scratch_dir), shapes, key)
                    damaged = panels.first_damaged() if panels.done else None
                    if damaged is not None:
                        if log:
                            log(
                                f"panel {damaged + 1} of {len(shapes)} of the factor in {scratch_dir} no longer "
                                "matches its checksum: computing the factor again from that panel on"
                            )
                        panels.truncate(damaged)
                    resumed = panels.done
                    if resumed and log:
                        log(f"resuming the factorisation: {resumed} of {len(shapes)} panels already on disk")
                try:
                    with freed_memory_returned():
                        _factor_panels(read_rows, n, edges, panels, jitter, progress)
                except NotPositiveDefinite as exc:
                    if failed_path is not None:
                        failed.append(jitter)
                        tmp = failed_path.with_suffix(".tmp")
                        tmp.write_text(json.dumps({"key": failed_key, "failed": failed}))
                        os.replace(tmp, failed_path)
                    if log and jitter != candidates[-1]:
                        log(f"Kxx + {jitter:.3g} I is not positive definite (column {exc.column}); trying more jitter")
                    continue
                report = FactorReport(jitter, attempts, time.perf_counter() - started, b, not mem, resumed)
                return cls(n, b, panels, report)
        except BaseException:
            if panels is not None:
                panels.close(delete=False)
            raise
        if panels is not None:
            panels.close(delete=True)
        raise NotPositiveDefinite(candidates[-1], -1)

    # ---- solves

    def _panels_in_order(self, reverse: bool = False) -> Iterator[tuple[int, int, int]]:
        spans = list(enumerate(pairwise(self.edges)))
        for j, (c0, c1) in reversed(spans) if reverse else spans:
            yield j, c0, c1

    def _chunk(self, j: int) -> Iterator[tuple[int, np.ndarray]]:
        """Column chunks of panel ``j`` (all of it in memory; bounded pieces from disk)."""
        rows, cols = self._panels.shapes[j]
        step = _solve_cols(self.n, self.b) if self._panels.on_disk else cols
        buf = np.empty(rows * step) if self._panels.on_disk else None
        for s in range(0, cols, step):
            yield s, self._panels.read(j, s, min(cols, s + step), buf)

    def forward(self, B: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``L^{-1} B`` (float64, ``B`` of shape ``[n]`` or ``[n, k]``; ``B`` is not modified)."""
        X = torch.as_tensor(B, dtype=torch.float64).clone()
        vector = X.ndim == 1
        X = X[:, None] if vector else X
        for j, c0, c1 in self._panels_in_order():
            width = c1 - c0
            for s, chunk in self._chunk(j):
                Lt = torch.from_numpy(chunk)
                if s == 0:
                    # diagonal block: Lt[:, :width] = L_jj^T (upper)
                    X[c0:c1] = torch.linalg.solve_triangular(Lt[:, :width].T, X[c0:c1], upper=False)
                    below = Lt[:, width:]
                    if below.shape[1]:
                        X[c1 : c0 + chunk.shape[1]] -= below.T @ X[c0:c1]
                else:
                    X[c0 + s : c0 + s + chunk.shape[1]] -= Lt.T @ X[c0:c1]
        return X[:, 0] if vector else X

    def backward(self, Z: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``L^{-T} Z`` (float64)."""
        X = torch.as_tensor(Z, dtype=torch.float64).clone()
        vector = X.ndim == 1
        X = X[:, None] if vector else X
        for j, c0, c1 in self._panels_in_order(reverse=True):
            width = c1 - c0
            rhs = X[c0:c1].clone()
            diag = None
            for s, chunk in self._chunk(j):
                Lt = torch.from_numpy(chunk)
                if s == 0:
                    diag = Lt[:, :width].clone()
                    if chunk.shape[1] > width:
                        rhs -= Lt[:, width:] @ X[c1 : c0 + chunk.shape[1]]
                else:
                    rhs -= Lt @ X[c0 + s : c0 + s + chunk.shape[1]]
            X[c0:c1] = torch.linalg.solve_triangular(diag, rhs, upper=True)
        return X[:, 0] if vector else X

    def solve(self, Y: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(K + jitter I)^{-1} Y`` in float64."""
        return self.backward(self.forward(Y))

    def close(self, *, delete: bool = True) -> None:
        """Free the panels (and delete the scratch folder unless ``delete=False``)."""
        self._panels.close(delete=delete)

    def __enter__(self) -> BlockedCholesky:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flops(edges: list[int], n: int) -> list[float]:
    """Floating-point work of each panel (updates, diagonal factor, triangular solve)."""
    out = []
    for c0, c1 in pairwise(edges):
        b, m = c1 - c0, n - c0
        out.append(2.0 * b * m * c0 + b**3 / 3 + b * b * (m - b))
    return out


def _factor_panels(
    read_rows: RowReader,
    n: int,
    edges: list[int],
    panels: _MemoryPanels | _DiskPanels,
    jitter: float,
    progress: bool,
) -> None:
    """Compute panels ``panels.done, ...`` of the factor of ``K + jitter I`` (see the module docstring)."""
    flops = _flops(edges, n)
    bar = progress_bar(progress, sum(flops), "Cholesky", "flop", initial=sum(flops[: panels.done]))
    b_max = max(c1 - c0 for c0, c1 in pairwise(edges))
    cols = _chunk_cols(n)
    read32 = np.empty(b_max * cols, dtype=np.float32)
    chunk_buf = np.empty(b_max * cols) if panels.on_disk else None
    try:
        for j, (c0, c1) in enumerate(pairwise(edges)):
            if j < panels.done:
                continue
            width, m = c1 - c0, n - c0
            P = panels.work(j)  # [width, m]: K[c0:c1, c0:n], then L[c0:n, c0:c1]^T
            for s in range(0, m, cols):
                e = min(m, s + cols)
                buf = read32[: width * (e - s)].reshape(width, e - s)
                read_rows(c0, c1, c0 + s, buf)
                if not np.isfinite(buf).all():
                    bad = int(np.argwhere(~np.isfinite(buf))[0][0]) + c0
                    raise ValueError(f"the matrix contains NaN or infinite values (row {bad})")
                P[:, s:e] = buf
            P[np.arange(width), np.arange(width)] += jitter
            Pt = torch.from_numpy(P)
            for k in range(j):
                k0 = edges[k]
                # rows c0..n of panel k (its columns c0 - k0 onward); first its rows c0..c1 (the "top")
                off = c0 - k0
                top = torch.from_numpy(panels.read(k, off, off + width))  # a new array from disk, a view in memory
                for s in range(0, m, cols):
                    e = min(m, s + cols)
                    part = panels.read(k, off + s, off + e, chunk_buf)
                    Pt[:, s:e].addmm_(top.T, torch.from_numpy(part), alpha=-1.0)
                del top
            diag = Pt[:, :width]
            L, info = torch.linalg.cholesky_ex(diag)
            if int(info) != 0 or not bool(torch.isfinite(L).all()):
                raise NotPositiveDefinite(jitter, c0 + max(int(info) - 1, 0))
            U = L.T.contiguous()
            for s in range(width, m, cols):
                e = min(m, s + cols)
                Pt[:, s:e] = torch.linalg.solve_triangular(L, Pt[:, s:e], upper=False)
            Pt[:, :width] = U
            panels.commit(j, P)
            if bar is not None:
                bar.update(flops[j])
    finally:
        if bar is not None:
            bar.close()


def source_key(path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An identity of a file for resuming: its resolved path, size and modification time (plus ``extra``)."""
    p = Path(path).resolve()
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if extra:
        key["extra"] = extra
    return key


def scratch_folder(path: str | os.PathLike[str]) -> Path:
    """The default scratch folder of a store: ``<store>.factor`` beside it."""
    p = Path(path).resolve()
    return p.with_name(p.name + ".factor")
