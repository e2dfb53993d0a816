"""Bayesian optimisation over images with BoTorch: find the threes in a pool of MNIST digits by expected improvement.

The objective is a black box that says whether a digit is a three (1) or not (0); each query reveals one
label. A ``SingleTaskGP`` whose covariance is the ConvNet GP kernel, made by ``CNNGPKernel.recommended``
(normalised, its scale in ``ScaleKernel`` alone, priors at the paper's variances), is refitted after every
query with ``fit_gpytorch_mll``, and the next image is the pool's maximiser of (log) expected improvement.

Run ``python notebooks/botorch_ei.py`` (``--smoke``, or ``CI`` set in the environment, for a two-query run).
MNIST downloads and verifies itself on first use.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from gpytorch.mlls import ExactMarginalLogLikelihood

from gpytorch_cnngp import CNNGPKernel, architectures
from gpytorch_cnngp.datasets import load_split

TARGET = 3


def is_target(labels: torch.Tensor) -> torch.Tensor:
    """The black-box objective: 1.0 for a three, 0.0 for any other digit, shaped ``(n, 1)`` as BoTorch wants."""
    return (labels == TARGET).to(torch.float64).unsqueeze(-1)


def search(pool: torch.Tensor, labels: torch.Tensor, n_start: int, n_queries: int) -> list[int]:
    """Query ``n_queries`` digits of ``pool`` (flat 14x14 images) one at a time by expected improvement.

    The first ``n_start`` digits start the search; returns the indices of every digit labelled, in order.
    """
    chosen = list(range(n_start))
    print(
        f"pool: {len(pool)} digits, {int(is_target(labels).sum())} threes; start: {n_start} digits, "
        f"{int(is_target(labels[chosen]).sum())} threes"
    )
    covar = CNNGPKernel.recommended(architectures.convnet_gp(image_size=14), input_shape=(1, 14, 14))
    kernel = covar.base_kernel
    for query in range(n_queries):
        t0 = time.perf_counter()
        before = kernel.num_evaluations
        # the same covariance module every time: each fit starts from the previous one's hyperparameters
        model = SingleTaskGP(pool[chosen], is_target(labels[chosen]), covar_module=covar)
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        fitted = kernel.num_evaluations - before
        acquisition = LogExpectedImprovement(model, best_f=model.train_targets.max())  # targets are standardised
        rest = torch.tensor(sorted(set(range(len(pool))) - set(chosen)))
        with torch.no_grad():
            scores = acquisition(pool[rest].unsqueeze(1))  # one candidate per batch entry: (n, 1, d)
        pick = int(rest[scores.argmax()])
        chosen.append(pick)
        print(
            f"query {query + 1}: a {int(labels[pick])} (pool index {pick}); threes found "
            f"{int(is_target(labels[chosen]).sum())}; fit: {fitted} kernel evaluations, var_weight "
            f"{kernel.var_weight.item():.2f}, var_bias {kernel.var_bias.item():.2f}, outputscale "
            f"{covar.outputscale.item():.2f}; {time.perf_counter() - t0:.1f} s"
        )
    return chosen


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two queries on a small pool (also when CI is set)")
    parser.add_argument("--pool", type=int, default=500, help="digits to choose from (default: 500)")
    parser.add_argument("--start", type=int, default=60, help="digits labelled before the search (default: 60)")
    parser.add_argument("--queries", type=int, default=10, help="digits to query (default: 10)")
    args = parser.parse_args()
    if args.smoke or "CI" in os.environ:
        args.pool, args.start, args.queries = 100, 40, 2
    (images, labels), _, _ = load_split("mnist", n_train=args.pool, n_val=0, n_test=0, progress=False).values()
    pool = torch.nn.functional.avg_pool2d(images, 2).flatten(1)  # 14x14 digits, flat: GPyTorch's (n, d)
    search(pool, labels, args.start, args.queries)
