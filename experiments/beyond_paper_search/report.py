"""Rows of the search and the files it writes: ``results.json``, ``results.md`` and ``validation_vs_cost.png``.

Cost is counted in kernel entries as ``cnngp table`` computes them: the upper triangle of ``Kxx`` with its
diagonal (``n (n + 1) / 2``), the cross kernels ``Kvx`` and ``Ktx`` (``(n_val + n_test) n``) and the stored
diagonals ``Kvv_diag`` and ``Ktt_diag`` (``n_val + n_test``). The search computes the same with ``n_test = 0``;
its compute seconds (summed over blocks and resumed runs, as ``results.json``'s ``kernel_seconds`` of
``cnngp table``) divided by its entries give the seconds per entry, and that times the entries of the paper's
table (50000 training, 10000 validation, 10000 test images) the projected kernel time at the paper's scale.

Files are written whole or not at all, and the rows under a lock on the work folder, so that a kill loses no
finished row and two runs sharing a folder keep each other's rows.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
from pathlib import Path
from typing import IO, Any

from gpytorch_cnngp.architectures import PAPER_RESULTS
from gpytorch_cnngp.cli.defaults import FULL_SUBSET
from gpytorch_cnngp.cli.render import _fmt_seconds, _locked, _read_results, _write_atomic, _write_text

__all__ = ["table_entries", "PAPER_ENTRIES", "machine", "row_key", "finished", "record", "markdown", "plot"]


def table_entries(n_train: int, n_val: int, n_test: int = 0) -> int:
    """Kernel entries a store of these sizes computes (see the module docstring)."""
    return n_train * (n_train + 1) // 2 + (n_val + n_test) * n_train + n_val + n_test


PAPER_ENTRIES = table_entries(FULL_SUBSET["n_train"], FULL_SUBSET["n_val"], FULL_SUBSET["n_test"])
"""Kernel entries of one configuration of the paper's table: 2,250,045,000."""


def machine() -> dict[str, Any]:
    """The CPU (model, cores) and the GPU the kernels could use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": model, "cores": os.cpu_count()}
    import torch

    out["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def row_key(row: dict[str, Any]) -> tuple:
    """What makes two rows the same result: the candidate, the data and the sizes, the dtype."""
    return tuple(row.get(k) for k in ("candidate", "dataset", "split", "n_train", "n_val", "dtype"))


def finished(rows: list[dict[str, Any]], wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The row of ``rows`` that already answers ``wanted`` (same key, kernel, parameters and lambda grid), if any."""
    for row in rows:
        if row_key(row) == row_key(wanted) and all(
            row.get(k) == wanted.get(k) for k in ("architecture", "kernel", "parameters", "lambdas")
        ):
            return row
    return None


def record(workdir: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``row`` to ``workdir``'s ``results.json`` (replacing one of the same key), rewrite ``results.md`` and the
    plot from every row on disk; return the rows."""
    results = workdir / "results.json"
    with _locked(workdir):
        rows = [r for r in _read_results(results) if row_key(r) != row_key(row)] + [row]
        _write_text(results, json.dumps(rows, indent=2) + "\n")
        _write_text(workdir / "results.md", markdown(rows))
        plot(rows, workdir / "validation_vs_cost.png")
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _hours(h: float | None) -> str:
    return "-" if h is None or not math.isfinite(h) else _fmt_seconds(3600 * h)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a table sorted by validation error (then by projected cost)."""
    ordered = sorted(rows, key=lambda r: (r["best_val_error"], r.get("projected_hours_50k") or math.inf))
    lines = [
        "| candidate | network | kernel | n_train | n_val | lambda | validation error | error per lambda "
        "| kernel time | us per entry | projected at 50k | backend | machine |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in ordered:
        per = ", ".join(f"{e['lambda']:g}: {_pct(e['val_error'])}" for e in r["val_errors"])
        m = r.get("machine") or {}
        where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
        lines.append(
            f"| {r['candidate']} | {r['architecture']} | {r['kernel'].upper()} | {r['n_train']} | {r['n_val']} "
            f"| {r['lambda']:g} | {_pct(r['best_val_error'])} | {per} | {_fmt_seconds(r['kernel_seconds'])} "
            f"| {1e6 * r['seconds_per_entry']:.3g} | {_hours(r['projected_hours_50k'])} | {r['backend']} "
            f"| {where} |"
        )
    paper = ", ".join(f"{name} {_pct(v)}" for name, (v, _) in PAPER_RESULTS.items())
    notes = [
        "",
        "Validation error: the first n_val validation images of the split, with the ridge term lambda (times the "
        "mean diagonal of Kxx; 0 is the paper's noise-free classifier) chosen on them. No test image is used. "
        f"The paper's validation errors at 50000 training images: {paper}. Kernel time: compute seconds summed over "
        "blocks; projected at 50k: seconds per entry times the entries of the paper's table "
        f"({PAPER_ENTRIES:,}: Kxx upper triangle, Kvx, Ktx and the diagonals), on the same machine.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation error against the projected kernel time at 50k (log scale), one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    xs = []
    for r in rows:
        x, y = r.get("projected_hours_50k"), 100 * r["best_val_error"]
        if x is None or not math.isfinite(x) or x <= 0:
            continue
        xs.append(x)
        marker = "s" if r["kernel"] == "ntk" else "o"
        ax.scatter([x], [y], marker=marker, color="C1" if r["kernel"] == "ntk" else "C0")
        ax.annotate(r["candidate"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 12, not 1.2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    # within a decade the minor ticks carry the only labels; across decades they would crowd the axis
    ax.xaxis.set_minor_formatter(plain if xs and max(xs) < 10 * min(xs) else matplotlib.ticker.NullFormatter())
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.set_xlabel("projected kernel time at 50k train + 10k val + 10k test (hours, this machine)")
    ax.set_ylabel("validation error (%)")
    sizes = sorted({(r["n_train"], r["n_val"]) for r in rows})
    ax.set_title(
        "Candidates on " + ", ".join(f"{n} train / {v} val" for n, v in sizes) + " (circles NNGP, squares NTK)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)

    def write(fh: IO[bytes]) -> None:
        fh.write(buffer.getbuffer())

    _write_atomic(path, write)
