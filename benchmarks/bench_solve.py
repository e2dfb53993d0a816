"""Time and peak memory of the classifier (`cnngp classify`) on large kernel stores, bounded and dense.

The stores hold a cheap positive-definite kernel of real MNIST pixels (a Gaussian kernel of the flattened
digits, float32 as the pipeline stores them), with ``n`` training images and 1000 validation and test images
each, under ``--store-dir`` (default ``~/.cache/gpytorch_cnngp/bench_solve``; made once, reused). Each
measurement runs in a fresh process and reports its wall time, the solve's own time, and its peak resident
memory (VmHWM) above the resident memory after the imports:

* ``bounded``: ``cnngp classify STORE --memory-budget B`` (the blocked factorisation; panels on disk when
  the budget cannot hold them);
* ``dense``: the plain alternative, a float64 copy of Kxx factorised by ``torch.linalg.cholesky``, only
  where it fits this machine (about 20 n^2 bytes).

Both runs' predictions are compared, and their dual coefficients (relative max difference).

    python benchmarks/bench_solve.py --sizes 10000 20000 50000 --budget 2GB
    python benchmarks/bench_solve.py --sizes 6000 --budget 128MB          # the issue's "done when" case
    python benchmarks/bench_solve.py --smoke                              # tiny, for the tests

Results are appended to ``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernels import machine, report  # noqa: E402

_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[5])
from bench_memory import _status as status
import numpy as np, torch, h5py
from gpytorch_cnngp import cli, classify
from gpytorch_cnngp.store import KernelStore
mode, store, budget, out = sys.argv[1:5]
base = status("VmRSS")
t0 = time.perf_counter()
if mode == "bounded":
    code = cli.main(["classify", store, "--memory-budget", budget, "--no-progress", "--solve-device", "cpu",
                     "--json", out + ".json", "--dual", out + ".npz"])
    assert code == 0, code
    row = json.load(open(out + ".json"))
    solve, factor, jitter = row["seconds"]["solve"], row["factor"], row["jitter"]
else:
    with KernelStore.open(store) as s:
        Kxx = torch.from_numpy(s.read("Kxx"))
        Kvx, Ktx = s.read("Kvx"), s.read("Ktx")
        y = s.labels("train")
    t1 = time.perf_counter()
    L, jitter = classify.cholesky_with_jitter(Kxx)
    del Kxx
    A = torch.cholesky_solve(classify.one_hot_targets(y), L)
    solve, factor = time.perf_counter() - t1, "dense"
    np.savez(out + ".npz", A=A.numpy(), val_predictions=classify.predict(Kvx, A).numpy(),
             test_predictions=classify.predict(Ktx, A).numpy())
wall = time.perf_counter() - t0
json.dump({"wall": wall, "solve": solve, "base": base, "peak": status("VmHWM"), "jitter": jitter, "factor": factor},
          open(out + ".m.json", "w"))
"""


def _mnist_pixels(n: int, synthetic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST training digits (flattened, scaled to [0, 1]) and labels (or random ones)."""
    if synthetic:
        rng = np.random.default_rng(0)
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)
    from gpytorch_cnngp import datasets

    images, labels = datasets.load_mnist(download=True, progress=False)
    return images[:n].reshape(n, -1).astype(np.float32) / 255.0, labels[:n].astype(np.int64)


def make_store(path: Path, n: int, n_eval: int, tile: int = 2048, synthetic: bool = False) -> Path:
    """A complete store of a Gaussian kernel of MNIST pixels: train ``n``, validation and test ``n_eval`` each."""
    import torch

    from gpytorch_cnngp.store import KernelStore, StoreMeta

    if path.exists():
        return path
    total = n + 2 * n_eval
    X, y = _mnist_pixels(total, synthetic)
    Xt = torch.from_numpy(X).double()
    sq = (Xt * Xt).sum(1)
    lengthscale2 = 2.0 * float(sq.mean())  # distances between digits are of the order of their norms

    def kernel(r: slice, c: slice) -> np.ndarray:
        d2 = (sq[r, None] + sq[None, c] - 2 * Xt[r] @ Xt[c].T).clamp_min(0)
        return torch.exp(-d2 / lengthscale2).float().numpy()

    parts = {"train": slice(0, n), "val": slice(n, n + n_eval), "test": slice(n + n_eval, total)}
    labels = {p: y[s] for p, s in parts.items()}
    meta = StoreMeta(
        architecture="gaussian_pixels",
        hyperparameters={"lengthscale2": lengthscale2},
        dtype="float32",
        dataset="mnist",
        split="first_digits",
        checksums={},
        n_train=n,
        n_val=n_eval,
        n_test=n_eval,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with KernelStore.create(path, meta, labels, tile) as store:
        for block in store.pending():
            rp = parts[block.row_part]
            rows = slice(rp.start + block.rows[0], rp.start + block.rows[1])
            if block.cols is None:  # a diagonal: k(x, x) = 1
                store.write_block(block, np.ones(block.rows[1] - block.rows[0], np.float32))
            else:
                cols = slice(block.cols[0], block.cols[1])
                store.write_block(block, kernel(rows, cols))
    print(f"made {path} ({n} train) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def run(mode: str, store: Path, budget: str, scratch: Path) -> dict:
    """One classifier run in a fresh process: its measurements, dual coefficients and predictions."""
    out = scratch / f"{store.stem}-{mode}"
    cmd = [sys.executable, "-c", _WORKER, mode, str(store), budget, str(out), str(HERE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"{mode} classifier failed on {store}")
    m = json.loads(Path(str(out) + ".m.json").read_text())
    with np.load(str(out) + ".npz") as z:
        m["A"] = z["A"]
        m["preds"] = np.concatenate([z["val_predictions"], z["test_predictions"]])
    return m


def fits_dense(n: int) -> bool:
    from gpytorch_cnngp.memory import available_memory

    avail = available_memory() or 0
    return 20 * n * n < 0.9 * avail


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[10000, 20000, 50000])
    p.add_argument("--budget", default="2GB", help="memory budget of the bounded runs (default %(default)s)")
    p.add_argument("--n-eval", type=int, default=1000, help="validation and test images each")
    p.add_argument("--store-dir", default=str(Path.home() / ".cache" / "gpytorch_cnngp" / "bench_solve"))
    p.add_argument("--no-dense", action="store_true", help="skip the dense runs")
    p.add_argument(
        "--smoke", action="store_true", help="a tiny run of random pixels (n = 600, budget 2MB), not written"
    )
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.budget, args.n_eval, args.no_write = [600], "2MB", 50, True
    store_dir = Path(args.store_dir)
    scratch = store_dir / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    lines = [
        f"### bench_solve: the classifier on stores of MNIST pixel kernels ({time.strftime('%Y-%m-%d')}, {machine()})",
        "",
        "Peak RSS is VmHWM above the resident memory after the imports (numpy, torch, h5py, gpytorch_cnngp); "
        "wall is the whole classifier (reads, factorisation, solves, predictions) in a fresh process.",
        "",
        "| n_train | path | budget | factor | wall | factorisation + solve | peak RSS above imports "
        "| same predictions as dense | max rel. diff. of A |",
        "|---:|---|---|---|---:|---:|---:|---|---:|",
    ]
    for n in args.sizes:
        name = f"{'random' if args.smoke else 'gauss'}_{n}_{args.n_eval}.h5"
        store = make_store(store_dir / name, n, args.n_eval, synthetic=args.smoke)
        bounded = run("bounded", store, args.budget, scratch)
        dense = run("dense", store, args.budget, scratch) if not args.no_dense and fits_dense(n) else None
        same, rel = "-", "-"
        if dense is not None:
            same = "yes" if np.array_equal(bounded["preds"], dense["preds"]) else "NO"
            rel = f"{np.abs(bounded['A'] - dense['A']).max() / np.abs(dense['A']).max():.1e}"
        for name, m in (("bounded", bounded), ("dense", dense)):
            if m is None:
                continue
            first = name == "bounded"
            lines.append(
                f"| {n} | {name} | {args.budget if first else '-'} | {m['factor']} | {m['wall']:.1f} s "
                f"| {m['solve']:.1f} s | {(m['peak'] - m['base']) / 1e6:,.0f} MB | {same if first else '-'} "
                f"| {rel if first else '-'} |"
            )
            print(lines[-1], flush=True)
    report(lines, args)


if __name__ == "__main__":
    main()
