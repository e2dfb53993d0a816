"""A network's weight and bias variances chosen by the marginal likelihood (ML-II) of training digits alone.

The network's kernel (one ``var_weight`` and one ``var_bias`` shared by its layers: ``CNNGPKernel(tied=True)``) is
fitted as a GP on the first ``n`` training digits of the split, the ten classes as ten outputs with targets ``+1``
at the class and ``-1`` elsewhere that share the kernel and a Gaussian noise (``SharedCovarianceExactGP``). The
objective is the exact negative log marginal likelihood per digit, summed over the outputs, minimised by L-BFGS
with a strong Wolfe line search over the logarithms of the two variances and of the noise.

There is no ``ScaleKernel``: the un-normalised kernel is what the search's classifier solves with, and its scale
is the variances' own (the one-hot targets have a scale), so the fit chooses the shape and the scale together.
The noise is used only by the fit: the classifier's ridge is chosen on the validation digits as for every other
candidate. Neither validation nor test digits are read here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gpytorch_cnngp.layers import Layer

__all__ = ["ml2_variances"]


def ml2_variances(
    factory: Callable[..., Layer],
    params: Mapping[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_iter: int = 15,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit ``factory(var_weight=..., var_bias=..., **params)``'s tied variances by ML-II.

    :param factory: a network factory that takes ``var_weight`` and ``var_bias`` (its defaults start the fit).
    :param params: the factory's other keyword arguments.
    :param images: float64 training images ``[n, C, H, W]``.
    :param labels: their int64 class labels ``[n]`` (0..9).
    :param max_iter: L-BFGS iterations (each may evaluate the objective more than once).
    :param say: where each evaluation's line goes.
    :return: ``var_weight``, ``var_bias`` and ``noise`` at the end, the objective at the start and the end, one
        entry per evaluation in ``history``, ``n``, ``evaluations`` and ``seconds``.
    :raises ValueError: for images that are not float64 ``[n, C, H, W]`` or labels that do not match them.
    """
    import gpytorch
    from gpytorch.constraints import GreaterThan, Positive

    from gpytorch_cnngp import CNNGPKernel, SharedCovarianceExactGP

    if images.dtype != torch.float64 or images.dim() != 4:
        raise ValueError(f"images must be float64 [n, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    flat = images.flatten(1)
    targets = 2.0 * torch.nn.functional.one_hot(labels, 10).T.double() - 1.0  # (10, n)

    def log_positive() -> Positive:
        return Positive(transform=torch.exp, inv_transform=torch.log)

    kernel = CNNGPKernel(
        factory(**dict(params)),
        input_shape=tuple(images.shape[1:]),
        tied=True,
        var_weight_constraint=log_positive(),
        var_bias_constraint=log_positive(),
    ).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=GreaterThan(1e-8, transform=torch.exp, inv_transform=torch.log)
    ).double()

    class _Model(SharedCovarianceExactGP):
        def __init__(self) -> None:
            super().__init__(flat, targets, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = kernel

        def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = _Model().double()
    with torch.no_grad():  # the noise starts at 1% of the mean prior variance, a scale-free choice
        likelihood.noise = 1e-2 * kernel(flat[: min(64, len(flat))]).to_dense().diagonal().mean()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    likelihood.train()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        max_eval=max(2, int(1.5 * max_iter)),
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
        line_search_fn="strong_wolfe",
    )
    history: list[dict[str, float]] = []
    started = time.perf_counter()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with gpytorch.settings.max_cholesky_size(10**7):
            loss = -mll(model(flat), targets).sum()
        loss.backward()
        h = {
            "loss": loss.item(),
            "var_weight": kernel.var_weight.item(),
            "var_bias": kernel.var_bias.item(),
            "noise": likelihood.noise.item(),
            "seconds": time.perf_counter() - started,
        }
        history.append(h)
        say(
            f"ML-II evaluation {len(history):2d}: -log p(Y)/n {h['loss']:.5f}  var_weight {h['var_weight']:.5g}  "
            f"var_bias {h['var_bias']:.5g}  noise {h['noise']:.3g}  ({h['seconds']:.0f} s)"
        )
        return loss

    optimizer.step(closure)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**7):  # the objective at the final values
        final = (-mll(model(flat), targets).sum()).item()
    return {
        "var_weight": kernel.var_weight.item(),
        "var_bias": kernel.var_bias.item(),
        "noise": likelihood.noise.item(),
        "loss_start": history[0]["loss"],
        "loss_end": final,
        "history": history,
        "n": len(flat),
        "evaluations": len(history),
        "seconds": time.perf_counter() - started,
    }
