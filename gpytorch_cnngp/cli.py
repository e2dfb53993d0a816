"""The ``cnngp`` command: data, resumable kernel stores, the classifier and the paper's MNIST table.

    cnngp table                      # the ConvNet GP on a small MNIST subset (a few minutes on 2 CPU cores)
    cnngp table --full               # the paper's setting: 50k train, 10k validation, 10k test (use a GPU)
    cnngp data                       # fetch and verify MNIST
    cnngp kernels --config convnet_gp --n-train 1000 --n-val 500 --n-test 500 --out k.h5   # resumable
    cnngp classify k.h5

Every long step shows a progress bar with its rate and ETA. A kernel run that is interrupted (Ctrl-C, kill -9,
a crash) is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, settings
from .architectures import ARCHITECTURES, PAPER_RESULTS
from .blocked_cholesky import default_memory_budget, plan_panel_width
from .classify import CholeskyFailed, classify_store
from .datasets import DATASETS, MD5, SPLITS, DatasetError, data_checksum, fetch, load_split
from .distributed import (
    ArchitectureSpec,
    SchedulerUnavailable,
    compute_block,
    compute_store,
    default_tile_size,
    open_client,
    resolve_device,
)
from .engine import native_ready
from .memory import available_memory, format_bytes, parse_bytes
from .store import DamagedStore, KernelStore, StoreError, StoreMeta

__all__ = ["main", "DEFAULT_SUBSET", "FULL_SUBSET", "build_parser"]

DEFAULT_SUBSET = {"n_train": 1500, "n_val": 500, "n_test": 1000}
"""The subset ``cnngp table`` runs by default: the first images of each part of the split."""

FULL_SUBSET = {"n_train": 50000, "n_val": 10000, "n_test": 10000}
"""The paper's setting (``--full``)."""

PAPER_CONFIGS = ("convnet_gp", "residual_cnn_gp", "resnet32_gp")
"""The paper's three configurations (``--paper-scale``)."""


def paper_store_dir() -> Path:
    """Where ``--paper-scale`` keeps its stores: ``$CNNGP_STORE_DIR`` or ``~/.cache/gpytorch_cnngp/paper_table``."""
    return settings.store_dir.value()


DEFAULT_CONFIG = "convnet_gp"
DEFAULT_SPLIT = "mnist_as_tf"
DEFAULT_WORKDIR = "cnngp-results"

_PAPER_NAMES = {
    "convnet_gp": "ConvNet GP",
    "residual_cnn_gp": "Residual CNN GP",
    "resnet32_gp": "ResNet GP",
    "pooled_cnn_gp": "Pooled CNN GP (ours)",
}
_DATA_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


class UserError(Exception):
    """An expected problem with the command line or its inputs: reported as one message, exit status 1."""


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400 * 2:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 86400:.1f} days"


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# --------------------------------------------------------------------------------------------------------------
# shared steps


def _load_data(args: argparse.Namespace, sizes: dict[str, int]) -> tuple[dict, dict, dict]:
    """Load the split, and describe it (the store's metadata) with checksums of its images and labels."""
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    _say(
        f"data: {args.dataset} split {args.split}: {sizes['n_train']} train, {sizes['n_val']} validation, "
        f"{sizes['n_test']} test images"
    )
    parts = load_split(args.dataset, args.split, data_dir=args.data_dir, dtype=dtype, progress=args.progress, **sizes)
    images, labels, checksums = {}, {}, {}
    for part, (X, y) in parts.items():
        images[part] = X.numpy()
        labels[part] = y.numpy()
        checksums[f"{part}_images"] = data_checksum((X * 255).round().to(torch.uint8))
        checksums[f"{part}_labels"] = data_checksum(y)
    return images, labels, checksums


def _spec_and_meta(config: str, args: argparse.Namespace, sizes: dict[str, int], checksums: dict) -> tuple:
    spec = ArchitectureSpec.from_name(config)
    meta = StoreMeta(
        architecture=config,
        hyperparameters=spec.kwargs,
        dtype=args.dtype,
        dataset=args.dataset,
        split=args.split,
        checksums=checksums,
        **sizes,
    )
    return spec, meta


def _probe(store: KernelStore, spec: ArchitectureSpec, images: dict, args: argparse.Namespace) -> tuple | None:
    """Compute and commit one pending block here, timed: ``(entries/s, its entries, description)`` or ``None``.

    A block that is not on the diagonal of Kxx is preferred (those compute only half their pairs). Nothing is
    wasted: the block is committed like any other.
    """
    pending = [b for b in store.pending() if not b.is_diagonal]
    if not pending:
        return None
    block = next((b for b in pending if not b.symmetric), pending[0])
    device = str(resolve_device(args.device))
    # the CPU's native kernel needs no per-shape compilation, so the probe times what the run will use;
    # torch.compile (GPUs) would time its compilation, so the probe stays eager there
    native = device == "cpu" and _compile_flag(args) is not False and _native(spec, images, args)
    options = {"dtype": args.dtype, "device": device, "memory_budget": args.memory_budget, "compile": native}
    compute_block(spec, images[block.row_part], (0, 1), images[block.col_part], (0, 1), **options)  # one-time set-up
    values, seconds, dev = compute_block(
        spec,
        images[block.row_part],
        block.rows,
        images[block.col_part],
        block.cols,
        symmetric=block.symmetric,
        **options,
    )
    store.write_block(block, values, seconds)
    compiled = _compile_flag(args) or (_compile_flag(args) is None and dev.startswith("cuda"))
    note = dev + (", native kernel" if native else ", eager; compiled blocks are faster" if compiled else "")
    return block.entries / max(seconds, 1e-9), block.entries, note


def _choose_threads(spec: ArchitectureSpec, images: dict, args: argparse.Namespace) -> None:
    """Set the torch threads of this process: ``--threads``, or on the CPU the faster of 1 and the default.

    On a CPU shared with other work, several threads can be many times slower than one (every operation waits
    for its slowest thread), so unless ``--compile on`` "auto" times a small block both ways (a fraction of a
    second) and keeps the default only when it is more than 1.5 times faster than one thread. Compiled runs
    keep the default number of threads.
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        _say(f"torch threads: {args.threads}")
        return
    default = torch.get_num_threads()
    if default <= 1 or str(resolve_device(args.device)) != "cpu":
        return
    if _compile_flag(args) is True:
        # compiled loops are split over pairs by OpenMP and scale with threads (about 1.8x on 2 cores),
        # unlike the eager small block timed below
        return
    if _compile_flag(args) is None and _native(spec, images, args):
        # the native kernel hands out blocks of pairs to its threads one at a time, so a thread slowed
        # by other work delays only its own block: all cores
        _say(f"torch threads: {default} (native CPU kernel)")
        return
    X = images["train"]
    edge = min(len(X), 24)
    options = {"dtype": args.dtype, "device": "cpu", "compile": False}
    compute_block(spec, X, (0, 1), X, (0, 1), **options)  # one-time set-up
    rates = {}
    for n in (1, default):
        torch.set_num_threads(n)
        times = sorted(compute_block(spec, X, (0, edge), X, (0, edge), **options)[1] for _ in range(3))
        rates[n] = edge * edge / max(times[1], 1e-9)
    # more threads only for a clear gain: on a shared CPU their advantage can turn into a large loss at any time
    best = default if rates[default] > 1.5 * rates[1] else 1
    torch.set_num_threads(best)
    measured = ", ".join(f"{n}: {_fmt_count(r)} entries/s" for n, r in rates.items())
    _say(f"torch threads: {best} (timed {measured}; set --threads to choose)")


def _native(spec: ArchitectureSpec, images: dict, args: argparse.Namespace) -> bool:
    """Whether this machine's CPU runs the blocks of ``spec`` in the native kernel."""
    size = tuple(np.shape(images["train"])[-2:])
    return native_ready(spec.cached(), size, getattr(torch, args.dtype), "cpu")


def _compile_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.compile]


def _default_tile(args: argparse.Namespace) -> int:
    if args.scheduler in ("sync", "local") or args.device not in ("auto", None):
        return default_tile_size(args.device)
    return 512  # workers elsewhere, devices unknown here


def _compute(config: str, args: argparse.Namespace, sizes: dict[str, int], out: Path, estimate: bool) -> dict[str, Any]:
    """Compute (or resume) the kernel store of one configuration; return what the results table needs."""
    if args.scheduler in ("sync", "local"):
        resolve_device(args.device)  # an unavailable device is reported before anything is created
    images, labels, checksums = _load_data(args, sizes)
    spec, meta = _spec_and_meta(config, args, sizes, checksums)
    tile = args.tile_size or _default_tile(args)
    # the scheduler is reached before the store is made: a failed connection leaves nothing behind
    with contextlib.ExitStack() as stack:
        client = None if args.scheduler == "sync" else stack.enter_context(open_client(args.scheduler, args.workers))
        store = KernelStore.open_or_create(out, meta, labels, tile, extra_attrs={"torch_version": torch.__version__})
        return _compute_into(store, client, spec, images, args, out, estimate)


def _check_store(store: KernelStore, args: argparse.Namespace) -> int:
    """Verify the committed tiles of a resumed store; with --repair make the damaged ones pending again.

    :return: the kernel entries still committed after the check.
    :raises DamagedStore: when tiles are damaged and --repair was not given.
    """
    if not store.has_checksums:
        _say(f"note: {store.path} was made before tiles had checksums; its tiles are checked for NaN/inf only")
    damaged = store.verify(progress=args.progress)
    if damaged and not args.repair:
        raise DamagedStore(store.path, damaged)
    if damaged:
        store.mark_for_recompute(block for block, _ in damaged)
        listed = "; ".join(f"{block.describe()}: {why}" for block, why in damaged[:5])
        more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        _say(f"repair: {len(damaged)} damaged tile(s) will be computed again ({listed}{more})")
    elif args.repair:
        _say("repair: every committed tile is intact")
    return store.entries()[0]


def _compute_into(
    store: KernelStore,
    client: Any,
    spec: ArchitectureSpec,
    images: dict,
    args: argparse.Namespace,
    out: Path,
    estimate: bool,
) -> dict[str, Any]:
    """Fill ``store`` (in-process, or on the Dask ``client``); return what the results table needs."""
    started = time.perf_counter()
    entries, devices = 0, set()
    with store:
        if args.tile_size and store.tile_size != args.tile_size:
            _say(f"note: resuming with the store's tile size {store.tile_size} (not --tile-size {args.tile_size})")
        done, total = store.entries()
        if done:
            done = _check_store(store, args)
        remaining = total - done
        if remaining and done:
            _say(f"resuming {out}: {_fmt_count(done)} of {_fmt_count(total)} kernel entries already computed")
        elif remaining:
            _say(f"computing {out}: {_fmt_count(total)} kernel entries in tiles of {store.tile_size}")
        else:
            _say(f"{out} is complete; nothing to compute")
        if client is not None:
            n_threads = sum(client.nthreads().values())
            _say(f"Dask scheduler {client.scheduler.address}: {len(client.nthreads())} workers, {n_threads} threads")
        if remaining and client is None:
            _choose_threads(spec, images, args)
        if remaining and estimate:
            probe = _probe(store, spec, images, args)
            if probe is not None:
                rate, probed, where = probe
                remaining -= probed
                entries += probed
                devices.add(where.split(",")[0])
                workers = "" if client is None else " for one worker like this machine"
                _say(
                    f"estimated kernel time: {_fmt_seconds(remaining / rate)}{workers} "
                    f"({_fmt_count(remaining)} more entries at ~{_fmt_count(rate)} entries/s, timed on the first "
                    f"tile on {where})"
                )
        report = compute_store(
            store,
            spec,
            images,
            scheduler=client,
            device=args.device,
            memory_budget=args.memory_budget,
            compile=_compile_flag(args),
            progress=args.progress,
            log=_say,
        )
        store.check_still_there()  # a store deleted during the run is an error, not a success
        compute_seconds = store.block_seconds()
    seconds = time.perf_counter() - started
    entries += report.entries
    devices |= report.devices
    if entries:
        _say(
            f"kernels done: {_fmt_count(entries)} entries in {_fmt_seconds(seconds)} "
            f"({_fmt_count(entries / max(seconds, 1e-9))} entries/s) on {', '.join(sorted(devices))}"
        )
    return {
        "kernel_seconds": seconds,
        "kernel_compute_seconds": compute_seconds,
        "kernel_device": ", ".join(sorted(devices)) or None,
        "entries_computed": entries,
    }


def _classify(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.solve_device)
    budget = args.memory_budget if args.memory_budget is not None else default_memory_budget()
    where = "dense on the GPU" if device.type == "cuda" else "blocked, within the memory budget"
    _say(
        f"classifier: float64 Cholesky of Kxx on {device} ({where}), jitter {args.jitter:g}, "
        f"memory budget {format_bytes(budget)}"
    )
    result = classify_store(
        path,
        device,
        jitter=args.jitter,
        max_tries=args.max_tries,
        variances=args.variances,
        memory_budget=budget,
        scratch_dir=getattr(args, "scratch_dir", None),
        progress=args.progress,
        log=lambda text: _say(f"note: {text}"),
    )
    if result["factor"] == "disk":
        _say("note: the factor did not fit the memory budget; its panels were kept on disk beside the store")
    if result["jitter"] != args.jitter:
        _say(
            f"note: the Cholesky factorisation needed a jitter of {result['jitter']:.3g} "
            f"({result['jitter_relative']:.0e} times the mean diagonal)"
        )
    secs = result["seconds"]
    _say(
        f"validation error {_pct(result['val_error'])}, test error {_pct(result['test_error'])} "
        f"(load {_fmt_seconds(secs['load'])}, solve {_fmt_seconds(secs['solve'])}, "
        f"predict {_fmt_seconds(secs['predict'])})"
    )
    return result


# --------------------------------------------------------------------------------------------------------------
# subcommands


def _cmd_data(args: argparse.Namespace) -> int:
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        folder = fetch(name, args.data_dir, progress=args.progress)
        _say(f"{name}: verified in {folder}")
        for file, md5 in MD5[name].items():
            _say(f"  {file}  md5 {md5}  ok")
    return 0


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    given = {k: getattr(args, k) for k in ("n_train", "n_val", "n_test")}
    if getattr(args, "full", False) or getattr(args, "paper_scale", False):
        flag = "--paper-scale" if getattr(args, "paper_scale", False) else "--full"
        if any(v is not None for v in given.values()):
            raise UserError(f"{flag} sets --n-train, --n-val and --n-test to the paper's sizes; give one or the other")
        return dict(FULL_SUBSET)
    return {k: (DEFAULT_SUBSET[k] if v is None else v) for k, v in given.items()}


def _cmd_kernels(args: argparse.Namespace) -> int:
    sizes = _sizes(args)
    _compute(args.config, args, sizes, Path(args.out), estimate=True)
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    path = Path(args.store)
    if not path.exists():
        raise UserError(f"no kernel store at {path}; make one with `cnngp kernels ... --out {path}`")
    result = _classify(path, args)
    if args.json:
        row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items() if k != "A"}
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
        _say(f"wrote {args.json}")
    if args.dual:
        _save_dual(Path(args.dual), result)
    return 0


def _save_dual(path: Path, result: dict[str, Any]) -> None:
    """The dual coefficients ``A`` and the predictions, so that predictions are ``argmax(K(test, train) @ A)``."""
    np.savez_compressed(
        path, A=result["A"], val_predictions=result["val_predictions"], test_predictions=result["test_predictions"]
    )
    _say(f"wrote {path} (dual coefficients A [{result['A'].shape[0]}, {result['A'].shape[1]}] and predictions)")


def _store_name(config: str, args: argparse.Namespace, sizes: dict[str, int]) -> str:
    ds = "" if args.dataset == "mnist" else f"{args.dataset}_"
    return f"{ds}{config}_{args.split}_{sizes['n_train']}-{sizes['n_val']}-{sizes['n_test']}_{args.dtype}.h5"


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("dataset", "config", "split", "n_train", "n_val", "n_test", "dtype"))


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | data | split | n_train | n_val | n_test | validation error | test error | paper validation "
        "| paper test | kernel time | solve time | device |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper_val, paper_test = r.get("paper_val_error"), r.get("paper_test_error")
        lines.append(
            f"| {_PAPER_NAMES.get(r['config'], r['config'])} | {_DATA_NAMES.get(r.get('dataset', 'mnist'), '?')} "
            f"| {r['split']} | {r['n_train']} | {r['n_val']} "
            f"| {r['n_test']} | {_pct(r['val_error'])} | {_pct(r['test_error'])} | {_pct(paper_val)} "
            f"| {_pct(paper_test)} | {_fmt_seconds(r['kernel_compute_seconds'])} | {_fmt_seconds(r['solve_seconds'])} "
            f"| {r['device']} |"
        )
    notes = [
        "",
        "Errors are fractions of the validation and test images misclassified, shown in percent. The paper's "
        "numbers (Garriga-Alonso et al., ICLR 2019) use 50000 training, 10000 validation and 10000 test images "
        "(split mnist_as_tf); runs on a subset are not comparable to them. Kernel time is the compute time summed "
        "over all blocks (and over resumed runs).",
    ]
    return "\n".join(lines + notes) + "\n"


def _store_bytes(sizes: dict[str, int], dtype: str) -> int:
    """Bytes of a complete store's kernel matrices (the bulk of the file)."""
    n = sizes["n_train"]
    return (n * n + (sizes["n_val"] + sizes["n_test"]) * n) * np.dtype(dtype).itemsize


def _preflight(configs: Sequence[str], args: argparse.Namespace, sizes: dict[str, int], store_dir: Path) -> None:
    """Refuse, with the numbers, a run whose stores, factor or memory budget this machine cannot hold."""
    import shutil

    n = sizes["n_train"]
    budget = args.memory_budget if args.memory_budget is not None else default_memory_budget()
    avail = available_memory()
    if avail is not None and args.memory_budget is not None and budget > avail:
        raise UserError(
            f"the memory budget {format_bytes(budget)} exceeds the memory available now ({format_bytes(avail)}); "
            "give a smaller --memory-budget"
        )
    try:
        _, in_memory = plan_panel_width(n, budget)
    except ValueError as exc:
        raise UserError(f"{exc}; give a larger --memory-budget") from None
    need, lines = 0, []
    for config in configs:
        path = store_dir / _store_name(config, args, sizes)
        full = _store_bytes(sizes, args.dtype)
        # stores are created sparse: what is already written on disk needs no more space
        have = path.stat().st_blocks * 512 if path.exists() else 0
        need += max(0, full - have)
        lines.append(f"  {config}: store {format_bytes(full)}, {format_bytes(max(0, full - have))} still to write")
    factor = 0 if in_memory else 4 * n * (n + 1)
    if factor:
        lines.append(f"  classifier factor on disk (the budget cannot hold it): {format_bytes(factor)}")
    free = shutil.disk_usage(store_dir).free
    if need + factor > free:
        raise UserError(
            f"not enough disk space in {store_dir}: the run needs {format_bytes(need + factor)} more, "
            f"{format_bytes(free)} is free:\n" + "\n".join(lines) + "\nfree space, or choose --store-dir elsewhere"
        )
    mode = "in memory" if in_memory else "in panels on disk"
    _say(
        f"checked: disk {format_bytes(need + factor)} needed of {format_bytes(free)} free in {store_dir}; "
        f"classifier factor {mode} within a memory budget of {format_bytes(budget)}"
    )


def _peak_rss() -> int | None:
    """Peak resident memory of this process so far, in bytes."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _read_results(path: Path) -> list[dict[str, Any]]:
    """Earlier rows of ``results.json``; a file that cannot be read as rows is refused, never overwritten."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable results file ({exc}); move it away and run again") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} does not hold a list of result rows; move it away and run again")
    return rows


def _cmd_table(args: argparse.Namespace) -> int:
    sizes = _sizes(args)
    configs = list(PAPER_CONFIGS) if args.paper_scale and args.configs is None else (args.configs or [DEFAULT_CONFIG])
    if args.paper_scale:
        if args.dataset != "mnist" or args.split != DEFAULT_SPLIT:
            raise UserError(f"--paper-scale is the paper's MNIST setting (split {DEFAULT_SPLIT})")
        workdir = Path(args.workdir or "paper-table")
        store_dir = Path(args.store_dir) if args.store_dir else paper_store_dir()
    else:
        workdir = Path(args.workdir or DEFAULT_WORKDIR)
        store_dir = Path(args.store_dir) if args.store_dir else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir.mkdir(parents=True, exist_ok=True)
    if args.full or args.paper_scale:
        _say(
            f"the paper's setting: {len(configs)} configuration(s), 50000 train, 10000 validation, 10000 test images; "
            f"stores in {store_dir}, results in {workdir}. Every step resumes when the same command is run again."
        )
    _preflight(configs, args, sizes, store_dir)
    rows: list[dict[str, Any]] = []
    results_json = workdir / "results.json"
    previous = _read_results(results_json)
    for config in configs:
        _say(f"== {config} ==")
        started = time.perf_counter()
        path = store_dir / _store_name(config, args, sizes)
        info = _compute(config, args, sizes, path, estimate=True)
        result = _classify(path, args)
        if args.paper_scale:
            _save_dual(workdir / f"{config}_dual.npz", result)
        paper = PAPER_RESULTS.get(config, (None, None)) if args.dataset == "mnist" else (None, None)
        rows.append(
            {
                "config": config,
                "dataset": args.dataset,
                "split": args.split,
                "n_train": sizes["n_train"],
                "n_val": sizes["n_val"],
                "n_test": sizes["n_test"],
                "val_error": result["val_error"],
                "test_error": result["test_error"],
                "paper_val_error": paper[0],
                "paper_test_error": paper[1],
                "dtype": args.dtype,
                "jitter": result["jitter"],
                "kernel_seconds": info["kernel_seconds"],
                "kernel_compute_seconds": info["kernel_compute_seconds"],
                "solve_seconds": result["seconds"]["solve"],
                "predict_seconds": result["seconds"]["predict"],
                "memory_budget": result["memory_budget"],
                "factor": result["factor"],
                "peak_rss": _peak_rss(),
                "total_seconds": time.perf_counter() - started,
                "device": info["kernel_device"] or result["device"],
                "solve_device": result["device"],
                "store": str(path),
                "package_version": __version__,
            }
        )
    keys = {_row_key(r) for r in rows}
    merged = [r for r in previous if isinstance(r, dict) and _row_key(r) not in keys] + rows
    results_json.write_text(json.dumps(merged, indent=2) + "\n")
    table = _markdown(merged)
    (workdir / "results.md").write_text(table)
    _say("")
    _say(table)
    _say(f"wrote {results_json} and {workdir / 'results.md'}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# parser


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        return value

    return parse


def _memory_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_positive_int = _int_at_least(1, "positive")
_count = _int_at_least(0, "non-negative")


def _add_common(p: argparse.ArgumentParser, *, kernels: bool, solve: bool) -> None:
    p.add_argument("--data-dir", help="data folder (default: $CNNGP_DATA or ~/.cache/gpytorch_cnngp)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    if kernels:
        p.add_argument("--dataset", default="mnist", choices=DATASETS, help="data set (default: %(default)s)")
        p.add_argument(
            "--split", default=DEFAULT_SPLIT, choices=tuple(SPLITS), help="data split (default: %(default)s)"
        )
        p.add_argument(
            "--device", default="auto", help="where kernel blocks run: auto (GPU when present), cpu, cuda, cuda:1"
        )
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "float64"),
            help="kernel dtype (default: %(default)s, as published; the solve is always float64)",
        )
        p.add_argument(
            "--tile-size",
            type=_positive_int,
            default=None,
            help="edge of the stored blocks, the unit of checkpointing and distribution (default: 256 on CPU, "
            "2048 on GPU; a resumed store keeps its own)",
        )
        p.add_argument(
            "--scheduler",
            default="sync",
            help="sync (in-process, default), local (a local Dask cluster of --workers processes), or the address "
            "of a running Dask scheduler, e.g. tcp://host:8786 (each worker needs this package; one GPU per worker)",
        )
        p.add_argument("--workers", type=_positive_int, default=None, help="workers of --scheduler local")
        p.add_argument(
            "--repair",
            action="store_true",
            help="when a resumed store has damaged tiles (checksum mismatch, NaN or inf), compute just those again "
            "instead of refusing the store",
        )
        p.add_argument(
            "--threads",
            type=_positive_int,
            default=None,
            help="torch CPU threads of an in-process run (default: all cores for the native kernel; otherwise all "
            "cores if a timed start shows them 1.5 times faster than one thread, else 1, since on a CPU shared with "
            "other work one eager thread is often much faster)",
        )
        p.add_argument(
            "--compile",
            default="auto",
            choices=("auto", "on", "off"),
            help="on: compiled everywhere (the native kernel on the CPU where the network allows it, else "
            "torch.compile); auto (default): the native CPU kernel where it applies and torch.compile on GPUs, "
            "else eager; off: eager",
        )
    if kernels or solve:
        uses = {
            (True, False): "the kernel engine's memory per block",
            (False, True): "the classifier's memory (default: 60%% of the memory available now)",
            (True, True): "the kernel engine's memory per block and the classifier's (default: 60%% of the memory "
            "available now)",
        }[(kernels, solve)]
        p.add_argument(
            "--memory-budget",
            type=_memory_size,
            default=None,
            metavar="SIZE",
            help=f"{uses}; e.g. 2GB, 512MB, 4GiB (B/KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)",
        )
    if solve:
        p.add_argument(
            "--scratch-dir",
            default=None,
            help="folder for the classifier's factor when it does not fit the budget (default: STORE.factor beside "
            "the store; it needs about 4 n^2 bytes of disk and is deleted when done)",
        )
        p.add_argument(
            "--solve-device", default="auto", help="where the classifier runs: auto (GPU when present), cpu, cuda"
        )
        p.add_argument("--jitter", type=float, default=0.0, help="first jitter added to Kxx (default 0, as published)")
        p.add_argument("--max-tries", type=_count, default=8, help="retries with jitter 1e-10, 1e-9, ... x mean diag")
        p.add_argument("--variances", action="store_true", help="also compute predictive variances")


def _add_sizes(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_SUBSET
    p.add_argument("--n-train", type=_positive_int, default=None, help=f"training images (default {d['n_train']})")
    p.add_argument("--n-val", type=_count, default=None, help=f"validation images (default {d['n_val']})")
    p.add_argument("--n-test", type=_count, default=None, help=f"test images (default {d['n_test']})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cnngp``."""
    parser = argparse.ArgumentParser(
        prog="cnngp",
        description="CNN-GP kernels on MNIST: resumable kernel stores, the paper's classifier and its table.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="fetch and verify a data set", description="Fetch the IDX files and check MD5s.")
    p.add_argument("--dataset", default="mnist", choices=(*DATASETS, "all"), help="default: %(default)s")
    _add_common(p, kernels=False, solve=False)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "kernels",
        help="compute a kernel store (resumable)",
        description="Compute Kxx, Kvx, Ktx and the diagonals into an HDF5 store. Interrupted runs resume where "
        "they stopped when the same command is run again; a store made for other arguments is refused.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, choices=tuple(ARCHITECTURES), help="default: %(default)s")
    _add_sizes(p)
    p.add_argument("--out", required=True, help="the HDF5 store to create or resume")
    _add_common(p, kernels=True, solve=False)
    p.set_defaults(func=_cmd_kernels)

    p = sub.add_parser("classify", help="classify with a kernel store", description="The paper's GP classifier.")
    p.add_argument("store", help="an HDF5 store made by `cnngp kernels`")
    p.add_argument("--json", default=None, help="also write the results (with predictions) to this JSON file")
    p.add_argument(
        "--dual", default=None, help="also save the dual coefficients A and the predictions to this .npz file"
    )
    _add_common(p, kernels=False, solve=True)
    p.set_defaults(func=_cmd_classify)

    d = DEFAULT_SUBSET
    p = sub.add_parser(
        "table",
        help="run everything and write the results table",
        description=(
            "Compute the kernels of each configuration, classify, and write DIR/results.json and DIR/results.md "
            "with the paper's numbers beside ours. With no arguments: the ConvNet GP on the first "
            f"{d['n_train']} training, {d['n_val']} validation and {d['n_test']} test images of the mnist_as_tf "
            "split, which takes about 2 to 4 minutes on 2 CPU cores (its errors are those of a small subset, not the "
            "paper's). --full runs the paper's setting (50000/10000/10000; a GPU is recommended; the estimated "
            "time is printed first). Rerunning resumes the stores in DIR."
        ),
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=tuple(ARCHITECTURES),
        metavar="NAME",
        help=f"configurations ({', '.join(ARCHITECTURES)}; default: {DEFAULT_CONFIG}, or the paper's three with "
        "--paper-scale)",
    )
    _add_sizes(p)
    p.add_argument("--full", action="store_true", help="the paper's sizes: 50000 train, 10000 val, 10000 test")
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="the paper's table: its three configurations at its sizes (50000/10000/10000, mnist_as_tf), stores "
        "outside the work tree (--store-dir, default $CNNGP_STORE_DIR or ~/.cache/gpytorch_cnngp/paper_table), "
        "dual coefficients saved as WORKDIR/<config>_dual.npz; hours of kernels on a CPU, resumable at any moment",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help=f"folder for the results (default: {DEFAULT_WORKDIR}, or paper-table with --paper-scale)",
    )
    p.add_argument("--store-dir", default=None, help="folder for the kernel stores (default: the workdir)")
    _add_common(p, kernels=True, solve=True)
    p.set_defaults(func=_cmd_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnngp`` with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    threads = torch.get_num_threads()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ncnngp: interrupted; finished tiles are saved, run the same command again to resume", file=sys.stderr)
        return 130
    except (UserError, DatasetError, StoreError, CholeskyFailed, SchedulerUnavailable, ValueError, OSError) as exc:
        if settings.traceback.value():
            raise
        print(f"cnngp: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
