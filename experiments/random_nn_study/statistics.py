"""Statistics: compare sampled network outputs ``[M, N, O]`` with the kernel ``K`` ``[N, N]``. Second moments
(pooled over networks, networks as the independent units, Monte-Carlo standard errors), correlations (jackknife
standard errors over networks) and Gaussianity of the standardised first outputs (Kolmogorov-Smirnov, excess
kurtosis), returned as the nested dictionary that ``summary.json`` stores per width. The reasoning behind each
number is in the "Statistics" section of ``experiments/random_nn.py``'s docstring.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats


def _corr(a: torch.Tensor) -> torch.Tensor:
    s = a.diagonal(0, -2, -1).sqrt()
    return a / (s[..., :, None] * s[..., None, :])


def analyse(f: torch.Tensor, K: torch.Tensor) -> dict[str, Any]:
    """Compare outputs ``f`` [M, N, O] with the kernel ``K`` [N, N]; see ``experiments/random_nn.py``'s docstring."""
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
