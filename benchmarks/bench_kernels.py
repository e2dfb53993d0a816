"""Kernel throughput and peak memory: our engine (eager and compiled) next to the straightforward path.

Run ``python benchmarks/bench_kernels.py`` (``--help`` for options). Each measurement runs in a fresh
subprocess so that its peak resident memory (VmHWM) is its own. Throughput is the median over
``--repeats`` timed calls of a cross kernel ``K(X, Z)`` (``n x n`` entries; the symmetric ``K(X, X)``
path computes about half of them and would look twice as fast). The compiled path's one-off
compilation time is reported separately. Results are appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ARCHS = ("convnet_gp", "residual_cnn_gp", "resnet32_gp")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _images(n: int, dtype, seed: int):
    import torch

    try:
        from gpytorch_cnngp import datasets

        images, _ = datasets.load_mnist(download=False, progress=False)
        x = torch.from_numpy(images[seed * n : (seed + 1) * n].copy()).to(dtype) / 255.0
        return x.unsqueeze(1), "MNIST"
    except Exception:  # noqa: BLE001 - any failure: synthetic images of the same size
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(n, 1, 28, 28, generator=gen, dtype=dtype), "uniform random"


def _runner(model, method: str, n: int, dtype, tile_size):
    """A no-argument function computing one ``n x n`` cross kernel with ``method``, and the image source."""
    from gpytorch_cnngp import gram

    x, source = _images(n, dtype, 0)
    z, _ = _images(n, dtype, 1)
    if method == "naive":
        from naive import naive_kernel

        return (lambda: naive_kernel(model, x, z)), source
    if method not in ("eager", "compiled", "inductor"):
        raise SystemExit(f"unknown method {method!r}: naive, eager, compiled or inductor")
    # compiled: the native CPU kernel where it runs, else torch.compile; inductor: torch.compile (the GPU path)
    backend = {"eager": "eager", "inductor": "inductor", "compiled": _compiled_backend(model, x)}[method]
    return (lambda: gram(model, x, z, backend=backend, tile_size=tile_size)), source


def _compiled_backend(model, x) -> str:
    from gpytorch_cnngp.backends import native_ready

    return "native" if native_ready(model, tuple(x.shape[-2:]), x.dtype, x.device) else "inductor"


def worker(args: argparse.Namespace) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    from gpytorch_cnngp import architectures

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = architectures.ARCHITECTURES[args.arch]()
    run, source = _runner(model, args.method, args.n, dtype, args.tile_size)

    base_rss = _vm_rss_bytes()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "arch": args.arch,
        "dtype": args.dtype,
        "method": args.method,
        "n": args.n,
        "entries": args.n * args.n,
        "median_s": med,
        "entries_per_s": args.n * args.n / med,
        "first_call_s": first,
        "peak_rss_mb": _vm_hwm_bytes() / 2**20,
        "base_rss_mb": base_rss / 2**20,
        "images": source,
        "threads": torch.get_num_threads(),
    }


def worker_interleaved(args: argparse.Namespace) -> list[dict]:
    """All methods of one architecture and dtype in one process, timed in alternation.

    Each round calls every method once, so a slow spell of a shared machine hits all of them alike;
    the ratio to the straightforward path is the median over rounds of the per-round ratios.
    """
    import torch

    from gpytorch_cnngp import architectures

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = architectures.ARCHITECTURES[args.arch]()
    runs = {}
    for method, n in zip(args.methods, args.sizes, strict=True):
        run, source = _runner(model, method, n, dtype, args.tile_size)
        t0 = time.perf_counter()
        run()  # warm-up and compilation
        runs[method] = (run, n, time.perf_counter() - t0)
    rates = {m: [] for m in runs}
    for _ in range(args.repeats):
        for method, (run, n, _) in runs.items():
            t0 = time.perf_counter()
            run()
            rates[method].append(n * n / (time.perf_counter() - t0))
    rows = []
    for method, (_, n, first) in runs.items():
        ratios = [r / b for r, b in zip(rates[method], rates.get("naive", rates[method]), strict=True)]
        rows.append(
            {
                "arch": args.arch,
                "dtype": args.dtype,
                "method": method,
                "n": n,
                "entries_per_s": statistics.median(rates[method]),
                "ratio": statistics.median(ratios) if "naive" in rates else None,
                "first_call_s": first,
                "images": source,
            }
        )
    return rows


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} torch threads"
    )


def report(lines: list[str], args: argparse.Namespace) -> None:
    """Print a results section and append it to ``args.out`` unless ``args.no_write``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(args.out, "a") as fh:
            fh.write("\n" + text)


def _run_worker(args: argparse.Namespace, arch: str, dtype: str, extra: list[str]):
    """Run this script as a worker process for ``arch`` and ``dtype`` and return its JSON result."""
    cmd = [sys.executable, __file__, "--worker", "--arch", arch, "--dtype", dtype, "--repeats", str(args.repeats)]
    if args.tile_size:
        cmd += ["--tile-size", str(args.tile_size)]
    out = subprocess.run(cmd + extra, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"measurement failed: {arch} {dtype} {' '.join(extra)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["naive", "eager", "compiled"],
        choices=["naive", "eager", "compiled", "inductor"],
        help="compiled: gram(backend='native') where the native CPU kernel runs the network, else "
        "backend='inductor'; inductor: torch.compile (the GPU path)",
    )
    p.add_argument("--n", type=int, default=None, help="images per side (default: per method)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--sizes", nargs="+", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time all methods of an architecture in one process, alternating calls (ratios robust to a "
        "noisy machine; no per-method peak memory)",
    )
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_interleaved(args) if args.sizes else worker(args)))
        return

    default_n = {"naive": 24, "eager": 96, "compiled": 192, "inductor": 192}
    if args.interleave:
        interleaved(args, argv, default_n)
        return
    rows = []
    for arch in args.archs:
        for dtype in args.dtypes:
            for method in args.methods:
                n = args.n or default_n[method]
                row = _run_worker(args, arch, dtype, ["--method", method, "--n", str(n)])
                rows.append(row)
                print(
                    f"{arch:16s} {dtype:8s} {method:9s} n={n:4d} {row['entries_per_s']:12,.0f} entries/s "
                    f"peak {row['peak_rss_mb']:7.0f} MB  first call {row['first_call_s']:6.1f} s",
                    flush=True,
                )
    lines = [
        f"### Kernel throughput ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_kernels.py {' '.join(argv or sys.argv[1:])}`.",
        f"Cross kernels K(X, Z) on {rows[0]['images']} 28x28 images, median of {args.repeats} calls; peak = process "
        "VmHWM (includes the Python/torch baseline of the process); `first call` includes compilation.",
        "",
        "| architecture | dtype | method | n x n | entries/s | x naive | peak RSS (MB) | first call (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        naive = next(
            (q for q in rows if q["arch"] == r["arch"] and q["dtype"] == r["dtype"] and q["method"] == "naive"), None
        )
        ratio = f"{r['entries_per_s'] / naive['entries_per_s']:.1f}" if naive else "-"
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['method']} | {r['n']}x{r['n']} | {r['entries_per_s']:,.0f} | {ratio} "
            f"| {r['peak_rss_mb']:.0f} | {r['first_call_s']:.1f} |"
        )
    report(lines, args)


def interleaved(args: argparse.Namespace, argv: list[str] | None, default_n: dict[str, int]) -> None:
    rows = []
    for arch in args.archs:
        for dtype in args.dtypes:
            sizes = [str(args.n or default_n[m]) for m in args.methods]
            for row in _run_worker(args, arch, dtype, ["--methods", *args.methods, "--sizes", *sizes]):
                rows.append(row)
                ratio = f"{row['ratio']:.1f}x naive" if row["ratio"] is not None else ""
                print(
                    f"{arch:16s} {dtype:8s} {row['method']:9s} n={row['n']:4d} {row['entries_per_s']:12,.0f} "
                    f"entries/s {ratio}",
                    flush=True,
                )
    lines = [
        f"### Kernel throughput, methods interleaved ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_kernels.py {' '.join(argv or sys.argv[1:])}`.",
        f"Cross kernels K(X, Z) on {rows[0]['images']} 28x28 images. One process per architecture and dtype "
        f"runs {args.repeats} rounds, each calling every method once; entries/s is the median over rounds and "
        "`x naive` the median of the per-round ratios. `first call` includes compilation.",
        "",
        "| architecture | dtype | method | n x n | entries/s | x naive | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.1f}" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['method']} | {r['n']}x{r['n']} | {r['entries_per_s']:,.0f} | {ratio} "
            f"| {r['first_call_s']:.1f} |"
        )
    report(lines, args)


if __name__ == "__main__":
    main()
