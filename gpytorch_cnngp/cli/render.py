"""What ``cnngp`` prints and writes: status lines, seconds, counts and percentages, the markdown results table,
the rows of ``results.json`` and the dual coefficients."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

_PAPER_NAMES = {
    "convnet_gp": "ConvNet GP",
    "residual_cnn_gp": "Residual CNN GP",
    "resnet32_gp": "ResNet GP",
    "pooled_cnn_gp": "Pooled CNN GP (ours)",
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


def _save_dual(path: Path, result: dict[str, Any]) -> None:
    """The dual coefficients ``A`` and the predictions, so that predictions are ``argmax(K(test, train) @ A)``."""
    np.savez_compressed(
        path, A=result["A"], val_predictions=result["val_predictions"], test_predictions=result["test_predictions"]
    )
    _say(f"wrote {path} (dual coefficients A [{result['A'].shape[0]}, {result['A'].shape[1]}] and predictions)")


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("dataset", "config", "split", "n_train", "n_val", "n_test", "dtype"))


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | data | split | n_train | n_val | n_test | validation error | test error | paper validation "
        "| paper test | kernel time | solve time | device |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper_val, paper_test = r.get("paper_val_error"), r.get("paper_test_error")
        lines.append(
            f"| {_PAPER_NAMES.get(r['config'], r['config'])} | {_DATA_NAMES.get(r.get('dataset', 'mnist'), '?')} "
            f"| {r['split']} | {r['n_train']} | {r['n_val']} "
            f"| {r['n_test']} | {_pct(r['val_error'])} | {_pct(r['test_error'])} | {_pct(paper_val)} "
            f"| {_pct(paper_test)} | {_fmt_seconds(r['kernel_compute_seconds'])} | {_fmt_seconds(r['solve_seconds'])} "
            f"| {r['device']} |"
        )
    notes = [
        "",
        "Errors are fractions of the validation and test images misclassified, shown in percent. The paper's "
        "numbers (Garriga-Alonso et al., ICLR 2019) use 50000 training, 10000 validation and 10000 test images "
        "(split mnist_as_tf); runs on a subset are not comparable to them. Kernel time is the compute time summed "
        "over all blocks (and over resumed runs).",
    ]
    return "\n".join(lines + notes) + "\n"


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
