"""Pooled networks at native speed: this tree's default call against an older revision's, in one run.

Run ``python benchmarks/bench_pooled_native.py`` (``--help`` for options) from a clean checkout. A temporary
``git worktree`` of ``--old`` (default ``0599eb5``, the revision before pooled networks ran natively) is made, and
one worker process per revision computes cross kernels ``K(X, Z)`` of 28x28 MNIST digits (uniform noise with
``--images noise``, or where MNIST is not cached), float32, with that revision's default call
(``gram(model, X, Z)``: ``backend="auto"``).
The two workers take turns, one call each, ``--repeats`` times, so that a machine whose speed drifts slows both
alike; each side's rate is the median of its calls, in entries per second (``n x n`` entries per call). The old
revision is given fewer images (``--n-old``): its eager path's rate does not depend on ``n``, while this tree's
includes each image's self pass, which a small ``n`` would weigh too much.

Networks, built from layers both revisions have:

* ``pooled_cnn_gp``: Conv3/2-ReLU-Conv3-ReLU-AvgPool2-Conv3-ReLU-Dense (a local pool before a dense readout);
* ``gap_cnn``: Conv3-ReLU-AvgPool2-Conv3-ReLU-GlobalAvgPool-Dense (the neural-tangents comparison's network);
* ``myrtle5``: Myrtle-5 (Shankar et al. 2020): [Conv3-ReLU] x2, AvgPool2, Conv3-ReLU, AvgPool2, Conv3-ReLU,
  GlobalAvgPool, Dense, He-scaled.

This tree also times the NNGP and the NTK together (``get=("nngp", "ntk")``) against the NNGP alone, turn about.
With ``--symmetric`` both compute symmetric Grams ``K(X, X)`` instead (rates in distinct entries, ``n (n + 1) / 2``
per call), where the diagonal's own values and the square tiles on the diagonal count.
Results are appended to ``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_kernels import machine, report  # noqa: E402

# runs in each revision's worker process (its own package first on PYTHONPATH): one JSON command per line
WORKER = r"""
import json, sys, time
import torch
from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, ReLU, Sequential, gram

def conv(stride=1, w=2.0, b=0.05):
    return Conv2d(3, stride=stride, var_weight=w, var_bias=b)

NETWORKS = {
    "pooled_cnn_gp": lambda: Sequential(conv(2), ReLU(), conv(), ReLU(), AvgPool2d(2), conv(), ReLU(),
                                        Dense(var_weight=2.0, var_bias=0.05)),
    "gap_cnn": lambda: Sequential(conv(), ReLU(), AvgPool2d(2), conv(), ReLU(), GlobalAvgPool2d(),
                                  Dense(var_weight=2.0, var_bias=0.05)),
    "myrtle5": lambda: Sequential(conv(b=0.0), ReLU(), conv(b=0.0), ReLU(), AvgPool2d(2), conv(b=0.0), ReLU(),
                                  AvgPool2d(2), conv(b=0.0), ReLU(), GlobalAvgPool2d(),
                                  Dense(var_weight=2.0, var_bias=0.0)),
}

def images(n, seed, kind):
    if kind == "mnist":
        try:
            from gpytorch_cnngp import datasets
            data, _ = datasets.load_mnist(download=False, progress=False)
            return torch.from_numpy(data[seed * n:(seed + 1) * n].copy()).float().unsqueeze(1) / 255.0, "mnist"
        except Exception:
            pass
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)), "noise"

models, inputs = {}, {}
for line in sys.stdin:
    cmd = json.loads(line)
    name, n = cmd["net"], cmd["n"]
    model = models.setdefault(name, NETWORKS[name]())
    key = (name, n, cmd["images"])
    if key not in inputs:
        (x, kind), (z, _) = images(n, 0, cmd["images"]), images(n, 1, cmd["images"])
        inputs[key] = (x, z, kind)
        gram(model, x[:4], z[:4])  # warm-up: the kernel's build, the plans
    x, z, kind = inputs[key]
    kwargs = {"get": ("nngp", "ntk")} if cmd.get("ntk") else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        gram(model, x, None if cmd.get("symmetric") else z, **kwargs)
    print(json.dumps({"seconds": time.perf_counter() - t0, "images": kind}), flush=True)
"""


# images per side for the old revision's eager calls: about a second each, so that its self pass does not dominate
OLD_N = {"pooled_cnn_gp": 24, "gap_cnn": 10, "myrtle5": 5}


class Worker:
    """A persistent process computing kernels with one revision's package."""

    def __init__(self, tree: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree
        )

    def call(self, **cmd) -> tuple[float, str]:
        """Seconds of one call, and the images it used (``noise`` where MNIST was asked for but not cached)."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker stopped (exit {self.proc.wait()})")
        answer = json.loads(line)
        return answer["seconds"], answer["images"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default="0599eb5", help="the revision to compare with (a commit, tag or branch)")
    p.add_argument("--nets", nargs="+", default=["pooled_cnn_gp", "gap_cnn", "myrtle5"])
    p.add_argument("--n", type=int, default=128, help="images per side for this tree")
    p.add_argument(
        "--n-old", type=int, default=None, help="images per side for the old revision (default: about a second a call)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--images",
        choices=["mnist", "noise"],
        default="mnist",
        help="MNIST digits (black borders: zero variances, which the ReLU skips) or uniform noise (none)",
    )
    p.add_argument(
        "--symmetric",
        action="store_true",
        help="symmetric Grams K(X, X) instead of cross kernels (rates: distinct entries, n (n + 1) / 2, per second)",
    )
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    entries = (lambda n: n * (n + 1) / 2) if args.symmetric else (lambda n: n * n)
    n_old = {net: args.n_old or OLD_N.get(net, 8) for net in args.nets}
    rows, used = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        old, new = Worker(old_tree), Worker(ROOT)
        try:
            for net in args.nets:
                times = {"old": [], "new": [], "new, NNGP + NTK": []}
                for r in range(args.repeats):
                    turns = [("old", old, n_old[net], False), ("new", new, args.n, False)]
                    turns.append(("new, NNGP + NTK", new, args.n, True))
                    for label, worker, n, ntk in turns if r % 2 == 0 else turns[::-1]:
                        seconds, kind = worker.call(net=net, n=n, ntk=ntk, images=args.images, symmetric=args.symmetric)
                        times[label].append(seconds)
                        used.add(kind)
                        print(f"{net} {label} n={n}: {times[label][-1]:.2f} s", flush=True)
                rate = {
                    label: entries(n_old[net] if label == "old" else args.n) / statistics.median(t)
                    for label, t in times.items()
                }
                rows.append((net, rate))
        finally:
            old.close()
            new.close()
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)
    lines = [
        f"### Pooled networks: default call against {args.old} ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_pooled_native.py {' '.join(argv or sys.argv[1:])}`. "
        f"{'Symmetric Grams' if args.symmetric else 'Cross kernels'} of 28x28 images ({' and '.join(sorted(used))}), "
        f"float32, `gram(model, X{'' if args.symmetric else ', Z'})`; {args.old}: "
        f"{', '.join(f'{k} {v} x {v}' for k, v in n_old.items())} images, this tree: {args.n} x {args.n}; "
        f"medians of {args.repeats} calls taken in turn.",
        "",
        f"| network | {args.old} entries/s | now entries/s | x {args.old} | NNGP + NTK entries/s | / NNGP alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for net, rate in rows:
        both = rate["new, NNGP + NTK"]
        lines.append(
            f"| {net} | {rate['old']:,.0f} | {rate['new']:,.0f} | {rate['new'] / rate['old']:,.1f} | {both:,.0f} | "
            f"{both / rate['new']:.2f} |"
        )
    report(lines, args)


if __name__ == "__main__":
    main()
