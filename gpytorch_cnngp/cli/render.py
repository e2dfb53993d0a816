"""What ``cnngp`` prints and writes: status lines, seconds, counts and percentages, the markdown results table,
the rows of ``results.json`` and the dual coefficients.

Every result file is written whole or not at all (a temporary file beside it, flushed to disk, then renamed over
it), so a full disk or a kill leaves the previous file as it was; ``results.json`` and ``results.md`` are
rewritten under a lock on their folder, from the rows on disk at that moment, so that runs sharing a work folder
keep each other's rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..store import _fsync_dir
from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: results are written without the lock
    fcntl = None  # type: ignore[assignment]

_PAPER_NAMES = {
    "convnet_gp": "ConvNet GP",
    "residual_cnn_gp": "Residual CNN GP",
    "resnet32_gp": "ResNet GP",
    "pooled_cnn_gp": "Pooled CNN GP (ours)",
    "pooled_cnn_gp_ml2": "Pooled CNN GP, ML-II variances (ours)",
    "myrtle5_gp": "Myrtle-5 GP (Shankar et al.)",
    "myrtle7_gp": "Myrtle-7 GP (Shankar et al.)",
    "myrtle10_gp": "Myrtle-10 GP (Shankar et al.)",
}
_DATA_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400 * 2:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 86400:.1f} days"


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file in the same folder, which is flushed
    to disk and then renamed over ``path``. On any failure the temporary file is removed and the old ``path``
    (if any) is left as it was.

    :raises UserError: naming the file and the cause (e.g. no space left on the device).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _file_mode(path))  # mkstemp's files are private; results get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)  # the rename itself reaches the disk with the folder's entry
    except OSError as exc:
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path}: {exc.strerror or exc}; {kept}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _file_mode(path: Path) -> int:
    """The permissions of the file at ``path``, or for a new one those the umask gives."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`_write_atomic`)."""
    _write_atomic(path, lambda fh: fh.write(text.encode()))


def _save_dual(path: Path, result: dict[str, Any]) -> None:
    """The dual coefficients ``A`` and the predictions, so that predictions are ``argmax(K(test, train) @ A)``."""

    def write(fh: IO[bytes]) -> None:
        buffer = io.BytesIO()  # savez seeks in its file; the temporary file gets the finished archive
        np.savez_compressed(
            buffer,
            A=result["A"],
            val_predictions=result["val_predictions"],
            test_predictions=result["test_predictions"],
        )
        fh.write(buffer.getbuffer())

    _write_atomic(path, write)
    _say(f"wrote {path} (dual coefficients A [{result['A'].shape[0]}, {result['A'].shape[1]}] and predictions)")


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("dataset", "config", "split", "n_train", "n_val", "n_test", "dtype"))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s results (a ``.results.lock`` file there) for the block."""
    try:
        fd = os.open(folder / ".results.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot lock the results in {folder}: {exc.strerror or exc}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another run writes its rows
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _record_rows(workdir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``rows`` to ``workdir``'s ``results.json`` and rewrite ``results.md``; return every row.

    Under the folder's lock the file is read again, so the rows another run wrote since this one started are
    kept; a row of the same configuration, data and sizes is replaced by the newer one.
    """
    results_json = workdir / "results.json"
    with _locked(workdir):
        previous = _read_results(results_json)
        keys = {_row_key(r) for r in rows}
        merged = [r for r in previous if _row_key(r) not in keys] + rows
        _write_text(results_json, json.dumps(merged, indent=2) + "\n")
        _write_text(workdir / "results.md", _markdown(merged))
    return merged


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | data | split | n_train | n_val | n_test | validation error | test error | classifier "
        "| paper validation | paper test | kernel time | solve time | device |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper_val, paper_test = r.get("paper_val_error"), r.get("paper_test_error")
        lines.append(
            f"| {_PAPER_NAMES.get(r['config'], r['config'])} | {_DATA_NAMES.get(r.get('dataset', 'mnist'), '?')} "
            f"| {r['split']} | {r['n_train']} | {r['n_val']} "
            f"| {r['n_test']} | {_pct(r['val_error'])} | {_pct(r['test_error'])} | {_classifier(r)} "
            f"| {_pct(paper_val)} "
            f"| {_pct(paper_test)} | {_fmt_seconds(_kernel_time(r))} | {_fmt_seconds(r['solve_seconds'])} "
            f"| {r['device']} |"
        )
    notes = [
        "",
        "Errors are fractions of the validation and test images misclassified, shown in percent. The paper's "
        "numbers (Garriga-Alonso et al., ICLR 2019) use 50000 training, 10000 validation and 10000 test images "
        "(split mnist_as_tf); runs on a subset are not comparable to them. Kernel time is the compute time summed "
        "over all blocks (and over resumed runs). Classifier: the paper's noise-free one, or a ridge term (times "
        "the mean diagonal of Kxx) chosen from the terms listed by validation error alone; the solve time then "
        "sums one factorisation per term.",
    ]
    return "\n".join(lines + notes) + "\n"


def _classifier(row: dict[str, Any]) -> str:
    if row.get("ridge") is None:
        return "as published"
    grid = ", ".join(f"{r['lambda']:g}" for r in row.get("ridges") or [])
    return f"ridge {row['ridge']:g} (of {grid})" if grid else f"ridge {row['ridge']:g}"


def _kernel_time(row: dict[str, Any]) -> float:
    """The kernel time a row shows: ``kernel_seconds``, or in rows written before it meant this run's wall time,
    their ``kernel_compute_seconds``."""
    value = row.get("kernel_compute_seconds", row.get("kernel_seconds"))
    return math.nan if value is None else float(value)


def _read_results(path: Path) -> list[dict[str, Any]]:
    """Earlier rows of ``results.json``; a file that cannot be read as rows is refused, never overwritten."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable results file ({exc}); move it away and run again") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} does not hold a list of result rows; move it away and run again")
    return rows
