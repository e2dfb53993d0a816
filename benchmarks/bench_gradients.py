"""Hyperparameter gradients: one marginal-likelihood (ML-II) step against the fastest forward Gram, in one run.

Run ``python benchmarks/bench_gradients.py`` (``--help`` for options). For ``--n`` MNIST training digits
(uniform noise when MNIST is not cached) in float64, each round times, interleaved:

* ``forward``: the fastest forward Gram ``K(X, X)`` of the ConvNet GP (``backend="native"``, no gradients);
* ``step, tied``: one ML-II step of ``ScaleKernel(CNNGPKernel(convnet_gp(), tied=True))`` in a
  :class:`~gpytorch_cnngp.SharedCovarianceExactGP` with 10 one-vs-rest outputs: the exact marginal
  likelihood and its gradient with respect to every parameter (``loss.backward()``);
* ``step, untied``: the same with ``tied=False`` (a weight and a bias variance per layer);
* with ``--eager``, the tied step on the eager backend as well (what every gradient ran on before).

The issue's targets: the tied step at most 4x the forward, the untied one at most 8x. Medians over
``--rounds`` are appended to ``benchmarks/RESULTS.md`` with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernels import machine, report  # noqa: E402


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from gpytorch_cnngp import datasets

        images, labels = datasets.load_mnist(download=False, progress=False)
        x = torch.from_numpy(images[:n].copy()).double().unsqueeze(1) / 255.0
        return x, torch.from_numpy(labels[:n].copy()).long(), "MNIST training digits"
    except Exception:  # noqa: BLE001 - no data here: noise images of the same size
        gen = torch.Generator().manual_seed(0)
        return (
            torch.rand(n, 1, 28, 28, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=gen),
            "uniform noise images",
        )


def network(arch: str):
    """The network of ``--arch``: an architecture of the package, or ``gap_cnn`` (Conv3-ReLU-AvgPool2-Conv3-ReLU-
    GlobalAvgPool-Dense, the neural-tangents comparison's pooled network)."""
    from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, ReLU, Sequential, architectures

    if arch == "gap_cnn":
        return Sequential(
            Conv2d(3, var_weight=2.0, var_bias=0.05), ReLU(), AvgPool2d(2), Conv2d(3, var_weight=2.0, var_bias=0.05),
            ReLU(), GlobalAvgPool2d(), Dense(var_weight=2.0, var_bias=0.05),
        )  # fmt: skip
    return architectures.ARCHITECTURES[arch]()


def ml2_step(
    x: torch.Tensor, y: torch.Tensor, tied: bool, backend: str, arch: str = "convnet_gp"
) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one exact-MLL value and gradient, and the gradients."""
    import gpytorch

    from gpytorch_cnngp import CNNGPKernel, SharedCovarianceExactGP

    flat = x.flatten(1)
    targets = 2.0 * torch.nn.functional.one_hot(y, 10).T.double() - 1.0

    class Model(SharedCovarianceExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood(
                noise_constraint=gpytorch.constraints.GreaterThan(1e-8)
            )
            super().__init__(flat, targets, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            kernel = CNNGPKernel(network(arch), input_shape=(1, 28, 28), tied=tied, backend=backend)
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = Model().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    t0 = time.perf_counter()
    with gpytorch.settings.max_cholesky_size(10**6):
        loss = -mll(model(flat), targets).sum()
        loss.backward()
    seconds = time.perf_counter() - t0
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError("a gradient is not finite")
    return seconds, grads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--arch", default="convnet_gp", help="an architecture's name, or gap_cnn (default: convnet_gp)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="also time the tied step on the eager backend")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from gpytorch_cnngp import gram

    x, y, source = _digits(args.n)
    model = network(args.arch)
    gram(model, x[:8], backend="native")  # builds or loads the native kernel outside the timings
    methods = {
        "forward Gram (native, no gradients)": lambda: _timed(lambda: gram(model, x, backend="native")),
        "ML-II step, tied": lambda: ml2_step(x, y, True, "auto", args.arch)[0],
        "ML-II step, untied": lambda: ml2_step(x, y, False, "auto", args.arch)[0],
    }
    if args.eager:
        methods["ML-II step, tied, eager"] = lambda: ml2_step(x, y, True, "eager", args.arch)[0]
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, fn in methods.items():
            if r > 0 and name.endswith("eager"):
                continue  # one eager round is enough to see the order of magnitude
            times[name].append(fn())
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    forward = medians["forward Gram (native, no gradients)"]
    rows = [f"| {name} | {t:.2f} | {t / forward:.2f} | {len(times[name])} |" for name, t in medians.items()]
    lines = [
        f"### Hyperparameter gradients: ML-II steps against the forward Gram ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_gradients.py {' '.join(argv or sys.argv[1:])}`. "
        f"{args.arch}, {args.n} {source}, float64; a step is the exact marginal likelihood of "
        f"`ScaleKernel(CNNGPKernel({args.arch}))` with 10 outputs and its gradient; medians over interleaved rounds.",
        "",
        "| computation | seconds | / forward Gram | rounds |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    report(lines, args)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
