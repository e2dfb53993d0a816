"""MNIST test error of a CNN-GP for growing training subsets, from one resumable kernel store.

The training sets of the published splits are taken in split order, so the kernel of the first
``n`` training images is the leading block of the kernel of the first ``N >= n``. This script
computes one store for the largest size (``cnngp kernels``: resumable, kill-safe) and runs the
paper's classifier on each leading block. The kernel time quoted for a subset is the compute time
recorded for the store blocks inside it (blocks straddling the boundary count pro rata), i.e. what
computing that subset alone would have taken on this machine.

    python experiments/mnist_subsets.py --n-train 1000 5000 10000 --n-test 10000 --workdir runs/subsets

Writes ``results.json`` and ``results.md`` in the work folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gpytorch_cnngp import cli
from gpytorch_cnngp.architectures import PAPER_RESULTS
from gpytorch_cnngp.classify import error_rate, one_hot_targets, predict, solve_kernel
from gpytorch_cnngp.store import KernelStore


def _prefix_seconds(store: KernelStore, name: str, rows: int, cols: int) -> float:
    """Compute seconds of the part ``[:rows, :cols]`` of ``name``, pro rata over straddling blocks."""
    seconds = store.seconds(name)
    total = 0.0
    for block in store.blocks(name):
        r0, r1 = block.rows
        c0, c1 = block.cols
        # Kxx keeps only blocks on and above the diagonal (each computed once), so this counts its work once
        inside = max(0, min(r1, rows) - r0) * max(0, min(c1, cols) - c0)
        total += seconds[block.index] * inside / ((r1 - r0) * (c1 - c0))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="convnet_gp")
    p.add_argument("--split", default="mnist_as_tf")
    p.add_argument("--n-train", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--workdir", type=Path, default=Path("runs/mnist_subsets"))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "inductor", "native"])
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)

    sizes = sorted(set(args.n_train))
    args.workdir.mkdir(parents=True, exist_ok=True)
    store_path = args.workdir / f"{args.config}_{args.split}_{sizes[-1]}_{args.n_val}_{args.n_test}_{args.dtype}.h5"
    kernels = ["kernels", "--config", args.config, "--split", args.split, "--n-train", str(sizes[-1])]
    kernels += ["--n-val", str(args.n_val), "--n-test", str(args.n_test), "--out", str(store_path)]
    kernels += ["--dtype", args.dtype, "--backend", args.backend]
    if args.tile_size:
        kernels += ["--tile-size", str(args.tile_size)]
    if args.data_dir:
        kernels += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    code = cli.main(kernels)
    if code:
        return code
    wall = time.perf_counter() - t0

    rows = []
    with KernelStore.open(store_path) as store:
        Kxx_all = store.read("Kxx")
        Kvx_all, Ktx_all = store.read("Kvx"), store.read("Ktx")
        y_train, y_val, y_test = store.labels("train"), store.labels("val"), store.labels("test")
        for n in sizes:
            t1 = time.perf_counter()
            Kxx = torch.from_numpy(np.ascontiguousarray(Kxx_all[:n, :n]))
            A, jitter = solve_kernel(Kxx, one_hot_targets(y_train[:n]))
            val_err = error_rate(predict(Kvx_all[:, :n], A), y_val) if args.n_val else None
            test_err = error_rate(predict(Ktx_all[:, :n], A), y_test) if args.n_test else None
            solve = time.perf_counter() - t1
            kernel_s = (
                _prefix_seconds(store, "Kxx", n, n)
                + _prefix_seconds(store, "Kvx", args.n_val, n)
                + _prefix_seconds(store, "Ktx", args.n_test, n)
            )
            rows.append(
                {
                    "config": args.config,
                    "split": args.split,
                    "n_train": n,
                    "n_val": args.n_val,
                    "n_test": args.n_test,
                    "val_error": val_err,
                    "test_error": test_err,
                    "jitter": jitter,
                    "kernel_seconds": kernel_s,
                    "solve_predict_seconds": solve,
                    "dtype": args.dtype,
                    "device": "cpu",
                }
            )
            print(
                f"n_train={n}: val error {val_err:.4f}, test error {test_err:.4f}, kernels {kernel_s:.0f} s, "
                f"solve+predict {solve:.1f} s",
                flush=True,
            )
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=2))
    paper = PAPER_RESULTS.get(args.config)
    lines = [
        f"{args.config} on MNIST ({args.split}), {args.n_val} validation and {args.n_test} test images, {args.dtype}; "
        f"store computed in {wall:.0f} s wall.",
        "",
        "| n_train | validation error | test error | kernel time (s) | solve + predict (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_train']} | {100 * r['val_error']:.2f}% | {100 * r['test_error']:.2f}% | "
            f"{r['kernel_seconds']:.0f} | {r['solve_predict_seconds']:.1f} |"
        )
    if paper:
        lines.append(f"| 50000 (paper) | {100 * paper[0]:.2f}% | {100 * paper[1]:.2f}% | | |")
    (args.workdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
