"""The same kernel benchmark on two revisions of the library, alternated in one run.

Run ``python benchmarks/bench_revisions.py --old REV`` from a clean checkout (``--help`` for options). A
temporary ``git worktree`` of ``REV`` is made; then, ``--rounds`` times, ``benchmarks/bench_kernels.py`` of
each revision (``--no-write``, its own default sizes) runs with that revision's package first on
``PYTHONPATH``, alternating old and new so that a machine that slows down or speeds up during the run
affects both alike. Each figure is the median over rounds of bench_kernels' own medians; the ratio
new / old is the median of the per-round ratios. Results are appended to ``benchmarks/RESULTS.md``.
Meant for refactors that must not change speed; ``--new REV`` measures a committed revision instead of the
working tree (so that the tree can change meanwhile).
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


if __name__ == "__main__":
    main()
