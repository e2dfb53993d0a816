"""``Elementwise``'s kernel per entry next to a closed-form layer's, in one process, calls interleaved.

Run ``python benchmarks/bench_elementwise.py`` (``--help`` for options). The network is
Conv3-phi-Conv3-phi-Dense on 28x28 images (MNIST when present, else uniform noise), eager backend, cross kernels
``K(X, Z)``; ``phi`` is the error function three ways:

- ``Erf()``, the closed form (``arcsin``);
- ``Elementwise(torch.erf)``, the library's Hermite series (``degree`` terms per pair, their coefficients once per
  image and position);
- the same function by the product Gauss-Hermite rule that ``Elementwise`` used before the series (``degree^2``
  evaluations of ``phi`` per pair), defined here as the baseline. It is slow, so it runs on ``--n-rule`` images
  per side; every figure is per kernel entry.

Each of ``--rounds`` rounds calls every method once, NNGP alone and NNGP with NTK; figures are medians. The
issue's target is ``Elementwise`` no slower per entry than a handful of closed-form evaluations. The values of the
three agree to the printed relative difference (the closed form is the reference). Results are appended to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernels import _images, machine, report  # noqa: E402

from gpytorch_cnngp import gram  # noqa: E402
from gpytorch_cnngp.layers import Conv2d, Dense, Elementwise, Erf, Sequential  # noqa: E402


class ProductRule(Elementwise):
    """The baseline: ``E[f(u) f(v)]`` by the product Gauss-Hermite rule, ``degree^2`` node pairs per entry."""

    def pair_functions(self, state):  # the rule reads the standard deviations alone, not the series' coefficients
        return self.pair_map, self.pair_derivative_map

    def _quadrature(self, c: Tensor, s1: Tensor, s2: Tensor, order1: int, order2: int, series=None) -> Tensor:
        prod = s1 * s2
        positive = prod > 0
        rho = torch.where(positive, c / torch.where(positive, prod, 1.0), 0.0).clamp(-1.0, 1.0)
        q = torch.sqrt(1.0 - rho * rho)
        f1, f2 = self._f(order1), self._f(order2)
        out = torch.zeros(torch.broadcast_shapes(c.shape, s1.shape, s2.shape), dtype=c.dtype, device=c.device)
        for ti, wi in zip(self._nodes, self._weights, strict=True):
            a = f1(math.sqrt(2.0) * ti * s1) * wi
            for tj, wj in zip(self._nodes, self._weights, strict=True):
                out += a * f2(math.sqrt(2.0) * s2 * (rho * ti + q * tj)) * wj
        return out / math.pi


def _net(phi) -> Sequential:
    return Sequential(Conv2d(3), phi, Conv2d(3), phi, Dense())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=64, help="images per side for the closed form and the series")
    p.add_argument("--n-rule", type=int, default=2, help="images per side for the product rule (slow)")
    p.add_argument("--degree", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    x, source = _images(args.n, dtype, 0)
    z, _ = _images(args.n, dtype, 1)
    methods = {
        "Erf (closed form)": (_net(Erf()), args.n),
        f"Elementwise(erf), series of {args.degree}": (_net(Elementwise(torch.erf, degree=args.degree)), args.n),
        f"product rule, {args.degree}^2 nodes": (_net(ProductRule(torch.erf, degree=args.degree)), args.n_rule),
    }
    kernels = {"NNGP": "nngp", "NNGP + NTK": ("nngp", "ntk")}
    times: dict[tuple[str, str], list[float]] = {(m, k): [] for m in methods for k in kernels}
    values: dict[tuple[str, str], Tensor] = {}
    for method, kernel in times:  # warm-up: first calls pay for allocations and plans
        gram(methods[method][0], x[:1], z[:1], backend="eager", get=kernels[kernel])
    for _ in range(args.rounds):
        for (method, kernel), spent in times.items():
            model, n = methods[method]
            t0 = time.perf_counter()
            out = gram(model, x[:n], z[:n], backend="eager", get=kernels[kernel])
            spent.append((time.perf_counter() - t0) / (n * n))
            values[(method, kernel)] = out[-1] if isinstance(out, tuple) else out
    rows = []
    closed = {k: statistics.median(times[(next(iter(methods)), k)]) for k in kernels}
    for (method, kernel), spent in times.items():
        per_entry = statistics.median(spent)
        n = methods[method][1]
        ref = values[(next(iter(methods)), kernel)][:n, :n]
        diff = float((values[(method, kernel)] - ref).abs().max() / ref.abs().max())
        print(f"{method:36s} {kernel:11s} {per_entry * 1e6:12.2f} us/entry  {per_entry / closed[kernel]:8.2f}x")
        rows.append(
            f"| {method} | {kernel} | {n} x {n} | {per_entry * 1e6:,.2f} | {per_entry / closed[kernel]:,.2f} "
            f"| {diff:.1e} |"
        )
    lines = [
        "### Elementwise: the Hermite series against the product rule and the closed form "
        f"({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_elementwise.py {' '.join(argv or sys.argv[1:])}`. "
        f"Conv3-erf-Conv3-erf-Dense, cross kernels of {source} 28x28 images, {args.dtype}, eager, torch threads "
        f"{torch.get_num_threads()}, medians of {args.rounds} interleaved rounds. Time per kernel entry; ratio to the "
        "closed form's; difference: the largest relative difference from the closed form's values (the last "
        "kernel asked for: the NTK with both).",
        "",
        "| phi | kernels | size | us per entry | x closed form | difference |",
        "|---|---|---|---:|---:|---:|",
        *rows,
    ]
    report(lines, args)


if __name__ == "__main__":
    main()
