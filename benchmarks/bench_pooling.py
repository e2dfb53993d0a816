"""Speed of the full spatial covariance path (pooling) next to the same-location path.

Run ``python benchmarks/bench_pooling.py`` (``--help`` for options). Cases, on 28x28 MNIST digits:

* ``3 conv, dense``: [Conv2d(3), ReLU] x 3 and a Dense readout; same-location maps ``[H, W]`` per pair;
* ``3 conv, pool(1), dense``: the same network with ``AvgPool2d(1)`` (the identity) before the readout,
  which makes every layer carry full covariances ``[H, W, H, W]``; its values must equal the first
  case's (checked and printed), so the ratio of the two rows is the price of the full path itself;
* ``pooled_cnn_gp``: two local 2x2 average pools (full maps only up to the second pool);
* ``pooled_cnn_gp(global_pool=True)``: a global average pool at the end (full maps everywhere).

Throughput is the median over ``--repeats`` timed cross kernels ``K(X, Z)``; peak memory is the
process's resident high-water mark after each case. Results are appended to ``benchmarks/RESULTS.md``
unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernels import _images, machine, report  # noqa: E402

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, ReLU, Sequential, gram  # noqa: E402
from gpytorch_cnngp.architectures import pooled_cnn_gp  # noqa: E402


def _three_conv(pool: bool):
    layers = []
    for _ in range(3):
        layers += [Conv2d(3, var_weight=2.0, var_bias=0.05), ReLU()]
    if pool:
        layers.append(AvgPool2d(1))
    return Sequential(*layers, Dense(var_weight=2.0, var_bias=0.05))


CASES = {
    "3 conv, dense": (lambda: _three_conv(False), 64),
    "3 conv, pool(1), dense": (lambda: _three_conv(True), 12),
    "pooled_cnn_gp": (lambda: pooled_cnn_gp(), 16),
    "pooled_cnn_gp(global_pool=True)": (lambda: pooled_cnn_gp(global_pool=True), 12),
}


def measure(name: str, dtype: torch.dtype, repeats: int, backend: str, scale: float) -> dict:
    build, n = CASES[name]
    n = max(2, int(n * scale))
    model = build()
    x, _ = _images(n, dtype, 0)
    z, _ = _images(n, dtype, 1)
    t0 = time.perf_counter()
    gram(model, x, z, backend=backend)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gram(model, x, z, backend=backend)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "entries_per_s": n * n / med,
        "ms_per_entry": 1e3 * med / (n * n),
        "first_s": first,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--backend",
        default="eager",
        choices=["eager", "inductor", "auto"],
        help="gram's backend (auto: the native kernel where it runs the network, i.e. without pooling)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default image counts")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    # the identity pool must not change the kernel: the full path's values equal the same-location path's
    x, _ = _images(8, torch.float64, 0)
    z, _ = _images(8, torch.float64, 1)
    a, b = gram(_three_conv(False), x, z), gram(_three_conv(True), x, z)
    agreement = float(((a - b).abs().max() / a.abs().max()).item())
    print(f"full path vs same-location path, float64: max relative difference {agreement:.1e}")

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name in CASES:
            r = measure(name, dtype, args.repeats, args.backend, args.scale)
            rows.append(r)
            print(
                f"{name:34s} {dtype_name:8s} n={r['n']:3d} {r['entries_per_s']:10,.0f} entries/s "
                f"({r['ms_per_entry']:.3f} ms each)  peak {r['peak_mb']:6.0f} MB",
                flush=True,
            )
    lines = [
        f"### Pooling: full spatial covariance path ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_pooling.py {' '.join(argv or sys.argv[1:])}`.",
        f"Cross kernels K(X, Z) on 28x28 MNIST digits, backend {args.backend}, median of "
        f"{args.repeats}; peak = process resident high-water mark so far. Full path and same-location path "
        f"agree to {agreement:.1e} (float64, identity pool).",
        "",
        "| architecture | dtype | n x n | entries/s | ms per entry | x slower than same-location | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(q for q in rows if q["dtype"] == r["dtype"] and q["case"] == "3 conv, dense")
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['n']}x{r['n']} | {r['entries_per_s']:,.0f} | {r['ms_per_entry']:.3f} "
            f"| {base['entries_per_s'] / r['entries_per_s']:.0f} | {r['peak_mb']:.0f} |"
        )
    report(lines, args)


if __name__ == "__main__":
    main()
