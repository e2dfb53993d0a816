"""Output files: ``summary.json`` (JSON-safe: non-finite floats become null) and ``summary.md`` (one table row
per width), each written atomically, then the three plots; a plot that fails is reported in ``plot_errors`` and
on stderr instead of losing the sampled widths.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from .plots import plot_error_vs_width, plot_qq, plot_scatter, plt  # plt: pyplot, already on the Agg backend


def _clean(obj):
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")


def summary_markdown(summary: dict) -> str:
    s = summary
    lines = [
        f"# Random finite networks vs the kernel: `{s['config']}`",
        "",
        f"{s['n_images']} MNIST test digits at {s['image_size']}x{s['image_size']} ({s['image_source']}), "
        f"{s['out_channels']} outputs per network, seed {s['seed']}, device {s['device']}. "
        f"Kernel diagonal K(x, x): {_fmt(min(s['kernel_diag']))} to {_fmt(max(s['kernel_diag']))}.",
        "",
        "Errors are on the kernel's scale: second moments as |S_ij - K_ij| / sqrt(K_ii K_jj), correlations "
        "as |rho_ij - rho^K_ij| (off-diagonal). SE: Monte-Carlo standard error (mean over entries). KS: "
        "Kolmogorov-Smirnov statistic of f(x) / sqrt(K(x, x)) against N(0, 1), first output of each network "
        "(mean and max over images; the 5% critical value is given). Kurtosis: excess kurtosis of the "
        "standardised outputs (0 for a Gaussian), mean over images. Heavy tails: the median over networks of "
        "one network's f(x)^2 / K(x, x) (mean over images; about 1 - 2/(3 O) for Gaussian outputs) and the largest "
        "share of the sum of f(x)^2 held by a single network (max over images; ~1/M when no network dominates). "
        "Where the median is far below 1 and one network holds a large share, E[f(x)^2] is carried by rare "
        "networks: the sample mean then falls short of it and the SE understates the error.",
        "",
        "| C | networks | 2nd mom. max err (diag) | 2nd mom. max err (off) | 2nd mom. mean err | 2nd mom. SE | "
        "max abs z | median f^2/K | top share | corr. max err | corr. mean err | corr. SE | KS mean (max) | "
        "KS 5% crit. | kurtosis | time (s) |",
        "|---:" * 16 + "|",
    ]
    for r in s["results"]:
        m, c, g = r["second_moment"], r["correlation"], r["gaussianity"]
        lines.append(
            f"| {r['channels']} | {r['n_networks']} | {_fmt(m['max_rel_err_diag'])} | {_fmt(m['max_rel_err_offdiag'])} "
            f"| {_fmt(m['mean_rel_err'])} | {_fmt(m['mean_rel_se'])} | {_fmt(m['max_abs_z'], 2)} "
            f"| {_fmt(m['median_ratio_diag'])} | {_fmt(m['largest_network_share_diag'])} "
            f"| {_fmt(c['max_abs_err'])} | {_fmt(c['mean_abs_err'])} | {_fmt(c['mean_se'])} "
            f"| {_fmt(g['ks_statistic_mean'])} ({_fmt(g['ks_statistic_max'])}) | {_fmt(g['ks_critical_5pct'])} "
            f"| {_fmt(g['excess_kurtosis_mean'], 2)} | {r['seconds']:.0f} |"
        )
    lines.append("")
    if s["config"] == "residual_cnn_gp":
        lines += [
            "The Residual CNN GP sums branches after a ReLU: its finite network is *not* expected to converge "
            "to this kernel: its second-moment errors stay of order one and do not shrink with width.",
            "",
        ]
    if not s["complete"]:
        lines += [f"**Incomplete run**: widths still to do: {s['pending_channels']}.", ""]
    lines += ["Plots: `scatter.png`, `qq.png`, `error_vs_width.png`.", ""]
    return "\n".join(lines)


def write_outputs(summary: dict, outputs: dict[int, np.ndarray], out: Path, K: np.ndarray, n_qq: int) -> None:
    """summary.json and summary.md first (they hold the numbers), then the plots."""
    _write_atomic(out / "summary.json", json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
    _write_atomic(out / "summary.md", summary_markdown(summary))
    results = summary["results"]
    plots = (
        ("scatter.png", lambda p: plot_scatter(results, K, p, summary["config"])),
        ("qq.png", lambda p: plot_qq(results, outputs, p, summary["config"], n_qq)),
        ("error_vs_width.png", lambda p: plot_error_vs_width(results, p, summary["config"])),
    )
    errors = []
    for name, make in plots:
        try:
            make(out / name)
        except Exception:  # a broken plot must not lose the sampling: report it and carry on
            plt.close("all")
            msg = traceback.format_exc()
            print(f"warning: could not draw {name}:\n{msg}", file=sys.stderr)
            errors.append(f"{name}: {msg.strip().splitlines()[-1]}")
    if errors != summary.get("plot_errors", []):
        summary["plot_errors"] = errors
        _write_atomic(out / "summary.json", json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
