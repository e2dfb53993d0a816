"""Full-MNIST-scale Gram matrices on one accelerator: the GPU targets of the engine.

For each architecture this script

1. compiles the pair pass once on a small warm-up Gram (reported as compile time),
2. times ``gram(model, X[:rows], X)`` for a block of rows against all ``n`` images (``--rows n``
   computes the whole symmetric ``K(X, X)``, upper-triangle tiles only),
3. checks a corner of the result against an eager float64 computation on the CPU,

and prints kernel entries per second, the projected time of the full symmetric ``n x n`` matrix and
the peak device memory. The issue's goal is the 70k x 70k ConvNet GP in under 3 minutes on one
H100::

    python benchmarks/bench_gpu.py                      # ConvNet GP full 70k x 70k, ResNet-32 GP 2k rows
    python benchmarks/bench_gpu.py --device cpu --n 64 --rows 64 32 --no-write   # smoke run

Images are MNIST's 60k training and 10k test digits when they are cached locally
(``gpytorch_cnngp.datasets``), otherwise uniform random 28x28 images: throughput does not depend on
the pixel values. A line per architecture is appended to ``benchmarks/RESULTS.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import _status  # noqa: E402

ARCHS = {
    "convnet_gp": "ConvNet GP",
    "resnet32_gp": "ResNet-32 GP",
    "residual_cnn_gp": "Residual CNN GP",
    # pooled networks: spatial offsets (torch.compile on a GPU keeps their full maps; the native kernel on a CPU)
    "pooled_cnn_gp": "Pooled CNN GP",
    "myrtle5_gp": "Myrtle-5 GP",
}


def _images(n: int) -> tuple[torch.Tensor, str]:
    from gpytorch_cnngp import datasets

    try:
        images, _ = datasets.load_mnist(download=False, progress=False)
    except (OSError, datasets.DatasetError):
        images = None
    if images is not None and len(images) >= n:
        return torch.from_numpy(images[:n].copy()).float().unsqueeze(1) / 255.0, "MNIST train + test digits"
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=gen), "random 28x28 images (MNIST not cached here)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")  # CPU: the process' peak resident memory


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_arch(name: str, x: torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype, args) -> dict:
    from gpytorch_cnngp import architectures, gram

    model = architectures.ARCHITECTURES[name]()
    n = x.shape[0]
    rows = min(rows, n)
    kw = dict(device=device, dtype=dtype, backend=args.backend, tile_size=args.tile_size)
    if args.budget_gb is not None:
        kw["memory_budget"] = int(args.budget_gb * 2**30)

    t0 = time.perf_counter()  # warm-up: compilation and the first tiles
    gram(model, x[: args.warmup], x[: args.warmup], **kw)
    _sync(device)
    compile_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if rows == n:
        K = gram(model, x, progress=args.progress, **kw)
        entries = n * n
    else:
        K = gram(model, x[:rows], x, progress=args.progress, **kw)
        entries = rows * n
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes(device)

    # correctness of the timed result: a corner against eager float64 on the CPU
    m = min(args.check, rows)
    ref = gram(model, x[:m].double(), x[:m].double(), backend="eager", device="cpu")
    got = K[:m, :m].double().cpu()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    if not torch.isfinite(K).all():
        raise RuntimeError(f"{name}: the Gram matrix has non-finite entries")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    if rel > tol:
        raise RuntimeError(f"{name}: relative error {rel:.1e} against eager float64 exceeds {tol:.0e}")

    rate = entries / seconds
    # the symmetric Gram computes tiles on and above the diagonal: about half of n^2 pairs
    full_s = seconds if rows == n else (n * n / 2) / rate
    return dict(
        name=name, n=n, rows=rows, seconds=seconds, rate=rate, full_s=full_s, compile_s=compile_s,
        peak_gib=peak / 2**30, rel=rel,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["convnet_gp", "resnet32_gp"], choices=list(ARCHS))
    p.add_argument("--n", type=int, default=70_000, help="images (default: all of MNIST)")
    p.add_argument(
        "--rows",
        nargs="+",
        type=int,
        default=None,
        help="rows timed per architecture, in --archs order (default: all n for the ConvNet GP, "
        "2000 for the others); fewer than n projects the full symmetric matrix's time",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--backend",
        default=None,
        choices=["auto", "eager", "inductor", "native"],
        help="default: torch.compile on a GPU, the native kernel on a CPU",
    )
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--budget-gb", type=float, default=None, help="memory budget of the tiles")
    p.add_argument("--warmup", type=int, default=256, help="images of the warm-up Gram")
    p.add_argument("--check", type=int, default=16, help="corner checked against eager float64")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device here; use --device cpu for a smoke run")
    if args.backend is None:
        args.backend = "inductor" if device.type == "cuda" else "native"
    dtype = getattr(torch, args.dtype)
    rows = args.rows or [args.n if a == "convnet_gp" else 2000 for a in args.archs]
    if len(rows) != len(args.archs):
        p.error(f"--rows gives {len(rows)} values for {len(args.archs)} architectures")
    x, source = _images(args.n)
    args.warmup = min(args.warmup, args.n)

    lines = [
        "",
        f"### Full-scale Gram on {_device_name(device)} ({time.strftime('%Y-%m-%d')})",
        "",
        f"torch {torch.__version__}, {args.dtype}, backend={args.backend}, {source}. "
        f"Command: `{' '.join(['python benchmarks/bench_gpu.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        "| architecture | block timed | seconds | entries/s | full n x n (projected) | compile + warm-up | "
        "peak memory | max rel. error vs float64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in zip(args.archs, rows, strict=True):
        res = run_arch(name, x, r, device, dtype, args)
        kind = "measured" if res["rows"] == res["n"] else "projected"
        lines.append(
            f"| {ARCHS[name]} | {res['rows']} x {res['n']} | {res['seconds']:.1f} | {res['rate']:,.0f} | "
            f"{res['full_s']:,.1f} s ({kind}) | {res['compile_s']:.0f} s | {res['peak_gib']:.2f} GiB | "
            f"{res['rel']:.1e} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
