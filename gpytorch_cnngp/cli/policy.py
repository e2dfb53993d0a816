"""The choices ``cnngp`` makes for the user: torch threads (timed), native kernel or compiled or eager blocks,
the tile size, the stores' file names, the disk and memory checks before a long run, and its peak memory.

Every decision between the backends is :func:`gpytorch_cnngp.backends.choose`'s, asked through
:func:`_block_backend` with ``--backend`` and a block's size, as :func:`gpytorch_cnngp.gram` asks it for the blocks
themselves: this module names no backend by string.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..backends import Backend, Inductor, Native, choose
from ..blocked_cholesky import default_memory_budget, plan_panel_width
from ..distributed import ArchitectureSpec, compute_block, default_tile_size, resolve_device
from ..memory import available_memory, format_bytes
from ..ridge import check_ridges
from ..store import KernelStore
from .errors import UserError
from .render import _fmt_count, _say


def _block_backend(spec: ArchitectureSpec, images: dict, args: argparse.Namespace, n_pairs: int) -> type[Backend]:
    """The backend :func:`gpytorch_cnngp.backends.choose` gives an in-process block of ``n_pairs`` kernel entries
    of ``spec`` under ``--backend``, ``--device`` and ``--dtype``: the one the block's ``gram`` call will run.

    :raises ValueError: for an explicit ``--backend`` that cannot run ``spec`` here (the reason named).
    """
    size = tuple(np.shape(images["train"])[-2:])
    device = resolve_device(args.device)
    return choose(args.backend, spec.cached(), size, getattr(torch, args.dtype), device, n_pairs, ntk=spec.get == "ntk")


def _check_backend(spec: ArchitectureSpec, images: dict, args: argparse.Namespace, n_pairs: int) -> None:
    """Refuse an explicit ``--backend`` that cannot run ``spec`` here before any work, saying why."""
    if args.backend == "auto":
        return  # "auto" always runs (eagerly at worst); asking here would build the native kernel needlessly
    try:
        _block_backend(spec, images, args, n_pairs)
    except ValueError as exc:
        reason = str(exc).removeprefix(f"backend={args.backend!r} cannot run this network here: ")
        reason = reason.removesuffix("; use backend='auto'")
        raise UserError(f"--backend {args.backend} cannot run {spec.name} here: {reason}; use --backend auto") from None


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
    chosen = _block_backend(spec, images, args, block.entries)
    probe_backend = "native" if chosen is Native else "eager"
    options = {"dtype": args.dtype, "device": device, "memory_budget": args.memory_budget, "backend": probe_backend}
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
    note = dev + {Native: ", native kernel", Inductor: ", eager; compiled blocks are faster"}.get(chosen, "")
    return block.entries / max(seconds, 1e-9), block.entries, note


def _choose_threads(spec: ArchitectureSpec, images: dict, args: argparse.Namespace, n_pairs: int) -> None:
    """Set the torch threads of this process: ``--threads``, or on the CPU the faster of 1 and the default.

    On a CPU shared with other work, several threads can be many times slower than one (every operation waits
    for its slowest thread), so unless the blocks are compiled "auto" times a small block both ways (a fraction of a
    second) and keeps the default only when it is more than 1.5 times faster than one thread. Compiled runs
    keep the default number of threads.

    :param n_pairs: kernel entries of one block (the backend of ``"auto"`` depends on it).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        _say(f"torch threads: {args.threads}")
        return
    default = torch.get_num_threads()
    if default <= 1 or resolve_device(args.device).type != "cpu":
        return
    chosen = _block_backend(spec, images, args, n_pairs)
    if chosen is Inductor:
        # compiled loops are split over pairs by OpenMP and scale with threads (about 1.8x on 2 cores),
        # unlike the eager small block timed below
        return
    if chosen is Native:
        # the native kernel hands out blocks of pairs to its threads one at a time, so a thread slowed
        # by other work delays only its own block: all cores
        _say(f"torch threads: {default} (native CPU kernel)")
        return
    X = images["train"]
    edge = min(len(X), 24)
    options = {"dtype": args.dtype, "device": "cpu", "backend": "eager"}
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


def _default_tile(args: argparse.Namespace) -> int:
    if args.scheduler in ("sync", "local") or args.device not in ("auto", None):
        return default_tile_size(args.device)
    return 512  # workers elsewhere, devices unknown here


def _store_name(config: str, args: argparse.Namespace, sizes: dict[str, int]) -> str:
    ds = "" if args.dataset == "mnist" else f"{args.dataset}_"
    return f"{ds}{config}_{args.split}_{sizes['n_train']}-{sizes['n_val']}-{sizes['n_test']}_{args.dtype}.h5"


def _store_bytes(sizes: dict[str, int], dtype: str) -> int:
    """Bytes of a complete store's kernel matrices (the bulk of the file)."""
    n = sizes["n_train"]
    return (n * n + (sizes["n_val"] + sizes["n_test"]) * n) * np.dtype(dtype).itemsize


def _preflight(configs: Sequence[str], args: argparse.Namespace, sizes: dict[str, int], store_dir: Path) -> None:
    """Refuse, with the numbers, a run whose stores, factor or memory budget this machine cannot hold."""
    import shutil

    n = sizes["n_train"]
    budget = args.memory_budget if args.memory_budget is not None else default_memory_budget()
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


def _check_budget(args: argparse.Namespace) -> None:
    """Refuse a ``--memory-budget`` above the memory available now (every command, before any work)."""
    budget = getattr(args, "memory_budget", None)
    avail = available_memory()
    if budget is not None and avail is not None and budget > avail:
        raise UserError(
            f"the memory budget {format_bytes(budget)} exceeds the memory available now ({format_bytes(avail)}); "
            "give a smaller --memory-budget"
        )


def _check_writable(folder: Path, what: str) -> None:
    """Make ``folder`` if needed and check that a file can be created in it, before any work.

    :raises UserError: naming ``what`` (e.g. ``"--workdir"``) and the cause.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(
            f"{what}: cannot write in {folder} ({exc.strerror or exc}); choose a folder this user can write to"
        ) from None


def _check_output_file(path: Path, what: str) -> None:
    """Check, before any work, that ``path`` can be written: a file (not a folder) in a writable folder."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    _check_writable(path.parent, what)


def _check_ridge(args: argparse.Namespace, n_val: int | None = None) -> None:
    """Refuse ``--ridge`` with what it cannot go with, before any work (its values are checked by the parser)."""
    ridges = getattr(args, "ridge", None)
    if not ridges:
        return
    try:
        check_ridges(ridges)
    except ValueError as exc:
        raise UserError(f"--ridge: {exc}") from None
    if args.jitter:
        raise UserError(
            "--jitter and --ridge both add to the diagonal of Kxx: give one of them (--ridge 0 is the paper's "
            "classifier, with its jitter retries)"
        )
    if args.variances:
        raise UserError(
            "--variances needs the factor of the classifier's one solve; --ridge runs one per term: give --jitter "
            "instead (a ridge lambda is --jitter lambda times the mean diagonal of Kxx)"
        )
    if n_val == 0:
        raise UserError("--ridge chooses its term on the validation images: give --n-val above 0")


def _check_jitter(jitter: float, mean_diagonal: float, where: str) -> None:
    """Refuse a first jitter above the mean diagonal of ``Kxx`` (the images' mean prior variance).

    Such a jitter is noise larger than the signal: ``(Kxx + jitter I)^-1`` is then ``I / jitter`` up to the small
    part ``Kxx / jitter``, the classifier has become a sum of kernel values per class, and a very large one
    underflows the dual coefficients to zero (every prediction the same class).
    """
    if jitter > 0 and math.isfinite(mean_diagonal) and jitter > mean_diagonal:
        raise UserError(
            f"--jitter {jitter:g} is larger than the mean diagonal of Kxx ({mean_diagonal:.4g}, {where}): a noise "
            f"variance above the prior variance of the images swamps the kernel; give --jitter at most "
            f"{mean_diagonal:.4g} (0, as published, is the default)"
        )


def _reset_peak_rss() -> bool:
    """Start a new peak of this process's resident memory (Linux: ``/proc/self/clear_refs``); whether it did."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _vm_hwm() is not None


def _vm_hwm() -> int | None:
    """The process's peak resident memory since the last reset (Linux ``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss(since_reset: bool = False) -> int | None:
    """Peak resident memory of this process in bytes: since :func:`_reset_peak_rss` if ``since_reset`` (it
    succeeded), else over its whole life."""
    if since_reset:
        peak = _vm_hwm()
        if peak is not None:
            return peak
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)
