"""The same kernel benchmark on two revisions of the library, alternated in one run.

Run ``python benchmarks/bench_revisions.py --old REV`` from a clean checkout (``--help`` for options). A
temporary ``git worktree`` of ``REV`` is made; then, ``--rounds`` times, ``benchmarks/bench_kernels.py`` of
each revision (``--no-write``, its own default sizes) runs with that revision's package first on
``PYTHONPATH``, alternating old and new so that a machine that slows down or speeds up during the run
affects both alike. Each figure is the median over rounds of bench_kernels' own medians; the ratio
new / old is the median of the per-round ratios. Results are appended to ``benchmarks/RESULTS.md``.
Meant for refactors that must not change speed; ``--new REV`` measures a committed revision instead of the
working tree (so that the tree can change meanwhile).

``--calls N`` measures call by call instead: one persistent worker process per revision (and per architecture
and dtype) builds its inputs once, then the two take turns, one ``K(X, Z)`` call each, N times, the order within
a pair swapped every pair. A pair's two calls are a fraction of a second apart, so a host whose speed drifts
between rounds (a shared virtual machine) slows both alike; the ratio is the median of the per-pair ratios,
with its quartiles.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

LINE = re.compile(r"^(\S+)\s+(float32|float64)\s+(\S+)\s+n=\s*(\d+)\s+([\d,]+) entries/s")


def _run(tree: Path, bench_args: list[str]) -> dict[tuple[str, str, str], float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_kernels.py"), "--no-write", *bench_args]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"bench_kernels.py failed in {tree}")
    rates = {}
    for line in out.stdout.splitlines():
        m = LINE.match(line.strip())
        if m:
            rates[(m.group(1), m.group(2), m.group(3))] = float(m.group(5).replace(",", ""))
    if not rates:
        raise SystemExit(f"no figures in the output of bench_kernels.py in {tree}:\n{out.stdout}")
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the revision to compare with (a commit, tag or branch)")
    p.add_argument("--new", default=None, help="the revision to compare (default: this working tree)")
    p.add_argument("--n", type=int, default=None, help="images per side for every method (bench_kernels' --n)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--archs", nargs="+", default=["convnet_gp", "resnet32_gp"])
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--methods", nargs="+", default=["eager", "compiled"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per bench_kernels measurement")
    p.add_argument("--calls", type=int, default=None, help="paired mode: alternate single calls this many times")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    bench_args = ["--archs", *args.archs, "--dtypes", *args.dtypes, "--methods", *args.methods]
    bench_args += ["--repeats", str(args.repeats)] + (["--n", str(args.n)] if args.n else [])
    if args.new is None:
        new_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        new_name = new_rev.stdout.strip() or "working tree"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        if dirty.stdout.strip():
            new_name += " (with uncommitted changes)"
    else:
        new_name = args.new
    with tempfile.TemporaryDirectory() as tmp:
        old_tree, new_tree = Path(tmp) / "old", Path(tmp) / "new"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), args.old], cwd=ROOT, check=True)
        if args.new is None:
            new_tree = ROOT
        else:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(new_tree), args.new], cwd=ROOT, check=True)
        try:
            if args.calls:
                _paired(old_tree, new_tree, args, new_name, argv)
                return
            rounds = []
            for r in range(args.rounds):
                old = _run(old_tree, bench_args)
                new = _run(new_tree, bench_args)
                rounds.append((old, new))
                for key in sorted(new):
                    if key in old:
                        print(f"round {r + 1}: {' '.join(key):40s} old {old[key]:12,.0f}  new {new[key]:12,.0f}  "
                              f"new/old {new[key] / old[key]:.3f}", flush=True)  # fmt: skip
        finally:
            for tree in {old_tree, new_tree} - {ROOT}:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    from bench_kernels import machine, report

    lines = [
        f"### Speed before and after a change ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_revisions.py {' '.join(argv or sys.argv[1:])}`. "
        f"Old: `{args.old}`; new: `{new_name}`. Cross kernels K(X, Z) by `bench_kernels.py` of each revision, "
        f"{args.rounds} rounds alternating old and new; entries/s are medians over rounds, new/old the median of "
        "the per-round ratios.",
        "",
        "| architecture | dtype | method | old entries/s | new entries/s | new / old |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key in sorted(rounds[0][1]):
        if key not in rounds[0][0]:
            continue
        old_rate = statistics.median(o[key] for o, _ in rounds)
        new_rate = statistics.median(n[key] for _, n in rounds)
        ratio = statistics.median(n[key] / o[key] for o, n in rounds)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {old_rate:,.0f} | {new_rate:,.0f} | {ratio:.3f} |")
    report(lines, args)


# one revision's worker: its own bench_kernels builds the call, then each line on stdin runs it once and prints
# the seconds it took
_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
import bench_kernels
from gpytorch_cnngp import architectures
dtype = {"float32": torch.float32, "float64": torch.float64}[sys.argv[3]]
run, _ = bench_kernels._runner(architectures.ARCHITECTURES[sys.argv[2]](), sys.argv[4], int(sys.argv[5]), dtype, None)
run()
run()
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter()
    run()
    print(time.perf_counter() - t, flush=True)
"""


class _Worker:
    def __init__(self, tree: Path, arch: str, dtype: str, method: str, n: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = [sys.executable, "-c", _WORKER, str(tree / "benchmarks"), arch, dtype, method, str(n)]
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker in {tree} failed to start ({arch}, {dtype})")

    def call(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("a worker died")
        time.sleep(0.02)  # let its OpenMP workers stop spinning before the other process runs
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _paired(old_tree: Path, new_tree: Path, args: argparse.Namespace, new_name: str, argv) -> None:
    from bench_kernels import machine, report

    n = args.n or 192
    lines = [
        f"### Speed before and after a change, call by call ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_revisions.py {' '.join(argv or sys.argv[1:])}`. "
        f"Old: `{args.old}`; new: `{new_name}`. One worker process per revision takes turns with the other, one "
        f"K(X, Z) call ({n} x {n} images) each, {args.calls} pairs; entries/s are medians over calls, new/old the "
        "median of the per-pair time ratios inverted (above 1: the new revision is faster), with the quartiles.",
        "",
        "| architecture | dtype | method | old entries/s | new entries/s | new / old | quartiles |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for arch in args.archs:
        for dtype in args.dtypes:
            for method in args.methods:
                old, new = (_Worker(t, arch, dtype, method, n) for t in (old_tree, new_tree))
                try:
                    pairs = []
                    for k in range(args.calls):
                        if k % 2 == 0:
                            t_old = old.call()
                            t_new = new.call()
                        else:
                            t_new = new.call()
                            t_old = old.call()
                        pairs.append((t_old, t_new))
                finally:
                    old.close()
                    new.close()
                speedups = sorted(o / w for o, w in pairs)
                q1, med, q3 = statistics.quantiles(speedups, n=4) if len(speedups) > 1 else speedups * 3
                rate_old = n * n / statistics.median(o for o, _ in pairs)
                rate_new = n * n / statistics.median(w for _, w in pairs)
                print(f"{arch} {dtype} {method}: new/old {med:.3f} ({q1:.3f}-{q3:.3f})", flush=True)
                rates = f"{rate_old:,.0f} | {rate_new:,.0f}"
                lines.append(f"| {arch} | {dtype} | {method} | {rates} | {med:.3f} | {q1:.3f}-{q3:.3f} |")
    report(lines, args)


if __name__ == "__main__":
    main()
