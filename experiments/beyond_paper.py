"""A resumable search for kernels that beat the paper's MNIST table, judged on the validation images only.

Each candidate (a network and its NNGP or NTK, see ``--list``) gets a kernel store of the first ``--n-train``
training images and the first ``--n-val`` validation images of the split (``cnngp kernels``' resumable,
checksummed stores, with no test images: the test set is never asked for). The paper's classifier is then solved
for a grid of ridge terms ``lambda`` (``(Kxx + lambda * mean(diag Kxx) I) A = Y``; 0 is the published noise-free
classifier) and the ``lambda`` with the lowest validation error is kept. Each finished candidate becomes a row of
``results.json`` with its kernel time per entry and its kernel time projected to the paper's table (50000 train,
10000 validation, 10000 test images); ``results.md`` sorts them by validation error and ``validation_vs_cost.png``
plots validation error against that projected time::

    python experiments/beyond_paper.py --candidates convnet_gp resnet32_gp myrtle5 --n-train 10000 --n-val 10000

Rows are written as each candidate finishes; running the same command again skips finished candidates and
resumes unfinished stores, so a kill loses nothing finished. Stores live outside the work tree (``--store-dir``,
default ``~/.cache/gpytorch_cnngp/beyond_paper``); results go to ``experiments/output/beyond_paper/``
(``--workdir``).

Layout: this file is the command line; the work lives in the sibling package ``experiments/beyond_paper_search/``
(``candidates``: the list and the networks built here; ``report``: rows, costs, files; the ridge grid is
``gpytorch_cnngp.ridge``). ``experiments/`` is not an installed package, so the script puts its own folder on
``sys.path`` first (as ``experiments/random_nn.py`` does).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gpytorch_cnngp import __version__
from gpytorch_cnngp.architectures import ARCHITECTURES
from gpytorch_cnngp.classify import CholeskyFailed
from gpytorch_cnngp.cli import commands
from gpytorch_cnngp.cli.errors import UserError
from gpytorch_cnngp.cli.parser import _add_common, _device, _HelpFormatter, _positive_int
from gpytorch_cnngp.cli.policy import _block_backend, _check_budget, _check_writable
from gpytorch_cnngp.cli.render import _fmt_seconds, _read_results, _say, _write_text
from gpytorch_cnngp.datasets import DatasetError, load_split, split_indices
from gpytorch_cnngp.distributed import SchedulerUnavailable, resolve_device
from gpytorch_cnngp.memory import available_memory, format_bytes
from gpytorch_cnngp.ridge import DEFAULT_RIDGES, best_ridge, check_ridges, validation_errors
from gpytorch_cnngp.store import KernelStore, StoreError

# experiments/ is not an installed package: find the sibling package beyond_paper_search from here
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from beyond_paper_search import candidates as registry  # noqa: E402
from beyond_paper_search.report import (  # noqa: E402
    PAPER_ENTRIES,
    finished,
    machine,
    markdown,
    record,
    table_entries,
)
from beyond_paper_search.tuning import ml2_variances  # noqa: E402

DEFAULT_N_TRAIN = 10000
DEFAULT_N_VAL = 10000
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "output" / "beyond_paper"
DEFAULT_STORE_DIR = Path("~/.cache/gpytorch_cnngp/beyond_paper")


def build_parser() -> argparse.ArgumentParser:
    """The command line (the kernel options are ``cnngp kernels``' own)."""
    p = argparse.ArgumentParser(
        prog="beyond_paper.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="print the candidates with one line each and exit")
    p.add_argument(
        "--tune",
        metavar="CANDIDATE",
        default=None,
        help="instead of the search: fit CANDIDATE's network's tied weight and bias variances by the marginal "
        "likelihood of the first --tune-n training digits (beyond_paper_search.tuning) and write "
        "ml2_CANDIDATE.json to --workdir; no validation or test digit is read",
    )
    p.add_argument("--tune-n", type=_positive_int, default=1000, help="training digits --tune fits on")
    p.add_argument("--tune-iter", type=_positive_int, default=15, help="L-BFGS iterations of --tune")
    p.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        metavar="NAME",
        help="candidates to run, in order (default: every candidate this version of the package can build; --list "
        "shows them)",
    )
    p.add_argument(
        "--n-train", type=_positive_int, default=DEFAULT_N_TRAIN, help="the first N training images of the split"
    )
    p.add_argument(
        "--n-val", type=_positive_int, default=DEFAULT_N_VAL, help="the first M validation images of the split"
    )
    p.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=list(DEFAULT_RIDGES),
        metavar="LAMBDA",
        help="ridge terms tried, times the mean diagonal of Kxx (0: the paper's classifier) (default: "
        f"{' '.join(f'{v:g}' for v in DEFAULT_RIDGES)})",
    )
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="where results.json, results.md and the plot go"
    )
    p.add_argument(
        "--store-dir", type=Path, default=DEFAULT_STORE_DIR, help="where the kernel stores go (resumed from there)"
    )
    p.add_argument(
        "--solve-device",
        default="auto",
        type=_device,
        help="where the float64 solves run: auto (GPU when present), cpu, cuda (default: %(default)s)",
    )
    _add_common(p, kernels=True, solve=False)
    return p


def _list() -> None:
    for c in registry.CANDIDATES.values():
        try:
            c.spec()
            state = ""
        except registry.CandidateUnavailable as exc:
            missing = c.network not in registry.NETWORKS and c.network not in ARCHITECTURES
            state = f"  [unavailable: no architecture {c.network!r} in this version]" if missing else f"  [{exc}]"
        print(f"{c.name:<24} {c.kernel.upper():<5} {c.description}{state}")


def _chosen(names: Sequence[str] | None) -> list[registry.Candidate]:
    """The candidates to run: those named (each must exist and be buildable), or every buildable one."""
    if names is None:
        chosen = []
        for c in registry.CANDIDATES.values():
            try:
                c.spec()
            except registry.CandidateUnavailable as exc:
                _say(f"note: skipping {c.name}: {exc}")
                continue
            chosen.append(c)
        return chosen
    unknown = [n for n in names if n not in registry.CANDIDATES]
    if unknown:
        raise UserError(
            f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(registry.CANDIDATES)} (see --list)"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--candidates names a candidate twice: {' '.join(names)}")
    chosen = [registry.CANDIDATES[n] for n in names]
    for c in chosen:
        try:
            c.spec()
        except registry.CandidateUnavailable as exc:
            raise UserError(str(exc)) from None
    return chosen


def solve_bytes(n_train: int, n_val: int, dtype: str) -> int:
    """Memory the solves of one candidate hold at once: ``Kxx`` and ``Kvx`` as stored, and ``Kxx`` in float64 with
    its Cholesky factor (dense: the search is meant for subsets)."""
    item = 4 if dtype == "float32" else 8
    return item * n_train * (n_train + n_val) + 16 * n_train * n_train


def _check_memory(n_train: int, n_val: int, dtype: str, solve_device: torch.device) -> None:
    """Refuse, before any kernel is computed, sizes whose dense solves this machine cannot hold."""
    need = solve_bytes(n_train, n_val, dtype)
    if solve_device.type == "cuda":
        have = torch.cuda.mem_get_info(solve_device)[0]
        where = f"free on {solve_device}"
        need_there = 16 * n_train * n_train
    else:
        have, where, need_there = available_memory(), "available", need
    if have is not None and need_there > have:
        raise UserError(
            f"the dense float64 solves of --n-train {n_train} need about {format_bytes(need_there)}, and "
            f"{format_bytes(have)} is {where}; give a smaller --n-train (the search is meant for subsets)"
        )


def _kernel_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace ``cnngp``'s steps read (``commands._compute``, ``commands._load_data``)."""
    return argparse.Namespace(**{**vars(args), "n_test": 0})


def run(args: argparse.Namespace) -> int:
    """The search (see the module docstring); returns the exit status."""
    try:
        lambdas = check_ridges(args.lambdas)
    except ValueError as exc:
        raise UserError(f"--lambdas: {exc}") from None
    sizes = {"n_train": args.n_train, "n_val": args.n_val, "n_test": 0}
    split_indices(args.split, **sizes)  # sizes beyond the split: one line before any work
    chosen = _chosen(args.candidates)
    if not chosen:
        raise UserError("no candidate can be built by this version of the package (see --list)")
    workdir, store_dir = Path(args.workdir).expanduser(), Path(args.store_dir).expanduser()
    _check_writable(workdir, "--workdir")
    _check_writable(store_dir, "--store-dir")
    rows = _read_results(workdir / "results.json")  # an unreadable results file is refused before any work
    _check_budget(args)
    if args.scheduler in ("sync", "local"):
        resolve_device(args.device)
    solve_device = resolve_device(args.solve_device)
    _check_memory(args.n_train, args.n_val, args.dtype, solve_device)
    kargs = _kernel_args(args)
    data = None
    for c in chosen:
        spec = c.spec()
        wanted = {
            "candidate": c.name,
            "dataset": args.dataset,
            "split": args.split,
            "n_train": args.n_train,
            "n_val": args.n_val,
            "dtype": args.dtype,
            "architecture": c.network,
            "kernel": c.kernel,
            "parameters": dict(spec.kwargs),
            "lambdas": lambdas,
        }
        done = finished(rows, wanted)
        if done is not None:
            _say(f"== {c.name}: finished before (validation error {100 * done['best_val_error']:.2f}%); skipped ==")
            continue
        _say(f"== {c.name}: {c.description} ==")
        if data is None:
            data = commands._load_data(kargs, sizes)  # once, for every candidate
        path = store_dir / f"{c.name}_{args.dataset}_{args.split}_{args.n_train}-{args.n_val}_{args.dtype}.h5"
        info = commands._compute(spec, kargs, sizes, path, estimate=True, data=data)
        with KernelStore.open(path) as store:
            tile = store.tile_size
            Kxx, Kvx = store.read("Kxx"), store.read("Kvx")
            y_train, y_val = store.labels("train"), store.labels("val")
        backend = _block_backend(spec, data[0], kargs, tile * tile).name
        started = time.perf_counter()
        _say(f"solving for lambda in {', '.join(f'{v:g}' for v in lambdas)} on {solve_device}")
        results = validation_errors(Kxx, y_train, Kvx, y_val, lambdas, device=solve_device, progress=args.progress)
        del Kxx, Kvx
        solve_seconds = time.perf_counter() - started
        chosen_one = best_ridge(results)
        entries = table_entries(args.n_train, args.n_val)
        seconds = float(info["kernel_compute_seconds"])
        per_entry = seconds / entries
        row = {
            **wanted,
            "description": c.description,
            "val_errors": results,
            "lambda": chosen_one["lambda"],
            "jitter": chosen_one["jitter"],
            "best_val_error": chosen_one["val_error"],
            "kernel_seconds": seconds,
            "kernel_entries": entries,
            "seconds_per_entry": per_entry,
            "projected_entries_50k": PAPER_ENTRIES,
            "projected_hours_50k": per_entry * PAPER_ENTRIES / 3600,
            "solve_seconds": solve_seconds,
            "backend": backend,
            "device": info["kernel_device"] or str(resolve_device(args.device)),
            "solve_device": str(solve_device),
            "machine": machine(),
            "store": str(path),
            "package_version": __version__,
        }
        per = ", ".join(f"{r['lambda']:g}: {100 * r['val_error']:.2f}%" for r in results)
        _say(
            f"{c.name}: validation error {100 * row['best_val_error']:.2f}% at lambda {row['lambda']:g} ({per}); "
            f"kernels {_fmt_seconds(seconds)}, {1e6 * per_entry:.3g} us per entry, "
            f"~{_fmt_seconds(3600 * row['projected_hours_50k'])} projected at 50k ({backend})"
        )
        rows = record(workdir, row)
    if rows:
        _say("")
        _say(markdown(rows))
    _say(f"results in {workdir}")
    return 0


def tune(args: argparse.Namespace) -> int:
    """``--tune``: ML-II variances of one candidate's network on training digits; returns the exit status."""
    if args.tune not in registry.CANDIDATES:
        raise UserError(f"unknown candidate {args.tune!r} for --tune; known: {', '.join(registry.CANDIDATES)}")
    c = registry.CANDIDATES[args.tune]
    if c.kernel != "nngp":
        raise UserError(f"--tune fits an NNGP's variances; {c.name} is an {c.kernel.upper()} (name its NNGP)")
    factory = c.factory() or ARCHITECTURES[c.network]
    missing = {"var_weight", "var_bias"} - set(inspect.signature(factory).parameters)
    if missing:
        raise UserError(
            f"--tune needs a network whose factory takes var_weight and var_bias; {c.network} has no "
            f"{' or '.join(sorted(missing))} (its fit could not be given back to it)"
        )
    params = {k: v for k, v in c.params.items() if k not in ("var_weight", "var_bias")}
    workdir = Path(args.workdir).expanduser()
    _check_writable(workdir, "--workdir")
    data = load_split(
        args.dataset, args.split, n_train=args.tune_n, n_val=0, n_test=0, data_dir=args.data_dir, progress=args.progress
    )
    images, labels = data["train"]
    if args.threads:
        torch.set_num_threads(args.threads)
    _say(f"== ML-II of {c.name}'s tied variances on the first {args.tune_n} training digits ==")
    fit = ml2_variances(factory, params, images, labels, max_iter=args.tune_iter, say=_say)
    out = {
        "candidate": c.name,
        "network": c.network,
        "parameters": params,
        "dataset": args.dataset,
        "split": args.split,
        **fit,
        "machine": machine(),
        "package_version": __version__,
    }
    path = workdir / f"ml2_{c.name}.json"
    _write_text(path, json.dumps(out, indent=1) + "\n")
    _say(
        f"var_weight {fit['var_weight']:.6g}, var_bias {fit['var_bias']:.6g} (noise {fit['noise']:.3g}); "
        f"-log p(Y)/n {fit['loss_start']:.4f} -> {fit['loss_end']:.4f} in {fit['evaluations']} evaluations, "
        f"{_fmt_seconds(fit['seconds'])}; written to {path}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search with ``argv`` (default: the command line); return the exit status."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.list:
        _list()
        return 0
    threads = torch.get_num_threads()
    try:
        return tune(args) if args.tune is not None else run(args)
    except KeyboardInterrupt:
        print(
            "\nbeyond_paper: interrupted; finished candidates and tiles are saved, run again to resume", file=sys.stderr
        )
        return 130
    except (UserError, DatasetError, StoreError, CholeskyFailed, SchedulerUnavailable, ValueError, OSError) as exc:
        print(f"beyond_paper: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
