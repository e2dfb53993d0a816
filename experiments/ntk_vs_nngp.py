"""The neural tangent kernel against the NNGP on MNIST and Fashion-MNIST subsets, with and without pooling.

For each data set and architecture, both kernels come from one pass (``gram(..., get=("nngp", "ntk"))``) on
the first ``--n-train`` training and ``--n-test`` test images; each is used for kernel regression on centred
one-hot targets (the mean of the GP posterior, and the output of the infinitely wide network trained to
convergence by gradient descent on the squared loss for the NTK), solved in float64 with the smallest jitter
that factorises. Writes ``results.json``, ``results.md`` (a table of test errors) and ``test_errors.png`` (a bar
chart) in the work folder; each data set's kernels are kept in ``kernels_<dataset>_<arch>_<n>.npz`` there, so
an interrupted run resumes::

    python experiments/ntk_vs_nngp.py --n-train 200 --n-test 500 --workdir runs/ntk_vs_nngp

The architectures (``--archs``): ``conv``, three 3x3 convolutions (the first with stride 2) with ReLUs and a
dense readout; ``pooled``, the same with a 2x2 average pool before the last convolution. Pooling makes every
layer before it carry full spatial covariances, about a hundred times the cost, hence the small default subsets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, ReLU, Sequential, gram
from gpytorch_cnngp.datasets import load_split

ARCHS = {
    "conv": lambda: Sequential(
        Conv2d(3, stride=2, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Dense(var_weight=2.0, var_bias=0.1),
    ),
    "pooled": lambda: Sequential(
        Conv2d(3, stride=2, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        AvgPool2d(2),
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Dense(var_weight=2.0, var_bias=0.1),
    ),
}
DATA_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def kernels(arch: str, x_train: torch.Tensor, x_test: torch.Tensor, path: Path) -> tuple[dict, float]:
    """``{"nngp": (Ktt, Kst), "ntk": (...)}`` in float64, computed once and kept in ``path``; and the seconds."""
    if path.exists():
        with np.load(path) as f:
            return {
                k: (torch.from_numpy(f[f"{k}_tt"]), torch.from_numpy(f[f"{k}_st"])) for k in ("nngp", "ntk")
            }, float(f["seconds"])
    model = ARCHS[arch]()
    started = time.perf_counter()
    tt = gram(model, x_train, get=("nngp", "ntk"), progress=True)
    st = gram(model, x_test, x_train, get=("nngp", "ntk"), progress=True)
    seconds = time.perf_counter() - started
    out = {"nngp": (tt[0], st[0]), "ntk": (tt[1], st[1])}
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"{k}_{p}": v[i].numpy() for k, v in out.items() for i, p in enumerate(("tt", "st"))}
    np.savez(tmp, seconds=seconds, **arrays)
    tmp.replace(path)  # a kill mid-write leaves no half file under the real name
    return out, seconds


def regress(k_tt: torch.Tensor, k_st: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Predicted classes of kernel regression on centred one-hot targets, and the jitter it needed."""
    y = torch.full((len(labels), 10), -0.1, dtype=torch.float64)
    y[torch.arange(len(labels)), labels] = 0.9
    scale = float(k_tt.diagonal().mean())
    for jitter in (0.0, *(scale * 10.0**e for e in range(-10, -1))):
        factor, info = torch.linalg.cholesky_ex(k_tt + jitter * torch.eye(len(k_tt), dtype=k_tt.dtype))
        if int(info) == 0:
            alpha = torch.cholesky_solve(y, factor)
            return (k_st @ alpha).argmax(1), jitter
    raise RuntimeError("the training kernel is not positive definite even with a jitter of 1e-2 of its diagonal")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    groups = list(dict.fromkeys((r["arch"], r["kernel"]) for r in rows))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(2.0 + 2.4 * len(datasets), 3.6))
    for j, (arch, kernel) in enumerate(groups):
        heights = [
            100
            * next(r["test_error"] for r in rows if r["dataset"] == ds and (r["arch"], r["kernel"]) == (arch, kernel))
            for ds in datasets
        ]
        xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(datasets))]
        bars = ax.bar(xs, heights, width, label=f"{arch}, {kernel.upper()}", hatch="//" if kernel == "ntk" else None)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(datasets)), [DATA_NAMES[d] for d in datasets])
    ax.set_ylabel("test error (%)")
    n = rows[0]
    ax.set_title(f"NTK and NNGP kernel regression ({n['n_train']} train / {n['n_test']} test)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=list(DATA_NAMES))
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--workdir", type=Path, default=Path("runs/ntk_vs_nngp"))
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds in args.datasets:
        split = load_split(ds, "mnist", n_train=args.n_train, n_val=0, n_test=args.n_test, data_dir=args.data_dir)
        (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
        for arch in args.archs:
            path = args.workdir / f"kernels_{ds}_{arch}_{args.n_train}-{args.n_test}.npz"
            ks, seconds = kernels(arch, x_train, x_test, path)
            for kernel, (k_tt, k_st) in ks.items():
                predicted, jitter = regress(k_tt, k_st, y_train)
                error = float((predicted != y_test).double().mean())
                rows.append(
                    {
                        "dataset": ds,
                        "arch": arch,
                        "kernel": kernel,
                        "n_train": args.n_train,
                        "n_test": args.n_test,
                        "test_error": error,
                        "jitter": jitter,
                        "kernel_seconds": seconds,
                    }  # fmt: skip
                )
                print(f"{DATA_NAMES[ds]:14s} {arch:7s} {kernel.upper():5s} test error {100 * error:5.2f}%", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"Kernel regression on the first {args.n_train} training and {args.n_test} test images (float64 kernels; "
        "both kernels of an architecture from one pass, seconds for both).",
        "",
        "| data | architecture | NNGP test error | NTK test error | kernel seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for ds in args.datasets:
        for arch in args.archs:
            pair = {r["kernel"]: r for r in rows if r["dataset"] == ds and r["arch"] == arch}
            lines.append(
                f"| {DATA_NAMES[ds]} | {arch} | {100 * pair['nngp']['test_error']:.2f}% | "
                f"{100 * pair['ntk']['test_error']:.2f}% | {pair['nngp']['kernel_seconds']:.0f} |"
            )
    (args.workdir / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.workdir / "test_errors.png")
    print("\n".join(lines))
    print(f"wrote {args.workdir / 'results.md'} and {args.workdir / 'test_errors.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
