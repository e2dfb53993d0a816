"""A pooled CNN-GP next to the paper's architectures on MNIST and Fashion-MNIST subsets.

For each data set this runs ``cnngp table`` (resumable kernel stores, the paper's classifier) with the
given configurations and subset sizes, then writes one table and one bar chart of test errors:

    python experiments/pooled_mnist.py --n-train 1000 --n-val 500 --n-test 1000 --workdir runs/pooled

Configurations are names of :data:`gpytorch_cnngp.architectures.ARCHITECTURES`; ``pooled_cnn_gp`` is
two conv/ReLU/2x2-average-pool stages and a dense readout (see its docstring). Writes
``results.json``, ``results.md`` (from ``cnngp table``) and ``test_errors.png`` in the work folder.
Interrupted runs resume where they stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpytorch_cnngp import cli
from gpytorch_cnngp.architectures import ARCHITECTURES

DEFAULT_CONFIGS = ["convnet_gp", "resnet32_gp", "pooled_cnn_gp"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: d != "mnist")
    configs = list(dict.fromkeys(r["config"] for r in rows))
    width = 0.8 / max(1, len(configs))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(datasets), 3.6))
    for j, config in enumerate(configs):
        heights = []
        for ds in datasets:
            match = [r for r in rows if r["dataset"] == ds and r["config"] == config]
            heights.append(100 * match[-1]["test_error"] if match else float("nan"))
        xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(datasets))]
        bars = ax.bar(xs, heights, width, label=cli._PAPER_NAMES.get(config, config))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(datasets)), [cli._DATA_NAMES.get(d, d) for d in datasets])
    sizes = {(r["n_train"], r["n_test"]) for r in rows}
    caption = ", ".join(f"{n} train / {t} test" for n, t in sorted(sizes))
    ax.set_ylabel("test error (%)")
    ax.set_title(f"CNN-GP classifiers on subsets ({caption})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=tuple(ARCHITECTURES))
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=["mnist", "fashion_mnist"])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--workdir", type=Path, default=Path("runs/pooled_mnist"))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)

    for ds in args.datasets:
        cmd = ["table", "--configs", *args.configs, "--dataset", ds, "--n-train", str(args.n_train)]
        cmd += ["--n-val", str(args.n_val), "--n-test", str(args.n_test), "--workdir", str(args.workdir)]
        cmd += ["--dtype", args.dtype]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        code = cli.main(cmd)
        if code:
            return code
    rows = json.loads((args.workdir / "results.json").read_text())
    wanted = [
        r
        for r in rows
        if r["config"] in args.configs
        and r.get("dataset", "mnist") in args.datasets
        and (r["n_train"], r["n_val"], r["n_test"]) == (args.n_train, args.n_val, args.n_test)
    ]
    plot(wanted, args.workdir / "test_errors.png")
    print(f"wrote {args.workdir / 'test_errors.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
