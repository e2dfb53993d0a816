"""Mutation check: the exactness tests must fail for every deliberately wrong formula.

Runs pytest on the exactness test files once per mutant of ``tests/mutants.py`` (applied by
``tests/conftest.py`` through the environment variable ``CNNGP_MUTANT``), plus once unmutated, and
prints a table of mutant -> failing tests. Exits non-zero if the unmutated run fails or any mutant
survives (no failing test). Not collected by pytest; run it as ``python tests/mutation_check.py``
(``--write FILE`` also writes the table as Markdown, ``--mutant NAME`` restricts the run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mutants import MUTANTS  # noqa: E402

FILES = [
    "test_reference_agreement.py",
    "test_conv.py",
    "test_relu.py",
    "test_pooling.py",
    "test_dense.py",
    "test_nonlinearities.py",
    "test_layer_contract.py",
    "test_ntk.py",
    "test_native.py",
    "test_gradients.py",
]


def run(mutant: str | None) -> tuple[dict[str, tuple[int, int]], float]:
    """{file: (failed, total)} from one pytest run over all the files, and the wall time."""
    env = dict(os.environ)
    env.pop("CNNGP_MUTANT", None)
    if mutant:
        env["CNNGP_MUTANT"] = mutant
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *(str(HERE / f) for f in FILES)],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    counts = {name: [0, 0] for name in FILES}
    for line in proc.stdout.splitlines():
        match = re.match(r"(PASSED|FAILED|ERROR) (?:\S*/)?(test_\w+\.py)::", line)
        if match and match.group(2) in counts:
            outcome, name = match.groups()
            counts[name][1] += 1
            counts[name][0] += outcome != "PASSED"
    if proc.returncode not in (0, 1) or not any(total for _, total in counts.values()):
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"pytest could not run the tests for mutant {mutant!r} (exit {proc.returncode})")
    return {name: (f, t) for name, (f, t) in counts.items()}, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutant", action="append", choices=sorted(MUTANTS), help="only these mutants")
    parser.add_argument("--write", type=Path, help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    names = args.mutant or list(MUTANTS)

    header = "| mutant | " + " | ".join(FILES) + " | total failing | verdict |"
    rule = "|" + "---|" * (len(FILES) + 3)
    lines = [header, rule]
    ok = True
    print(header, rule, sep="\n", flush=True)
    for mutant in [None, *names]:
        counts, seconds = run(mutant)
        failed = sum(f for f, _ in counts.values())
        if mutant is None:
            verdict = "clean" if failed == 0 else "BASELINE FAILS"
            ok &= failed == 0
        else:
            verdict = "killed" if failed else "SURVIVED"
            ok &= failed > 0
        cells = " | ".join(f"{f}/{t}" for f, t in counts.values())
        line = f"| {mutant or '(none)'} | {cells} | {failed} | {verdict} ({seconds:.0f} s) |"
        lines.append(line)
        print(line, flush=True)
    if args.write:
        args.write.write_text("\n".join(lines) + "\n")
    print("all mutants killed" if ok else "MUTATION CHECK FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
