"""Two versions of the native kernel's C++ source, timed against each other inside one process.

Run ``python benchmarks/bench_kernel_ab.py --old REV`` (``--help`` for options). Both sources, ``REV``'s
``gpytorch_cnngp/backends/native/native_kernel.cpp`` (``backends/native_kernel.cpp`` before the backend was a
package) and this working tree's (or ``--new REV``), are compiled with the library's own flags and loaded side
by side; the same packed images and traces then go through one and the other, alternately, ``--rounds`` times.
Since a pair of calls is a few milliseconds apart, a host whose speed drifts (a shared virtual machine) slows both
alike, and the median of the per-pair time ratios resolves changes of a few percent that separate processes
(``bench_revisions.py``) cannot. Only the kernel is compared: the Python side is this working tree's, so both
sources must have the entry points it calls.

Prints, for each architecture and dtype, the median time of each version and the median and quartiles of
new/old time ratios (below 1: the new source is faster), appended to ``benchmarks/RESULTS.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_kernels import machine, report  # noqa: E402

SOURCE = "gpytorch_cnngp/backends/native/native_kernel.cpp"
OLD_SOURCE = "gpytorch_cnngp/backends/native_kernel.cpp"  # where revisions before the native package kept it


def _source(rev: str | None) -> str:
    if rev is None:
        return (ROOT / SOURCE).read_text()
    for path in (SOURCE, OLD_SOURCE):
        out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout
    raise SystemExit(f"cannot read {SOURCE} (or {OLD_SOURCE}) at {rev}: {out.stderr.strip()}")


def _build(text: str, folder: Path, name: str) -> ctypes.CDLL:
    import os

    from gpytorch_cnngp.backends.native.build import _FLAGS, ENTRY_POINTS
    from gpytorch_cnngp.backends.native.lowering import _FIELDS

    src, lib = folder / f"{name}.cpp", folder / f"{name}.so"
    src.write_text(text)
    compiler = os.environ.get("CXX", "g++")
    proc = subprocess.run([compiler, *_FLAGS, str(src), "-o", str(lib)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: {compiler} failed: {proc.stderr.strip()[-500:]}")
    handle = ctypes.CDLL(str(lib))
    # the entry points run_block, run_block_vjp and their trace packing call (not the self pass)
    used = [e for e in ENTRY_POINTS if e.startswith(("cnngp_run_", "cnngp_vjp_", "cnngp_pack_"))]
    missing = [e for e in used if not hasattr(handle, e)]
    if missing or handle.cnngp_fields() != _FIELDS:
        lacks = ", ".join(missing) or "its instruction layout"
        raise SystemExit(
            f"the {name} source lacks this version's entry points ({lacks}): "
            "compare such revisions with benchmarks/bench_revisions.py instead"
        )
    for entry in used:
        getattr(handle, entry).restype = ctypes.c_int
    return handle


def _inputs(arch: str, n: int, dtype: torch.dtype, grad: bool):
    from gpytorch_cnngp import architectures
    from gpytorch_cnngp.backends.native import lower
    from gpytorch_cnngp.passes import self_pass, spatial_first
    from gpytorch_cnngp.state import Hyper

    model = architectures.ARCHITECTURES[arch]()
    gen = torch.Generator().manual_seed(0)
    x = spatial_first(torch.rand(n, 1, 28, 28, generator=gen, dtype=dtype))
    hyper = Hyper.of(model, dtype, "cpu")
    with torch.no_grad():
        trace, _ = self_pass(model, x, hyper)
    # as the library runs them: the forward with its sums fused into window sums, the gradient's keeping every map
    program = lower(model, (28, 28), reuse=not grad, fuse=not grad)
    params = program.parameter_vector(hyper, dtype)
    weights = torch.rand(n, n, generator=gen, dtype=dtype)
    return program, params, x, trace, weights


def compare(old, new, arch: str, n: int, dtype: torch.dtype, grad: bool, rounds: int, threads: int) -> dict:
    from gpytorch_cnngp.backends.native import run_block, run_block_vjp

    program, params, x, trace, weights = _inputs(arch, n, dtype, grad)

    def call(lib) -> float:
        t0 = time.perf_counter()
        if grad:
            run_block_vjp(lib, program, params, x, x, trace, trace, weights, threads)
        else:
            run_block(lib, program, params, x, x, trace, trace, threads)
        return time.perf_counter() - t0

    call(old), call(new)  # warm-up
    t_old, t_new, ratios = [], [], []
    for r in range(rounds):
        # alternate which goes first, so that neither always finds the caches the other left
        a, b = (call(old), call(new)) if r % 2 == 0 else tuple(reversed((call(new), call(old))))
        t_old.append(a), t_new.append(b), ratios.append(b / a)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {
        "arch": arch,
        "dtype": str(dtype).removeprefix("torch."),
        "pass": "reverse" if grad else "forward",
        "n": n,
        "old_ms": 1e3 * statistics.median(t_old),
        "new_ms": 1e3 * statistics.median(t_new),
        "ratio": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the revision whose kernel source is compared")
    p.add_argument("--new", default=None, help="the other revision (default: this working tree's source)")
    p.add_argument("--archs", nargs="+", default=["convnet_gp", "resnet32_gp"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=64, help="images per side (n x n pairs)")
    p.add_argument("--rounds", type=int, default=30, help="alternated pairs of calls")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grad", action="store_true", help="time the reverse mode (hyperparameter gradients)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        old = _build(_source(args.old), Path(tmp), "old")
        new = _build(_source(args.new), Path(tmp), "new")
        rows = []
        for arch in args.archs:
            for name in args.dtypes:
                row = compare(old, new, arch, args.n, getattr(torch, name), args.grad, args.rounds, args.threads)
                rows.append(row)
                print(
                    f"{row['arch']:<14} {row['dtype']:<8} {row['pass']:<8} old {row['old_ms']:8.2f} ms  "
                    f"new {row['new_ms']:8.2f} ms  new/old {row['ratio']:.3f} "
                    f"(quartiles {row['q1']:.3f}-{row['q3']:.3f})",
                    flush=True,
                )
    command = "python benchmarks/bench_kernel_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"### Native kernel sources A/B in one process ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `{command}`. Old: `{args.old}`; new: `{args.new or 'working tree'}`. "
        f"{args.n} x {args.n} pairs of random 28x28 images, {args.threads} kernel thread(s), {args.rounds} "
        "alternated pairs of calls; times are medians, new/old the median of per-pair time ratios (below 1: faster).",
        "",
        "| architecture | dtype | pass | old ms | new ms | new / old time | quartiles |",
        "|---|---|---|---:|---:|---:|---|",
        *(
            f"| {r['arch']} | {r['dtype']} | {r['pass']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['ratio']:.3f} "
            f"| {r['q1']:.3f}-{r['q3']:.3f} |"
            for r in rows
        ),
    ]
    report(lines, args)


if __name__ == "__main__":
    main()
