"""Plots: the matplotlib figures of the study (``scatter.png``, ``qq.png``, ``error_vs_width.png``), the axis
limits they take from the data they show (``data_limits``: every point inside its panel, log axes only for
positive values spanning more than a decade) and saving through a temporary file. Uses the non-interactive Agg
backend, chosen here before pyplot is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from scipy import stats  # noqa: E402


def data_limits(values: Sequence[np.ndarray], margin: float = 0.05) -> tuple[float, float, bool]:
    """Axis limits ``(lo, hi, log)`` that contain every finite value, with a margin.

    Log axes only when every value is positive and they span more than a decade; the margin is then
    multiplicative.
    """
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in values])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0, False
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi / lo > 10:
        f = (hi / lo) ** margin
        return lo / f, hi * f, True
    span = hi - lo
    if span <= 0:
        span = abs(hi) if hi != 0 else 1.0
    return lo - margin * span, hi + margin * span, False


def _scatter_panel(ax, x, y, err, is_diag, title: str) -> None:
    """Points ``(x, y)`` with error bars ``y +- err``; axes from the points, every point inside them."""
    # limits from the points (not the error bars, which may run off the panel: at small C they are long and
    # would squeeze the points into a corner); log axes only when the points are positive and span decades
    lo, hi, log = data_limits([x, y])
    yerr = np.vstack([np.minimum(err, y - lo) if log else err, err])  # a log axis cannot draw a bar below 0
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, zorder=0, label="y = x")
    styles = ((~is_diag, "o", "C0", "off-diagonal"), (is_diag, "s", "C3", "diagonal"))
    for mask, marker, color, label in styles:
        if mask.any():
            ax.errorbar(
                x[mask], y[mask], yerr=yerr[:, mask], fmt=marker, color=color, ms=4, lw=0.8, capsize=0, label=label
            )
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.xaxis.get_offset_text().set_fontsize(7)
    ax.yaxis.get_offset_text().set_fontsize(7)
    inside = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
    if not inside.all():
        raise AssertionError(f"{(~inside).sum()} point(s) outside the axes [{lo}, {hi}] of panel {title!r}")


def plot_scatter(results: list[dict], K: np.ndarray, path: Path, config: str) -> None:
    n = len(results)
    N = K.shape[0]
    iu = np.triu_indices(N)
    is_diag = iu[0] == iu[1]
    d = np.sqrt(np.diag(K))
    scale = np.outer(d, d)
    rho_k = K / scale
    fig, axes = plt.subplots(3, n, figsize=(3.3 * n + 0.6, 10.2), squeeze=False)
    for col, r in enumerate(results):
        m = r["matrices"]
        S, se = np.asarray(m["empirical_second_moment"]), np.asarray(m["second_moment_se"])
        rho, rho_se = np.asarray(m["empirical_correlation"]), np.asarray(m["correlation_se"])
        C, M = r["channels"], r["n_networks"]
        _scatter_panel(axes[0, col], K[iu], S[iu], 2 * se[iu], is_diag, f"C = {C} ({M} networks)\nsecond moments")
        _scatter_panel(
            axes[1, col], rho_k[iu], (S / scale)[iu], 2 * (se / scale)[iu], is_diag, "second moments / sqrt(Kii Kjj)"
        )
        off = ~is_diag
        if off.any():
            _scatter_panel(
                axes[2, col],
                rho_k[iu][off],
                rho[iu][off],
                2 * rho_se[iu][off],
                np.zeros(off.sum(), bool),
                "correlations (off-diagonal)",
            )
        axes[2, col].set_xlabel("kernel", fontsize=8)
    for row in range(3):
        axes[row, 0].set_ylabel("random networks (empirical)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"{config}: random networks vs kernel ({N} MNIST test digits; error bars: 2 Monte-Carlo SE)", fontsize=11
    )
    fig.tight_layout()
    _save(fig, path)


def plot_qq(results: list[dict], outputs: dict[int, np.ndarray], path: Path, config: str, n_show: int) -> None:
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 0.6, 3.9), squeeze=False)
    for col, r in enumerate(results):
        ax = axes[0, col]
        z = outputs[r["channels"]]  # [M, N] standardised, first output channel
        M = z.shape[0]
        q = stats.norm.ppf((np.arange(1, M + 1) - 0.5) / M)
        shown = list(range(min(n_show, z.shape[1])))
        ys = [np.sort(z[:, i]) for i in shown]
        # x from the normal quantiles, y from the data: a heavy tail stretches y without squeezing x
        xlo, xhi, _ = data_limits([q])
        ylo, yhi, _ = data_limits([q, *ys])
        ax.plot(
            [min(xlo, ylo), max(xhi, yhi)], [min(xlo, ylo), max(xhi, yhi)], color="0.5", lw=1, zorder=0, label="y = x"
        )
        ks = r["gaussianity"]["ks_statistic_per_image"]
        for i, y in zip(shown, ys, strict=True):
            ax.plot(q, y, ".", ms=2.5, color=f"C{i}", label=f"image {i}: KS {ks[i]:.3f}")
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        ax.set_title(f"C = {r['channels']} ({M} networks)", fontsize=9)
        ax.set_xlabel("standard normal quantile", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", markerscale=2)
    axes[0, 0].set_ylabel("f(x) / sqrt(K(x, x)), sorted", fontsize=8)
    crit = results[-1]["gaussianity"]["ks_critical_5pct"]
    fig.suptitle(f"{config}: QQ plots of standardised outputs (KS 5% critical value {crit:.3f})", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def plot_error_vs_width(results: list[dict], path: Path, config: str) -> None:
    C = np.array([r["channels"] for r in results], dtype=float)
    series = [
        ("second moments, diagonal (max)", "C3", [r["second_moment"]["max_rel_err_diag"] for r in results]),
        ("second moments, off-diagonal (max)", "C0", [r["second_moment"]["max_rel_err_offdiag"] for r in results]),
        ("correlations (max)", "C2", [r["correlation"]["max_abs_err"] for r in results]),
        ("KS statistic (mean over images)", "C4", [r["gaussianity"]["ks_statistic_mean"] for r in results]),
    ]
    # the max over entries of pure noise is about 2-3 SE: the errors cannot be resolved below this floor
    noise = [
        ("2 x MC SE, second moments (mean)", "C0", [2 * r["second_moment"]["mean_rel_se"] for r in results]),
        ("2 x MC SE, correlations (mean)", "C2", [2 * r["correlation"]["mean_se"] for r in results]),
        ("KS 5% critical value", "C4", [r["gaussianity"]["ks_critical_5pct"] for r in results]),
    ]
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    plotted = []
    for label, color, ys in series:
        y = np.asarray(ys, dtype=float)
        ok = np.isfinite(y) & (y > 0)
        if ok.any():
            ax.plot(C[ok], y[ok], "o-", color=color, label=label)
            plotted.append(y[ok])
    for label, color, ys in noise:
        y = np.asarray(ys, dtype=float)
        ok = np.isfinite(y) & (y > 0)
        if ok.any():
            ax.plot(C[ok], y[ok], ":", color=color, lw=1.2, label=label)
            plotted.append(y[ok])
    # 1/C through the correlation error at the narrowest width
    y0 = series[2][2][0]
    if np.isfinite(y0) and y0 > 0:
        cs = np.geomspace(C.min(), C.max(), 50) if len(C) > 1 else C
        ref = y0 * C[0] / cs
        ax.plot(cs, ref, "--", color="0.4", lw=1, label="1/C reference")
        plotted.append(ref)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if plotted:
        lo, hi, _ = data_limits(plotted, margin=0.08)
        ax.set_ylim(lo, hi)
    if len(C) > 1:
        ax.set_xlim(C.min() / 1.3, C.max() * 1.3)
    ax.set_xticks(C)
    ax.set_xticklabels([str(int(c)) for c in C])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("channels C")
    ax.set_ylabel("error (kernel scale)")
    ax.set_title(f"{config}: distance to the kernel vs width", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
