"""The commands of ``cnngp`` (data, kernels, classify, table) and the steps they share: load the split, compute
or resume a kernel store, check it, classify."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..architectures import PAPER_RESULTS
from ..blocked_cholesky import default_memory_budget
from ..classify import _mean_diagonal, classify_store
from ..datasets import DATASETS, MD5, data_checksum, fetch, load_split
from ..distributed import ArchitectureSpec, compute_store, open_client, resolve_device
from ..memory import format_bytes
from ..ridge import classify_store_ridge
from ..store import DamagedLabels, DamagedStore, KernelStore, StoreMeta
from .defaults import (
    DEFAULT_CONFIG,
    DEFAULT_SPLIT,
    DEFAULT_SUBSET,
    DEFAULT_WORKDIR,
    FULL_SUBSET,
    PAPER_CONFIGS,
    paper_store_dir,
)
from .errors import UserError
from .policy import (
    _check_backend,
    _check_budget,
    _check_jitter,
    _check_output_file,
    _check_ridge,
    _check_writable,
    _choose_threads,
    _default_tile,
    _peak_rss,
    _preflight,
    _probe,
    _reset_peak_rss,
    _store_name,
)
from .render import (
    _fmt_count,
    _fmt_seconds,
    _markdown,
    _pct,
    _read_results,
    _record_rows,
    _save_dual,
    _say,
    _write_text,
)

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


def _spec_and_meta(
    config: str | ArchitectureSpec, args: argparse.Namespace, sizes: dict[str, int], checksums: dict
) -> tuple:
    """The spec of ``config`` (a configuration name, or a spec as it is) and the metadata of its store."""
    spec = config if isinstance(config, ArchitectureSpec) else ArchitectureSpec.from_name(config)
    meta = StoreMeta(
        architecture=spec.name,
        hyperparameters=spec.hyperparameters,
        dtype=args.dtype,
        dataset=args.dataset,
        split=args.split,
        checksums=checksums,
        **sizes,
    )
    return spec, meta


def _check_device(args: argparse.Namespace) -> None:
    """An unavailable ``--device`` is reported before any work (remote workers' devices are theirs to check)."""
    if args.scheduler in ("sync", "local"):
        resolve_device(args.device)


def _compute(
    config: str | ArchitectureSpec,
    args: argparse.Namespace,
    sizes: dict[str, int],
    out: Path,
    estimate: bool,
    data: tuple[dict, dict, dict] | None = None,
) -> dict[str, Any]:
    """Compute (or resume) the kernel store of one configuration; return what the results table needs.

    :param config: a configuration name, or an :class:`ArchitectureSpec` (a network outside ``ARCHITECTURES``, the
        NTK).
    :param data: the split as :func:`_load_data` gives it (default: loaded here).
    """
    _check_device(args)
    images, labels, checksums = data if data is not None else _load_data(args, sizes)
    spec, meta = _spec_and_meta(config, args, sizes, checksums)
    tile = args.tile_size or _default_tile(args)
    # an explicit backend that cannot run the network: refused before any work
    _check_backend(spec, images, args, tile * tile)
    # the scheduler is reached before the store is made: a failed connection leaves nothing behind
    with contextlib.ExitStack() as stack:
        client = None if args.scheduler == "sync" else stack.enter_context(open_client(args.scheduler, args.workers))
        store = KernelStore.open_or_create(out, meta, labels, tile, extra_attrs={"torch_version": torch.__version__})
        try:
            _check_labels(store, labels, args)
        except BaseException:
            store.close()
            raise
        return _compute_into(store, client, spec, images, args, out, estimate)


def _check_labels(store: KernelStore, labels: dict, args: argparse.Namespace) -> None:
    """Check the stored labels against their checksums; with --repair write damaged ones again from the data set.

    Labels cannot be recomputed from kernels; the data set's are the store's (its recorded checksums of them were
    compared with this run's when the store was opened), and the store checks them once more before writing.

    :raises DamagedLabels: when labels are damaged and --repair was not given.
    """
    damaged = store.verify_labels()
    if damaged and not args.repair:
        raise DamagedLabels(store.path, damaged)
    if damaged:
        store.rewrite_labels(labels, [part for part, _ in damaged])
        names = ", ".join(f"y_{part} ({why})" for part, why in damaged)
        _say(f"repair: the labels {names} no longer matched their checksums; written again from the data set")


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
            _choose_threads(spec, images, args, store.tile_size**2)
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
            backend=args.backend,
            progress=args.progress,
            log=_say,
            worker_wait=args.worker_wait,
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
        "kernel_wall_seconds": seconds,
        "kernel_compute_seconds": compute_seconds,
        "kernel_device": ", ".join(sorted(devices)) or None,
        "entries_computed": entries,
    }


def _store_jitter_check(path: Path, args: argparse.Namespace) -> None:
    """Refuse ``--jitter`` above the mean diagonal of the store's ``Kxx`` (a complete store; the classifier itself
    reports an incomplete or damaged one)."""
    if args.jitter <= 0 or not path.exists():
        return
    with KernelStore.open(path) as store:
        if not store.is_complete():
            return
        scale = _mean_diagonal(store, store.meta.n_train)
    _check_jitter(args.jitter, scale, f"in {path}")


def _prior_jitter_check(config: str, images: dict, args: argparse.Namespace) -> None:
    """Refuse ``--jitter`` above the mean prior variance of the training images before any kernel is computed
    (their self terms only: the diagonal of Kxx, at a small fraction of its cost)."""
    if args.jitter <= 0:
        return
    from ..engine import gram_diag

    spec = ArchitectureSpec.from_name(config)
    device = resolve_device(args.device) if args.scheduler in ("sync", "local") else torch.device("cpu")
    X = torch.as_tensor(images["train"]).to(device=device, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        scale = float(gram_diag(spec.cached(), X).double().mean())
    _check_jitter(args.jitter, scale, f"{config} on these training images")


def _classify(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.solve_device)
    _store_jitter_check(path, args)
    budget = args.memory_budget if args.memory_budget is not None else default_memory_budget()
    where = "dense on the GPU" if device.type == "cuda" else "blocked, within the memory budget"
    ridges = getattr(args, "ridge", None)
    regulariser = (
        f"ridge chosen on the validation images from {', '.join(f'{v:g}' for v in sorted(ridges))} times the mean "
        "diagonal"
        if ridges
        else f"jitter {args.jitter:g}"
    )
    _say(
        f"classifier: float64 Cholesky of Kxx on {device} ({where}), {regulariser}, "
        f"memory budget {format_bytes(budget)}"
    )
    reset = _reset_peak_rss()
    options = {
        "max_tries": args.max_tries,
        "memory_budget": budget,
        "scratch_dir": getattr(args, "scratch_dir", None),
        "progress": args.progress,
    }
    if ridges:
        result = classify_store_ridge(path, ridges, device, log=lambda text: _say(f"note: {text}"), **options)
        _say(f"note: ridge {result['ridge']:g} chosen on the validation images")
    else:
        result = classify_store(
            path,
            device,
            jitter=args.jitter,
            variances=args.variances,
            log=lambda text: _say(f"note: {text}"),
            **options,
        )
    # the solve's own peak where it could be measured apart (Linux), else the process's so far
    result["peak_rss_bytes"] = _peak_rss(since_reset=reset)
    if result["factor"] == "disk":
        _say("note: the factor did not fit the memory budget; its panels were kept on disk beside the store")
    if not ridges and result["jitter"] != args.jitter:
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


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    given = {k: getattr(args, k) for k in ("n_train", "n_val", "n_test")}
    if getattr(args, "full", False) or getattr(args, "paper_scale", False):
        flag = "--paper-scale" if getattr(args, "paper_scale", False) else "--full"
        if any(v is not None for v in given.values()):
            raise UserError(f"{flag} sets --n-train, --n-val and --n-test to the paper's sizes; give one or the other")
        return dict(FULL_SUBSET)
    return {k: (DEFAULT_SUBSET[k] if v is None else v) for k, v in given.items()}


def _cmd_data(args: argparse.Namespace) -> int:
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    for name in names:
        folder = fetch(name, args.data_dir, progress=args.progress)
        _say(f"{name}: verified in {folder}")
        for file, md5 in MD5[name].items():
            _say(f"  {file}  md5 {md5}  ok")
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    sizes = _sizes(args)
    _check_budget(args)
    out = Path(args.out)
    if not out.exists():  # a new store: its folder must take it (a store being resumed is checked when opened)
        _check_output_file(out, "--out")
    _compute(args.config, args, sizes, Path(args.out), estimate=True)
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    path = Path(args.store)
    _check_budget(args)
    _check_ridge(args)
    if not path.exists():
        raise UserError(f"no kernel store at {path}; make one with `cnngp kernels ... --out {path}`")
    for option, target in (("--json", args.json), ("--dual", args.dual)):
        if target:
            _check_output_file(Path(target), option)  # before the solve, not after it
    result = _classify(path, args)
    if args.json:
        row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items() if k != "A"}
        _write_text(Path(args.json), json.dumps(row, indent=2) + "\n")
        _say(f"wrote {args.json}")
    if args.dual:
        _save_dual(Path(args.dual), result)
    return 0


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
    _check_budget(args)
    _check_ridge(args, sizes["n_val"])
    _check_device(args)
    resolve_device(args.solve_device)  # the classifier's device too, before the kernels
    _check_writable(workdir, "--workdir")
    _check_writable(store_dir, "--store-dir")
    _read_results(workdir / "results.json")  # a results file that cannot be read is refused before any work
    if args.full or args.paper_scale:
        _say(
            f"the paper's setting: {len(configs)} configuration(s), 50000 train, 10000 validation, 10000 test images; "
            f"stores in {store_dir}, results in {workdir}. Every step resumes when the same command is run again."
        )
    _preflight(configs, args, sizes, store_dir)
    data = _load_data(args, sizes)  # once for every configuration
    for config in configs:
        _prior_jitter_check(config, data[0], args)
    rows: list[dict[str, Any]] = []
    for config in configs:
        _say(f"== {config} ==")
        started = time.perf_counter()
        path = store_dir / _store_name(config, args, sizes)
        info = _compute(config, args, sizes, path, estimate=True, data=data)
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
                # with --ridge: the term kept and every term's validation error (none: the paper's classifier)
                "ridge": result.get("ridge"),
                "ridges": [{k: r[k] for k in ("lambda", "jitter", "val_error")} for r in result.get("ridges", [])],
                # the kernel time results.md shows: every block's compute time, over resumed runs too
                "kernel_seconds": info["kernel_compute_seconds"],
                "kernel_wall_seconds": info["kernel_wall_seconds"],  # this run's, resumed stores' earlier runs aside
                "solve_seconds": result["seconds"]["solve"],
                "predict_seconds": result["seconds"]["predict"],
                "memory_budget": result["memory_budget"],
                "factor": result["factor"],
                "peak_rss_bytes": result["peak_rss_bytes"],  # the solve's
                "total_seconds": time.perf_counter() - started,
                "device": info["kernel_device"] or result["device"],
                "solve_device": result["device"],
                "store": str(path),
                "package_version": __version__,
            }
        )
        # each row is recorded as soon as it is done: a later configuration's failure does not lose it
        merged = _record_rows(workdir, rows[-1:])
    _say("")
    _say(_markdown(merged))
    _say(f"wrote {workdir / 'results.json'} and {workdir / 'results.md'}")
    return 0
