"""Random finite networks against their infinite-width kernel: the paper's convergence study.

For one of the paper's architectures (``--config``) we draw many random finite networks ``model.nn(C)``
at each width ``C`` (``--channels``, default 3 10 30 100), evaluate them on a few fixed MNIST test digits,
and compare their outputs with the CNN-GP kernel ``K = model(X)`` that the outputs should follow as
``C`` grows: a centred Gaussian with covariance ``K``.

What it shows
-------------
* ``scatter.png``: one column per width. Top row, the empirical second moments ``E[f(x_i) f(x_j)]``
  against the kernel ``K_ij`` (diagonal entries as squares, off-diagonal as dots, error bars of two
  Monte-Carlo standard errors, the line ``y = x``); middle row, the same divided by
  ``sqrt(K_ii K_jj)`` (scale-free: the diagonal's kernel value is 1); bottom row, the empirical
  correlations ``S_ij / sqrt(S_ii S_jj)`` against the kernel's (off-diagonal only). Every panel takes
  its axis limits from the points it plots (min and max of kernel and empirical values, plus a 5% margin;
  long error bars may run off the panel) and uses log axes only when all values are positive and span
  more than a decade, so no point is ever outside the axes (the paper's own plot came out empty for
  covariances below 1; the ConvNet GP's kernel is ~1e12 here).
* ``qq.png``: one panel per width, QQ plots of the standardised outputs ``f(x_i) / sqrt(K_ii)`` against
  the standard normal for a few images (at infinite width they lie on ``y = x``). At finite width an
  output is Gaussian *given* the hidden layers, with a random variance, so narrow networks show heavy
  tails (an S-shaped QQ plot).
* ``error_vs_width.png``: the errors below against ``C`` on log-log axes, with a ``1/C`` reference line
  (the expected rate of the finite-width bias) and the Monte-Carlo standard error (the noise floor).
* ``summary.json`` and ``summary.md``: per width,

  - second moments: max and mean of ``|S_ij - K_ij| / sqrt(K_ii K_jj)`` (diagonal and off-diagonal
    separately) and the mean Monte-Carlo standard error on the same scale, and the largest ``|z|``,
    ``z = (S_ij - K_ij) / SE``;
  - correlations: max and mean ``|rho_ij - rho^K_ij|`` off the diagonal, with jackknife standard errors;
  - Gaussianity: the Kolmogorov-Smirnov statistic (and p-value) of each image's standardised outputs
    against N(0, 1), the 5% critical value, and the excess kurtosis (0 for a Gaussian).

Statistics
----------
A network with ``O`` output channels (``--out-channels``) gives ``S_m = f_m f_m^T / O``; its ``O`` outputs
are independent given the hidden layers, but share them, so *networks* are the independent units: ``S``
is the mean of ``S_m`` over the ``M`` networks and its standard error is their standard deviation over
``sqrt(M)``. Correlations are those of the pooled ``S`` (a ratio of means, bias O(1/M)) with jackknife
standard errors over networks. The QQ plots and the KS / kurtosis statistics use the first output of
each network only, so their ``M`` samples are independent. Networks run in float32 (accumulated in
float64), the kernel in float64.

What to expect: the ConvNet GP's diagonal is exact in expectation at every width (every ReLU acts on a
conv output, a centred Gaussian given the layers below), so its diagonal error is pure Monte-Carlo
noise; off the diagonal the error has an O(1/C) bias. The ResNet GP's identity skips feed ReLUs, so its
diagonal carries an O(1/C) bias too. The Residual CNN GP sums branches *after* a ReLU, so its finite
network does **not** converge to its kernel: its errors stay of order one at every width (see
``tests/test_monte_carlo.py``).

How to run
----------
::

    python experiments/random_nn.py                          # ConvNet GP, 28x28, C = 3 10 30 100
    python experiments/random_nn.py --config resnet32_gp     # ResNet GP (about 4 minutes)
    python experiments/random_nn.py --config residual_cnn_gp # the non-convergent case
    python experiments/random_nn.py --quick                  # smoke run: 8x8 images, C = 3 10, seconds
    python experiments/random_nn.py --image-size 14 --n-networks 1000 --channels 3 10 30 100 300

The default (8 MNIST test digits at 28x28, 300 networks per width, 16 outputs each) took about 4 minutes for
the ConvNet GP and for the ResNet GP, and 1.5 minutes for the Residual CNN GP, on 2 busy CPU cores (one
thread); almost all of it is the widest width, whose cost grows like C^2. Results go to
``experiments/output/random_nn/<config>/`` (``--out``); ``summary.json``, ``summary.md`` and the plots
are rewritten after each width finishes, so an interrupted run keeps every finished width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from scipy import stats  # noqa: E402

from gpytorch_cnngp import architectures, datasets  # noqa: E402
from gpytorch_cnngp.cli import _positive_int  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the `experiments` extra
    tqdm = None

DEFAULT_CONFIG = "convnet_gp"
DEFAULT_CHANNELS = (3, 10, 30, 100)
DEFAULT_N_IMAGES = 8
DEFAULT_N_NETWORKS = 300
DEFAULT_OUT_CHANNELS = 16
DEFAULT_IMAGE_SIZE = 28
DEFAULT_SEED = 0
#: what ``--quick`` changes (each only where the option is not given explicitly)
QUICK = {"image_size": 8, "channels": [3, 10], "n_networks": 40, "n_images": 4}

OUTPUT_ROOT = Path(__file__).resolve().parent / "output" / "random_nn"
MNIST_TEST_OFFSET = 60000  # load_mnist returns the 60k training images, then the 10k test images

# ----------------------------------------------------------------------------------------------------------------
# inputs, kernel and sampling


def load_images(n_images: int, image_size: int, images_npz: str | None, data_dir: str | None) -> dict[str, Any]:
    """The first ``n_images`` MNIST test digits as float64 ``[n, 1, image_size, image_size]`` in [0, 1].

    From the full MNIST (``datasets.load_mnist``, downloaded and verified if missing), or from an ``.npz``
    holding ``test_images`` (and optionally ``test_labels``), such as ``tests/data/mnist_sample.npz``.
    Other sizes than 28 are area-downscaled.
    """
    if images_npz is not None:
        with np.load(images_npz) as data:
            images = data["test_images"]
            labels = data["test_labels"] if "test_labels" in data else np.full(len(images), -1)
        source, first = f"{images_npz} (test_images)", 0
    else:
        images, labels = datasets.load_mnist(data_dir, progress=True)
        source, first = "MNIST official test set", MNIST_TEST_OFFSET
    available = len(images) - first
    if n_images > available:
        raise ValueError(f"--n-images {n_images}: only {available} test images in {source}")
    x = torch.as_tensor(np.asarray(images[first : first + n_images]), dtype=torch.float64)[:, None] / 255.0
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="area")
    return {
        "x": x,
        "labels": [int(v) for v in labels[first : first + n_images]],
        "indices": list(range(n_images)),  # within the test set
        "source": source,
    }


def sample_outputs(
    model,
    x: torch.Tensor,
    channels: int,
    n_networks: int,
    out_channels: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> torch.Tensor:
    """Outputs of ``n_networks`` random networks ``model.nn(channels)`` on ``x``: float64 ``[M, N, O]`` (CPU).

    The networks are drawn one after the other from one generator seeded with ``seed``. (They are evaluated
    one at a time: on a batch of a few 28x28 images, batching networks with ``torch.vmap``, as the tests do for
    tiny images, was 1.5-2x slower here.)
    """
    g = torch.Generator(device=device).manual_seed(seed)
    xf = x.to(device=device, dtype=torch.float32)
    out = torch.empty(n_networks, x.shape[0], out_channels, dtype=torch.float64)
    bar = None
    if progress and tqdm is not None:
        bar = tqdm(total=n_networks, desc=f"C={channels}", unit="net", leave=True, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for m in range(n_networks):
                net = model.nn(
                    channels,
                    in_channels=x.shape[1],
                    out_channels=out_channels,
                    generator=g,
                    dtype=torch.float32,
                    device=device,
                )
                f = net(xf)
                if f.shape != (x.shape[0], out_channels):
                    raise RuntimeError(f"unexpected network output shape {tuple(f.shape)}")
                out[m] = f.to(device="cpu", dtype=torch.float64)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ----------------------------------------------------------------------------------------------------------------
# statistics


def _corr(a: torch.Tensor) -> torch.Tensor:
    s = a.diagonal(0, -2, -1).sqrt()
    return a / (s[..., :, None] * s[..., None, :])


def analyse(f: torch.Tensor, K: torch.Tensor) -> dict[str, Any]:
    """Compare outputs ``f`` [M, N, O] with the kernel ``K`` [N, N]; see the module docstring."""
    M, N, O = f.shape
    K = K.to(torch.float64).cpu()
    S_m = torch.einsum("mio,mjo->mij", f, f) / O
    S = S_m.mean(0)
    se = S_m.std(0) / math.sqrt(M)
    d = K.diagonal().sqrt()
    scale = d[:, None] * d[None, :]
    diag = torch.eye(N, dtype=torch.bool)
    off = ~diag

    rel = (S - K) / scale
    # heavy tails: at small C a few networks carry most of E[f(x)^2] (the median is far below the mean), and
    # then the sample mean and its SE are unreliable; these two numbers flag it
    ratio_diag = S_m.diagonal(0, 1, 2) / K.diagonal()  # [M, N]
    top_share = ratio_diag.max(0).values / ratio_diag.sum(0)
    rel_se = se / scale
    z = (S - K) / se

    # correlations of the pooled second moments; jackknife over networks for their standard errors
    rho, rho_k = _corr(S), _corr(K)
    loo = _corr((S_m.sum(0) - S_m) / (M - 1))
    rho_se = ((M - 1) / M * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    corr_err = rho - rho_k

    # Gaussianity of each image's standardised output, first output channel only (independent samples)
    zs = (f[:, :, 0] / d).numpy()
    ks = [stats.kstest(zs[:, i], "norm") for i in range(N)]
    kurt = stats.kurtosis(zs, axis=0, fisher=True, bias=False)

    def fl(t) -> float:
        return float(t)

    return {
        "second_moment": {
            "max_rel_err": fl(rel.abs().max()),
            "mean_rel_err": fl(rel.abs().mean()),
            "max_rel_err_diag": fl(rel[diag].abs().max()),
            "mean_rel_err_diag": fl(rel[diag].abs().mean()),
            "max_rel_err_offdiag": fl(rel[off].abs().max()) if N > 1 else float("nan"),
            "mean_rel_err_offdiag": fl(rel[off].abs().mean()) if N > 1 else float("nan"),
            "mean_rel_err_signed_diag": fl(rel[diag].mean()),
            "mean_rel_se": fl(rel_se.mean()),
            "max_abs_z": fl(z.abs().max()),
            "median_ratio_diag": fl(ratio_diag.median(0).values.mean()),
            "largest_network_share_diag": fl(top_share.max()),
        },
        "correlation": {
            "max_abs_err": fl(corr_err[off].abs().max()),
            "mean_abs_err": fl(corr_err[off].abs().mean()),
            "mean_se": fl(rho_se[off].mean()),
            "max_abs_z": fl((corr_err[off] / rho_se[off]).abs().max()),
        },
        "gaussianity": {
            "n_samples": M,
            "ks_statistic_max": max(r.statistic for r in ks),
            "ks_statistic_mean": float(np.mean([r.statistic for r in ks])),
            "ks_pvalue_min": min(r.pvalue for r in ks),
            "ks_critical_5pct": float(stats.kstwo.ppf(0.95, M)),
            "excess_kurtosis_mean": float(np.mean(kurt)),
            "excess_kurtosis_per_image": [float(k) for k in kurt],
            "ks_statistic_per_image": [float(r.statistic) for r in ks],
        },
        "matrices": {
            "empirical_second_moment": S.tolist(),
            "second_moment_se": se.tolist(),
            "empirical_correlation": rho.tolist(),
            "correlation_se": rho_se.tolist(),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# plots


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


# ----------------------------------------------------------------------------------------------------------------
# output files


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


# ----------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Outputs of many random finite networks (model.nn) against the CNN-GP kernel: scatter and QQ "
        "plots and numeric summaries, per width C.",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"architecture (default {DEFAULT_CONFIG}), one of: {', '.join(architectures.ARCHITECTURES)}",
    )
    p.add_argument(
        "--channels",
        type=_positive_int,
        nargs="+",
        default=None,
        help=f"widths C (default {' '.join(map(str, DEFAULT_CHANNELS))})",
    )
    p.add_argument(
        "--n-images",
        type=_positive_int,
        default=None,
        help=f"first MNIST test digits used (default {DEFAULT_N_IMAGES})",
    )
    p.add_argument(
        "--n-networks",
        type=_positive_int,
        default=None,
        help=f"random networks per width (default {DEFAULT_N_NETWORKS}: about 4 min for convnet_gp on 2 CPU cores)",
    )
    p.add_argument(
        "--out-channels",
        type=_positive_int,
        default=DEFAULT_OUT_CHANNELS,
        help="outputs per network (independent given its hidden layers; default %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help=f"images are area-downscaled to this size (default {DEFAULT_IMAGE_SIZE})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default experiments/output/random_nn/<config>)"
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="width C uses seed * 1000003 + C (default %(default)s)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (explicit options win)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device for networks and kernel: cpu, cuda, cuda:1, ... (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads (default %(default)s: fastest for many small networks on a shared machine)",
    )
    p.add_argument(
        "--qq-images", type=_positive_int, default=4, help="images shown in each QQ panel (default %(default)s)"
    )
    p.add_argument(
        "--images-npz",
        default=None,
        help="take the digits from this .npz's test_images (e.g. tests/data/mnist_sample.npz) instead of MNIST",
    )
    p.add_argument("--data-dir", default=None, help="MNIST data folder (default: $CNNGP_DATA or the user cache)")
    p.add_argument("--save-outputs", action="store_true", help="also save the raw network outputs as outputs.npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    defaults = {
        "image_size": DEFAULT_IMAGE_SIZE,
        "channels": list(DEFAULT_CHANNELS),
        "n_networks": DEFAULT_N_NETWORKS,
        "n_images": DEFAULT_N_IMAGES,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.config not in architectures.ARCHITECTURES:
        parser.error(f"unknown --config {args.config!r}; choose one of: {', '.join(architectures.ARCHITECTURES)}")
    if args.n_networks < 2:
        parser.error("--n-networks must be at least 2 (standard errors need two networks)")
    if args.n_images < 2:
        parser.error("--n-images must be at least 2 (off-diagonal entries need two images)")
    args.channels = sorted(set(args.channels))
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"bad --device {args.device!r}: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available")
    if args.out is None:
        args.out = OUTPUT_ROOT / args.config
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the summary (also written to ``<out>/summary.json``)."""
    parser = build_parser()
    args = _resolve(parser.parse_args(argv), parser)
    try:
        model = architectures.ARCHITECTURES[args.config](image_size=args.image_size)
    except ValueError as exc:
        parser.error(f"--config {args.config} with --image-size {args.image_size}: {exc}")
    started = time.perf_counter()
    images = load_images(args.n_images, args.image_size, args.images_npz, args.data_dir)
    x = images["x"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        model = model.to(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            K = model(x.to(args.device)).to(device="cpu", dtype=torch.float64)
        kernel_seconds = time.perf_counter() - t
        if not torch.isfinite(K).all() or not (K.diagonal() > 0).all():
            raise RuntimeError(f"kernel has non-finite or non-positive diagonal entries:\n{K}")
        Kn = K.numpy()
        summary: dict[str, Any] = {
            "config": args.config,
            "image_size": args.image_size,
            "n_images": args.n_images,
            "image_source": images["source"],
            "image_indices": images["indices"],
            "image_labels": images["labels"],
            "out_channels": args.out_channels,
            "n_networks": args.n_networks,
            "channels": args.channels,
            "seed": args.seed,
            "device": str(args.device),
            "threads": args.threads if args.device.type == "cpu" else None,
            "quick": args.quick,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "kernel": Kn.tolist(),
            "kernel_diag": Kn.diagonal().tolist(),
            "kernel_seconds": kernel_seconds,
            "results": [],
            "complete": False,
            "pending_channels": list(args.channels),
            "plot_errors": [],
            "seconds": 0.0,
        }
        print(
            f"{args.config}: {args.n_images} images at {args.image_size}x{args.image_size}, kernel diagonal "
            f"{Kn.diagonal().min():.3g}..{Kn.diagonal().max():.3g} ({kernel_seconds:.1f} s); widths {args.channels}, "
            f"{args.n_networks} networks each; writing to {out}",
            flush=True,
        )
        standardised: dict[int, np.ndarray] = {}
        raw: dict[str, np.ndarray] = {}
        d = np.sqrt(Kn.diagonal())
        for C in args.channels:
            t = time.perf_counter()
            f = sample_outputs(
                model,
                x,
                C,
                args.n_networks,
                args.out_channels,
                args.seed * 1000003 + C,
                args.device,
                progress=not args.no_progress,
            )
            r = {"channels": C, "n_networks": args.n_networks, **analyse(f, K)}
            r["seconds"] = time.perf_counter() - t
            standardised[C] = f[:, :, 0].numpy() / d
            summary["results"].append(r)
            summary["pending_channels"].remove(C)
            summary["complete"] = not summary["pending_channels"]
            summary["seconds"] = time.perf_counter() - started
            if args.save_outputs:
                raw[f"C{C}"] = f.to(torch.float32).numpy()
                np.savez(out / "outputs.npz", kernel=Kn, **raw)
            write_outputs(summary, standardised, out, Kn, args.qq_images)
            m, c, g = r["second_moment"], r["correlation"], r["gaussianity"]
            print(
                f"C={C}: second moments max rel. err diag {m['max_rel_err_diag']:.4f} "
                f"off {m['max_rel_err_offdiag']:.4f} "
                f"(SE {m['mean_rel_se']:.4f}); correlations max err {c['max_abs_err']:.4f} (SE {c['mean_se']:.4f}); "
                f"KS mean {g['ks_statistic_mean']:.3f} (5% crit {g['ks_critical_5pct']:.3f}); "
                f"excess kurtosis {g['excess_kurtosis_mean']:.2f}; {r['seconds']:.1f} s",
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    print(f"done in {summary['seconds']:.0f} s: {out}", flush=True)
    return summary


if __name__ == "__main__":
    main()
