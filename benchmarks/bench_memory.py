"""Peak memory of large kernel computations: a big Gram matrix under a memory budget, and one
marginal-likelihood gradient step of a CNNGPKernel.

Run ``python benchmarks/bench_memory.py gram --n 10000 --budget-mb 1024`` or
``python benchmarks/bench_memory.py mll --n 2000`` (``--backend eager`` for the autograd path). Each
measurement reports the process' peak resident memory (VmHWM) and its increase over the resident memory
just before the computation, and appends a line to ``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _mnist(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from gpytorch_cnngp import datasets

        images, labels = datasets.load_mnist(download=False, progress=False)
        x = torch.from_numpy(images[:n].copy()).to(dtype).unsqueeze(1) / 255.0
        return x, torch.from_numpy(labels[:n].copy()), "MNIST training digits"
    except Exception:  # noqa: BLE001 - no data here: synthetic images of the same size
        gen = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 28, 28, generator=gen, dtype=dtype), torch.randint(0, 10, (n,)), "random images"


def gram_case(args: argparse.Namespace) -> str:
    from gpytorch_cnngp import architectures, gram

    x, _, source = _mnist(args.n, torch.float32)
    model = architectures.convnet_gp()
    budget = args.budget_mb << 20
    before = _status("VmRSS")
    t0 = time.perf_counter()
    K = gram(model, x, memory_budget=budget, backend=args.backend, progress=args.progress)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    out_mb = K.numel() * K.element_size() / 2**20
    extra_mb = (peak - before) / 2**20
    return (
        f"| ConvNet GP K(X, X), {args.n} x {args.n}, float32 ({source}) | budget {args.budget_mb} MiB, "
        f"result {out_mb:.0f} MiB | peak RSS {peak / 2**20:.0f} MiB, {extra_mb:.0f} MiB above the "
        f"{before / 2**20:.0f} MiB before the call | {seconds:.0f} s, {args.n * args.n / seconds:,.0f} entries/s |"
    )


def mll_case(args: argparse.Namespace) -> str:
    import gpytorch

    from gpytorch_cnngp import CNNGPKernel, SharedCovarianceExactGP, architectures

    x, y, source = _mnist(args.n, torch.float64)
    x = x.flatten(1)
    targets = 2.0 * torch.nn.functional.one_hot(y, 10).T.double() - 1.0

    class Model(SharedCovarianceExactGP):
        def __init__(self, x, targets, likelihood):
            super().__init__(x, targets, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                CNNGPKernel(architectures.convnet_gp(), input_shape=(1, 28, 28), backend=args.backend)
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-8))
    model = Model(x, targets, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    with gpytorch.settings.max_cholesky_size(10**6):
        loss = -mll(model(x), targets).sum()
        t1 = time.perf_counter()
        loss.backward()
    t2 = time.perf_counter()
    peak = _status("VmHWM")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    # what plain autograd through every tile would keep: about two [n, n, 28, 28] maps per layer
    naive_gb = args.n**2 * 28 * 28 * 8 * 2 * 15 / 2**30
    return (
        f"| MLL + gradient, ConvNet GP CNNGPKernel (backend {args.backend}), n = {args.n}, float64 ({source}) | "
        f"forward {t1 - t0:.0f} s, "
        f"backward {t2 - t1:.0f} s | peak RSS {peak / 2**20:.0f} MiB, {(peak - before) / 2**20:.0f} MiB above the "
        f"{before / 2**20:.0f} MiB before the step | plain autograd would hold about {naive_gb:,.0f} GiB |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="case", required=True)
    g = sub.add_parser("gram", help="a large K(X, X) under a memory budget")
    g.add_argument("--n", type=int, default=10000)
    g.add_argument("--budget-mb", type=int, default=1024)
    g.add_argument("--backend", default="auto", choices=["auto", "eager", "inductor", "native"])
    g.add_argument("--progress", action="store_true")
    m = sub.add_parser("mll", help="one marginal-likelihood gradient step")
    m.add_argument("--n", type=int, default=2000)
    m.add_argument(
        "--backend", default="auto", choices=["auto", "eager", "native"], help="CNNGPKernel's backend (eager: autograd)"
    )
    for q in (g, m):
        q.add_argument("--no-write", action="store_true")
        q.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    line = gram_case(args) if args.case == "gram" else mll_case(args)
    print(line)
    if not args.no_write:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
