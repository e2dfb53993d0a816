"""Where the native CPU kernel starts to beat the eager path: ``gram(model, X, Z)`` for small cross kernels.

For each size ``n`` the cross kernel of ``n`` by ``n`` random 28x28 images is timed eagerly
(``backend="eager"``) and in the native kernel (``backend="native"``), alternating, and the medians are
compared. The engine's automatic choice (``backend="auto"``) uses the native kernel from
``settings.auto_native_pairs`` pairs on; this script is how that threshold was chosen.

    python benchmarks/bench_crossover.py                 # ConvNet GP and ResNet-32 GP, float32 and float64

A second table times ``model(X, Z)`` with every default against the explicit native kernel at 120 x 120 and
200 x 200 images, the sizes a user tries first.
    python benchmarks/bench_crossover.py --smoke         # tiny, nothing written

Results are appended to ``benchmarks/RESULTS.md`` unless ``--no-write``.
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


def _time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    from gpytorch_cnngp import architectures, gram
    from gpytorch_cnngp.backends import native_ready

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["convnet_gp", "resnet32_gp"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--default-sizes", nargs="+", type=int, default=[120, 200])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.archs, args.dtypes, args.sizes, args.repeats, args.no_write = ["convnet_gp"], ["float32"], [1, 2], 2, True
        args.default_sizes = [4]
    lines = [
        f"### bench_crossover: eager against the native kernel on small cross kernels ({time.strftime('%Y-%m-%d')}, "
        f"{machine()})",
        "",
        "| architecture | dtype | n x n images | pairs | eager | native | native / eager speed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    gen = torch.Generator().manual_seed(0)
    for arch in args.archs:
        model = getattr(architectures, arch)()
        for name in args.dtypes:
            dtype = getattr(torch, name)
            if not native_ready(model, (28, 28), dtype):
                raise SystemExit("the native kernel is not available here")
            X = torch.rand(max(args.sizes), 1, 28, 28, generator=gen, dtype=dtype)
            Z = torch.rand(max(args.sizes), 1, 28, 28, generator=gen, dtype=dtype)
            for n in args.sizes:
                x, z = X[:n], Z[:n]
                gram(model, x, z, backend="eager"), gram(model, x, z, backend="native")  # warm-up
                eager = _time(lambda m=model, x=x, z=z: gram(m, x, z, backend="eager"), args.repeats)
                native = _time(lambda m=model, x=x, z=z: gram(m, x, z, backend="native"), args.repeats)
                lines.append(
                    f"| {arch} | {name} | {n} x {n} | {n * n} | {eager * 1e3:.2f} ms | {native * 1e3:.2f} ms "
                    f"| {eager / native:.2f} |"
                )
                print(lines[-1], flush=True)
    # the calls a user types first: model(X, Z) with every default, against the explicit native kernel
    lines += [
        "",
        "| architecture | dtype | n x n images | `model(X, Z)` (defaults) | `backend='native'` | default / native |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arch in args.archs:
        model = getattr(architectures, arch)()
        for name in args.dtypes:
            dtype = getattr(torch, name)
            for n in args.default_sizes:
                X = torch.rand(n, 1, 28, 28, generator=gen, dtype=dtype)
                Z = torch.rand(n, 1, 28, 28, generator=gen, dtype=dtype)
                model(X, Z), gram(model, X, Z, backend="native")  # warm-up
                default = _time(lambda m=model, x=X, z=Z: m(x, z), args.repeats)
                native = _time(lambda m=model, x=X, z=Z: gram(m, x, z, backend="native"), args.repeats)
                lines.append(
                    f"| {arch} | {name} | {n} x {n} | {n * n / default:,.0f} entries/s | {n * n / native:,.0f} "
                    f"| {native / default:.2f} |"
                )
                print(lines[-1], flush=True)
    report(lines, args)


if __name__ == "__main__":
    main()
