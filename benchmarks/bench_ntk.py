"""The neural tangent kernel's speed next to the NNGP's, in one process, calls interleaved.

Run ``python benchmarks/bench_ntk.py`` (``--help`` for options). For each architecture: cross kernels
``K(X, Z)`` of ``--n`` x ``--n`` 28x28 images (MNIST when present, else uniform noise), timed as the NNGP alone
and as the NNGP and NTK together from one pass (``get=("nngp", "ntk")``), each eagerly and in the native
kernel; ``--rounds`` rounds each call every method once, and entries/s are medians over rounds. The issue's
target is both kernels at no less than half the NNGP-only rate of the same backend. Results are appended to
``benchmarks/RESULTS.md``.
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

from bench_kernels import _images, machine, report  # noqa: E402

from gpytorch_cnngp import architectures, gram  # noqa: E402

METHODS = {
    "NNGP, eager": {"backend": "eager"},
    "NNGP + NTK, eager": {"backend": "eager", "get": ("nngp", "ntk")},
    "NNGP, native": {"backend": "native"},
    "NNGP + NTK, native": {"backend": "native", "get": ("nngp", "ntk")},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs", nargs="+", default=["convnet_gp", "resnet32_gp"], choices=list(architectures.ARCHITECTURES)
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    x, source = _images(args.n, dtype, 0)
    z, _ = _images(args.n, dtype, 1)
    rows = []
    for arch in args.archs:
        model = architectures.ARCHITECTURES[arch]()
        for options in METHODS.values():
            gram(model, x[:4], z[:4], **options)  # warm-up (builds the native kernel once)
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        for _ in range(args.rounds):
            for name, options in METHODS.items():
                t0 = time.perf_counter()
                gram(model, x, z, **options)
                times[name].append(time.perf_counter() - t0)
        rates = {name: args.n * args.n / statistics.median(t) for name, t in times.items()}
        for name, rate in rates.items():
            print(f"{arch:16s} {name:20s} {rate:12,.0f} entries/s", flush=True)
        for backend in ("eager", "native"):
            alone, both = rates[f"NNGP, {backend}"], rates[f"NNGP + NTK, {backend}"]
            rows.append(f"| {arch} | {backend} | {alone:,.0f} | {both:,.0f} | {both / alone:.2f} |")
    lines = [
        f"### The NTK's speed next to the NNGP's ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_ntk.py {' '.join(argv or sys.argv[1:])}`. "
        f"Cross kernels K(X, Z), {args.n} x {args.n} {source} 28x28 images, {args.dtype}, medians of {args.rounds} "
        "interleaved rounds. Both: the NNGP and the NTK from one pass.",
        "",
        "| architecture | backend | NNGP alone (entries/s) | NNGP + NTK (entries/s) | ratio |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]
    report(lines, args)


if __name__ == "__main__":
    main()
