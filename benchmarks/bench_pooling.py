"""Pooled networks on the eager path: offset maps against full maps, in one run.

Run ``python benchmarks/bench_pooling.py`` (``--help`` for options). A layer before the last pooling layer
carries covariances between positions, either as one map per spatial offset that the readout needs
(``settings.spatial_path("offsets")``, ``[H, W, n_offsets]`` per pair) or as every pair of positions
(``"full"``, ``[H, W, H, W]``); ``"auto"`` (the default) takes offsets unless a layer would carry more
offsets than its map has positions. Cases, on 28x28 MNIST digits:

* ``pooled_cnn_gp``: a local 2x2 pool, then a dense readout (nine offsets at each layer before the pool);
* ``gap_cnn``: Conv3-ReLU-AvgPool2-Conv3-ReLU-GlobalAvgPool-Dense (every offset: ``"auto"`` keeps full maps);
* ``pooled_cnn_gp(global_pool=True)``: both pools (every offset again).

Each repeat times every path once, in turn, on the same cross kernel ``K(X, Z)`` (so that a busy machine
slows them alike); the table gives the medians, the ratio to the full path, and the largest difference
between the paths' values. Results are appended to ``--out`` unless ``--no-write``.
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

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, ReLU, Sequential, gram, settings  # noqa: E402
from gpytorch_cnngp.architectures import pooled_cnn_gp  # noqa: E402


def _gap_cnn():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.05),
        ReLU(),
        AvgPool2d(2),
        Conv2d(3, var_weight=2.0, var_bias=0.05),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=2.0, var_bias=0.05),
    )


CASES = {
    "pooled_cnn_gp": pooled_cnn_gp,
    "gap_cnn": _gap_cnn,
    "pooled_cnn_gp(global_pool=True)": lambda: pooled_cnn_gp(global_pool=True),
}


def measure(name: str, dtype: torch.dtype, n: int, repeats: int, paths: list[str], size: int) -> list[dict]:
    """Medians of ``repeats`` timed ``K(X, Z)`` (``n x n``) per spatial path, interleaved."""
    model = CASES[name]()
    x, _ = _images(n, dtype, 0)
    z, _ = _images(n, dtype, 1)
    if size != 28:
        x, z = x[..., :size, :size].contiguous(), z[..., :size, :size].contiguous()
    times: dict[str, list[float]] = {path: [] for path in paths}
    values: dict[str, torch.Tensor] = {}
    for path in paths:  # warm-up: plans, index tensors, window matrices
        with settings.spatial_path(path):
            values[path] = gram(model, x, z, backend="eager")
    for _ in range(repeats):
        for path in paths:
            with settings.spatial_path(path):
                t0 = time.perf_counter()
                gram(model, x, z, backend="eager")
                times[path].append(time.perf_counter() - t0)
    first = values[paths[0]]
    rows = []
    for path in paths:
        med = statistics.median(times[path])
        diff = float((values[path] - first).abs().max() / first.abs().max())
        rows.append({"case": name, "path": path, "n": n, "median_s": med, "entries_per_s": n * n / med, "diff": diff})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["pooled_cnn_gp", "gap_cnn"], choices=list(CASES))
    p.add_argument("--paths", nargs="+", default=["full", "auto"], choices=["full", "offsets", "auto"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=8, help="images per side of the cross kernel")
    p.add_argument("--size", type=int, default=28, help="crop the digits to size x size (28: whole)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 is steadier on a busy machine)"
    )
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.cases:
        case_rows = measure(name, dtype, args.n, args.repeats, args.paths, args.size)
        base = case_rows[0]["median_s"]
        for r in case_rows:
            r["speedup"] = base / r["median_s"]
            print(
                f"{name:32s} {r['path']:8s} {r['median_s']:9.3f} s  {r['entries_per_s']:10,.1f} entries/s  "
                f"x{r['speedup']:.2f} against {args.paths[0]}  max rel diff {r['diff']:.1e}",
                flush=True,
            )
        rows += case_rows
    lines = [
        f"### Pooling: offset maps and full maps ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_pooling.py {' '.join(argv or sys.argv[1:])}`.",
        f"Cross kernels K(X, Z) of {args.n}x{args.n} {args.size}x{args.size} MNIST digits, {args.dtype}, eager, "
        f"median of {args.repeats} interleaved repeats.",
        "",
        f"| architecture | spatial path | seconds | entries/s | x faster than {args.paths[0]} | max rel diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['path']} | {r['median_s']:.3f} | {r['entries_per_s']:,.1f} | {r['speedup']:.2f} "
            f"| {r['diff']:.1e} |"
        )
    report(lines, args)


if __name__ == "__main__":
    main()
