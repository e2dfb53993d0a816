"""Computing the blocks of a kernel store, in-process or on a Dask cluster.

Three schedulers, one code path:

* ``"sync"`` (the default): blocks are computed one after the other in this process, no Dask needed;
* ``"local"``: a :class:`dask.distributed.LocalCluster` of worker *processes* on this machine (``n_workers``,
  one thread each), started and closed for the run;
* ``"tcp://host:8786"`` (any Dask scheduler address): an existing cluster, possibly across machines. Every worker
  needs this package installed; give each worker one GPU (e.g. ``CUDA_VISIBLE_DEVICES=k dask worker ADDRESS
  --nworkers 1 --nthreads 1``).

The image arrays are scattered to the workers once; each task rebuilds the architecture from its configuration
name (or factory function) and hyperparameters (:class:`ArchitectureSpec`, so nothing unpicklable travels),
computes one block of the NNGP or the NTK with :func:`gpytorch_cnngp.gram` (or :func:`gpytorch_cnngp.gram_diag`)
and returns it as a NumPy array. Only the client writes the HDF5 store, committing each block as it arrives
(:meth:`KernelStore.write_block`); a bounded number of blocks is in flight at any time. A worker lost mid-run
(killed, out of memory, its machine gone) costs only the blocks it was computing: they are submitted again, and
the images it held are scattered again from the client, which keeps them. This holds for every worker the run
started with, as long as one worker remains or joins: when none is left, the run waits ``worker_wait`` seconds
for one and then stops with :class:`WorkersLost`, its finished blocks committed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .architectures import ARCHITECTURES
from .devices import parse_device
from .layers import Layer
from .progress import progress_bar
from .store import Block, KernelStore

__all__ = [
    "ArchitectureSpec",
    "ComputeReport",
    "SchedulerUnavailable",
    "WorkersLost",
    "check_scheduler",
    "compute_block",
    "compute_store",
    "default_tile_size",
    "open_client",
    "resolve_device",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------------------
# architectures that travel


_MODELS: dict[tuple[Any, ...], Layer] = {}


@dataclass(frozen=True)
class ArchitectureSpec:
    """An architecture by name plus every keyword argument of its factory, and the kernel to compute (picklable).

    :ivar name: a key of :data:`gpytorch_cnngp.architectures.ARCHITECTURES`, or with ``factory`` the name the
        stores record for that network.
    :ivar kwargs: the factory's keyword arguments, defaults included (see :meth:`from_name`).
    :ivar get: the kernel, as :func:`gpytorch_cnngp.gram`'s ``get``: ``"nngp"`` (default) or ``"ntk"``.
    :ivar factory: a network not in ``ARCHITECTURES``: a module-level function returning the layer tree (it is
        pickled by reference, so Dask workers must be able to import it); ``None`` looks ``name`` up there.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    get: str = "nngp"
    factory: Callable[..., Layer] | None = None

    def __post_init__(self) -> None:
        if self.get not in _KERNELS:
            raise ValueError(f"get must be one of {', '.join(_KERNELS)}, got {self.get!r}")
        if "get" in self.kwargs:
            raise ValueError(f"{self.name}: 'get' is the kernel's kind, not an argument of the network's factory")

    @classmethod
    def from_name(
        cls, name: str, *, get: str = "nngp", factory: Callable[..., Layer] | None = None, **overrides: Any
    ) -> ArchitectureSpec:
        """The spec of configuration ``name`` with its defaults filled in and ``overrides`` applied.

        :param get: the kernel (``"nngp"`` or ``"ntk"``).
        :param factory: build the network with this function instead of ``ARCHITECTURES[name]``.
        :raises ValueError: for an unknown name or an argument the factory does not take.
        """
        function = factory if factory is not None else _architecture(name)
        params = inspect.signature(function).parameters
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ValueError(f"{name} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(params)}")
        kwargs = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        kwargs.update(overrides)
        return cls(name, kwargs, get, factory)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """What a store records as its hyperparameters: the factory's keyword arguments, and ``get`` for a kernel
        other than the NNGP (so NNGP stores read as before, and an NTK store is never taken for an NNGP one)."""
        out = dict(self.kwargs)
        if self.get != "nngp":
            out["get"] = self.get
        return out

    def cached(self) -> Layer:
        """A model of this architecture shared by every block this process computes.

        Reusing one model matters for the compiled path: ``torch.compile`` keys its graphs on the layer
        objects, so a fresh model per block would be recompiled (seconds) for every block.
        """
        key = (self.name, self.factory, repr(sorted(dict(self.kwargs).items())))
        model = _MODELS.get(key)
        if model is None:
            if len(_MODELS) >= 8:
                _MODELS.clear()
            model = _MODELS[key] = self.build()
        return model

    def build(self) -> Layer:
        """A fresh model of this architecture."""
        function = self.factory if self.factory is not None else _architecture(self.name)
        return function(**dict(self.kwargs))


_KERNELS = ("nngp", "ntk")


def _architecture(name: str) -> Callable[..., Layer]:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown configuration {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# --------------------------------------------------------------------------------------------------------------
# one block


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): a CUDA device when one is present, else the CPU; anything else as given.

    Inside a Dask worker whose name is an integer ``k`` (a local cluster), ``"auto"`` picks GPU ``k`` modulo the
    number of GPUs, so that the workers of one machine share its GPUs out.
    """
    if device is None or str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = 0
        with contextlib.suppress(Exception):
            from distributed import get_worker

            name = get_worker().name
            if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
                index = int(name) % torch.cuda.device_count()
        return torch.device("cuda", index)
    return parse_device(device)


def default_tile_size(device: str | torch.device | None) -> int:
    """The default edge of the stored blocks: 2048 on a GPU, 256 on the CPU.

    A block is the unit of checkpointing and of distribution; inside a block the engine tiles again to fit
    memory, so a large block costs nothing extra on a GPU. Each block computes the self terms of its own
    images, so on the CPU 256 amortises them (the README's MNIST ConvNet GP job ran faster with 256 than with 128
    in the native kernel) while a block still takes only seconds eagerly, little work to lose.
    """
    dev = resolve_device(device) if device is None or str(device) == "auto" else torch.device(device)
    return 2048 if dev.type == "cuda" else 256


def compute_block(
    spec: ArchitectureSpec,
    row_images: np.ndarray,
    rows: tuple[int, int],
    col_images: np.ndarray | None,
    cols: tuple[int, int] | None,
    *,
    symmetric: bool = False,
    dtype: str = "float32",
    device: str = "auto",
    memory_budget: int | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> tuple[np.ndarray, float, str]:
    """Compute one block where it runs (this process or a Dask worker).

    :param spec: the architecture.
    :param row_images: the images the rows index, ``[n, C, H, W]`` (the whole part; ``rows`` selects).
    :param rows: half-open range of row images.
    :param col_images: the images the columns index; ``None`` for a diagonal block (``k(x, x)``).
    :param cols: half-open range of column images; ``None`` for a diagonal block.
    :param symmetric: rows and columns are the same images (an on-diagonal ``Kxx`` tile): computed as ``K(X, X)``,
        whose diagonal is exactly the self variance.
    :param dtype: ``"float32"`` or ``"float64"``.
    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    :param memory_budget: bytes the engine may use (default: its own).
    :param backend: passed to :func:`gpytorch_cnngp.gram`, whose policy (:func:`gpytorch_cnngp.backends.choose`)
        decides for ``"auto"`` as for any call: the native CPU kernel where the network allows it,
        ``torch.compile`` for large blocks of networks without pooling, else eager.
    :param threads: set ``torch.set_num_threads`` first (``None`` leaves it).
    :return: ``(values, seconds, device)``: the block as a NumPy array of ``dtype``, the compute time, and the
        device it ran on.
    """
    from .engine import gram, gram_diag

    started = time.perf_counter()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    tdtype = _DTYPES[dtype]
    model = spec.cached()
    x = torch.as_tensor(np.asarray(row_images[rows[0] : rows[1]])).to(device=dev, dtype=tdtype)
    if cols is None:
        values = gram_diag(model, x, get=spec.get)
    elif symmetric:
        values = gram(model, x, memory_budget=memory_budget, backend=backend, get=spec.get)
    else:
        assert col_images is not None
        z = torch.as_tensor(np.asarray(col_images[cols[0] : cols[1]])).to(device=dev, dtype=tdtype)
        values = gram(model, x, z, memory_budget=memory_budget, backend=backend, get=spec.get)
    out = values.detach().to("cpu").numpy()
    return out, time.perf_counter() - started, str(dev)


# --------------------------------------------------------------------------------------------------------------
# schedulers


class SchedulerUnavailable(RuntimeError):
    """The Dask scheduler cannot be reached, or dask.distributed is not installed."""


class WorkersLost(SchedulerUnavailable):
    """Every Dask worker was lost and none joined within the wait; the blocks finished before are committed."""


_IN_PROCESS = ("sync", "inprocess", "in-process")


def check_scheduler(scheduler: str) -> None:
    """Refuse a scheduler string that :func:`open_client` would not understand (before any work is done).

    :raises ValueError: unless ``scheduler`` is ``"sync"``, ``"local"`` or an address ``protocol://host:port``.
    """
    if scheduler in _IN_PROCESS or scheduler == "local":
        return
    protocol, sep, rest = scheduler.partition("://")
    if not sep or not protocol or not rest:
        raise ValueError(
            f"unknown scheduler {scheduler!r}: use 'sync' (in-process), 'local' (a local Dask cluster) or a Dask "
            "scheduler address such as tcp://host:8786"
        )


@contextlib.contextmanager
def open_client(scheduler: Any = "sync", n_workers: int | None = None) -> Iterator[Any]:
    """A Dask client for ``scheduler``, or ``None`` for in-process work; closes what it started.

    :param scheduler: ``"sync"`` (or ``None``/``"inprocess"``): no Dask; ``"local"``: a new
        :class:`~dask.distributed.LocalCluster` of ``n_workers`` processes (default: one per CPU core, up to 4)
        with one thread each; an address such as ``"tcp://host:8786"``: connect to that scheduler; an existing
        :class:`~dask.distributed.Client`: used as is (not closed).
    :raises ValueError: for an unknown scheduler string.
    :raises SchedulerUnavailable: when ``dask.distributed`` is missing or the scheduler cannot be reached.
    """
    if scheduler is None or scheduler in _IN_PROCESS:
        yield None
        return
    if not isinstance(scheduler, str):
        yield scheduler  # a Client made by the caller
        return
    check_scheduler(scheduler)
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - dask is in the experiments extra
        raise SchedulerUnavailable(
            "this scheduler needs dask.distributed: pip install 'gpytorch-cnngp[experiments]'"
        ) from err
    if scheduler == "local":
        if n_workers is None:
            n_workers = max(1, min(4, os.cpu_count() or 1))
        if n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # a lost worker is reported once by compute_store, not by every layer
        )
        try:
            client = Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout="30s")
    except OSError as exc:
        raise SchedulerUnavailable(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        yield client
    finally:
        client.close()


@dataclass
class ComputeReport:
    """What :func:`compute_store` did.

    :ivar blocks: blocks computed and committed in this run.
    :ivar entries: kernel entries computed in this run.
    :ivar seconds: wall-clock seconds of this run.
    :ivar devices: the devices the blocks ran on.
    :ivar complete: whether the store is now complete.
    """

    blocks: int = 0
    entries: int = 0
    seconds: float = 0.0
    devices: set[str] = field(default_factory=set)
    complete: bool = False


def compute_store(
    store: KernelStore,
    spec: ArchitectureSpec,
    images: Mapping[str, np.ndarray],
    *,
    scheduler: Any = "sync",
    n_workers: int | None = None,
    device: str = "auto",
    memory_budget: int | None = None,
    backend: str = "auto",
    threads: int | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
    on_block: Callable[[Block, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    worker_wait: float | None = None,
) -> ComputeReport:
    """Compute every block of ``store`` that is not committed yet, and commit each one as it finishes.

    :param store: a store open for writing (``mode="r+"``).
    :param spec: the architecture (must be the store's: its name and hyperparameters are checked).
    :param images: ``{"train": X, "val": X, "test": X}``, arrays ``[n, C, H, W]`` of the store's part sizes.
    :param scheduler: see :func:`open_client`.
    :param n_workers: workers of a ``"local"`` cluster.
    :param device: where blocks run (``"auto"``: the GPU of the worker when it has one).
    :param memory_budget: bytes the engine may use per block.
    :param backend: passed to :func:`gpytorch_cnngp.gram` for every block (``"auto"``: its policy).
    :param threads: torch threads in each task (``None``: leave the process default).
    :param max_in_flight: blocks submitted but not yet written (default: twice the cluster's threads).
    :param progress: show a progress bar (entries, rate, ETA).
    :param on_block: called with each committed block and its seconds (e.g. for logging).
    :param log: called with a line when a lost Dask worker's blocks are submitted again.
    :param worker_wait: on a Dask cluster, seconds to wait for a worker when every worker has been lost
        (default: ``DEFAULT_WORKER_WAIT``).
    :return: a :class:`ComputeReport`.
    :raises NonFiniteTileError: when a block holds NaN/inf (the blocks committed before it stay committed).
    :raises WorkersLost: when no Dask worker is left and none joins within ``worker_wait`` seconds.
    """
    if store.mode != "r+":
        raise ValueError("compute_store needs a store opened for writing (mode='r+')")
    meta = store.meta
    if spec.name != meta.architecture or spec.hyperparameters != dict(meta.hyperparameters):
        raise ValueError(
            f"the architecture {spec.name} {spec.hyperparameters} is not the store's "
            f"{meta.architecture} {dict(meta.hyperparameters)}"
        )
    arrays: dict[str, np.ndarray] = {}
    for part in ("train", "val", "test"):
        a = np.ascontiguousarray(np.asarray(images[part]), dtype=meta.dtype)
        if a.ndim != 4 or a.shape[0] != meta.size(part):
            raise ValueError(f"images[{part!r}] has shape {a.shape}, expected [{meta.size(part)}, C, H, W]")
        arrays[part] = a
    pending = store.pending()
    done, total = store.entries()
    report = ComputeReport()
    started = time.perf_counter()
    if not pending:
        report.complete = True
        return report
    options = {"dtype": meta.dtype, "device": device, "memory_budget": memory_budget, "backend": backend}
    bar = progress_bar(progress, total, f"{meta.architecture} kernels", "entries", initial=done, smoothing=0.1)

    def commit(block: Block, values: np.ndarray, seconds: float, dev: str) -> None:
        store.write_block(block, values, seconds)
        report.blocks += 1
        report.entries += block.entries
        report.devices.add(dev)
        if bar is not None:
            bar.update(block.entries)
        if on_block is not None:
            on_block(block, seconds)

    try:
        with open_client(scheduler, n_workers) as client:
            if client is None:
                committer = _Committer(commit)
                try:
                    for block in pending:
                        values, seconds, dev = compute_block(
                            spec, *_block_inputs(block, arrays), symmetric=block.symmetric, threads=threads, **options
                        )
                        committer.put(block, values, seconds, dev)
                except BaseException:
                    committer.close(reraise=False)  # the blocks computed so far are still committed
                    raise
                committer.close()
            else:
                wait = DEFAULT_WORKER_WAIT if worker_wait is None else worker_wait
                _run_on_dask(client, spec, arrays, pending, options, threads, max_in_flight, commit, log, wait)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - started
    report.complete = store.is_complete()
    return report


def _block_inputs(block: Block, images: Mapping[str, Any]) -> tuple[Any, tuple[int, int], Any, Any]:
    """``compute_block``'s row images, rows, column images and columns for ``block`` (images: arrays or futures)."""
    return images[block.row_part], block.rows, images[block.col_part] if block.col_part else None, block.cols


class _Committer:
    """Commits computed blocks in a thread of its own, so that writing them (and the ``fsync`` of each) overlaps
    the computation of the next block; the kernels release the GIL while they compute.

    At most ``depth`` computed blocks wait. The first error of a commit is raised by the next :meth:`put` or by
    :meth:`close`, and nothing is committed after it.
    """

    def __init__(self, commit: Callable[..., None], depth: int = 1) -> None:
        self._commit = commit
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cnngp-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._commit(*item)
                except BaseException as exc:  # handed to the computing thread
                    self._error = exc

    def put(self, *item: Any) -> None:
        """Queue one block for committing (waits while ``depth`` blocks are waiting)."""
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self, reraise: bool = True) -> None:
        """Wait until every queued block is committed; then raise the first commit error (if ``reraise``)."""
        self._queue.put(None)
        self._thread.join()
        if reraise and self._error is not None:
            raise self._error


def _run_on_dask(client, spec, arrays, pending, options, threads, max_in_flight, commit, log=None, wait=None) -> None:
    """Run ``pending`` on the Dask ``client``, committing blocks as they arrive; survive the loss of workers.

    The images are scattered once. Dask keeps one copy of scattered data (its memory manager drops the extra
    replicas of a broadcast), and scattered data that dies with its worker cannot be recomputed: so when a
    worker is lost, the images it held are scattered again from this process to the workers there are now
    (new ones included), and the blocks that failed with it are submitted again. A block whose own computation
    fails is submitted at most ``_MAX_ATTEMPTS`` times; failures that came with lost images do not count, so a
    run outlives any number of lost workers. With no worker left for ``wait`` seconds, :class:`WorkersLost`.
    """
    from distributed import as_completed

    wait = DEFAULT_WORKER_WAIT if wait is None else float(wait)
    futures_of: dict[str, Any] = {}

    def scatter(parts: list[str], broadcast: bool, gone: str) -> None:
        """Send ``parts`` of the images to the workers there are, waiting up to ``wait`` s for one to be there."""
        deadline = time.monotonic() + wait
        while True:
            try:  # the scheduler may still list a dead worker, or have none while a nanny restarts one
                timeout = max(0.5, min(10.0, deadline - time.monotonic()))
                data = {part: arrays[part] for part in parts}
                futures_of.update(client.scatter(data, broadcast=broadcast, timeout=timeout))
                return
            except (OSError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise WorkersLost(
                        f"{gone} of the Dask scheduler at {client.scheduler.address} and none joined within {wait:g} "
                        "s; the finished tiles are saved: start workers and run the same command again to resume"
                    ) from exc
                time.sleep(0.2)

    scatter(list(arrays), True, "there is no worker")
    if max_in_flight is None:
        max_in_flight = max(2, 2 * sum(client.nthreads().values()))
    queue = list(pending)
    position = 0
    block_of: dict[Any, Block] = {}
    attempts: dict[Block, int] = {}
    losses: dict[Block, int] = {}

    def submit(block: Block) -> Any:
        attempts[block] = attempts.get(block, 0) + 1
        future = client.submit(
            compute_block,
            spec,
            *_block_inputs(block, futures_of),
            symmetric=block.symmetric,
            threads=threads,
            pure=False,
            key=f"cnngp-{block.name}-{'-'.join(map(str, block.index))}-{os.getpid()}-{time.time_ns()}",
            **options,
        )
        block_of[future] = block
        return future

    def next_block() -> Any:
        nonlocal position
        position += 1
        return submit(queue[position - 1])

    def rescatter_lost() -> list[str]:
        lost = [part for part, future in futures_of.items() if future.status != "finished"]
        if lost:
            scatter(lost, False, "every worker was lost")
        return lost

    running = as_completed([next_block() for _ in range(min(max_in_flight, len(queue)))])
    try:
        for future in running:
            block = block_of.pop(future)
            try:
                values, seconds, dev = future.result()
            except Exception as exc:
                lost = rescatter_lost()
                if lost and losses.get(block, 0) < _MAX_LOSSES:
                    losses[block] = losses.get(block, 0) + 1
                    attempts[block] -= 1  # the images went with a worker: not the block's own failure
                if not (lost or _worker_lost(exc)) or attempts[block] >= _MAX_ATTEMPTS:
                    tried = f" (attempt {attempts[block]})" if attempts[block] > 1 else ""
                    raise RuntimeError(f"computing {block.describe()} failed on a worker{tried}: {exc}") from exc
                future.release()
                running.add(submit(block))  # a lost worker costs only the blocks it was computing
                if log is not None:
                    again = f"; images scattered again: {', '.join(lost)}" if lost else ""
                    log(f"a Dask worker was lost: {block.describe()} submitted again{again}")
                continue
            commit(block, values, seconds, dev)
            del values
            future.release()
            if position < len(queue):
                running.add(next_block())
    finally:
        for future in list(block_of):
            future.cancel()


_MAX_ATTEMPTS = 4
"""Times one block is submitted before a lost worker's failure is taken as the block's own."""

_MAX_LOSSES = 16
"""Failures of one block that came with lost images and are not counted as its attempts (a block that kills
its worker every time, out of memory say, still ends the run)."""

DEFAULT_WORKER_WAIT = 120.0
"""How long a run with no worker left waits for one to join (workers restarted by their nannies take seconds)."""


def _worker_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the task died with its worker (or its inputs did), not that it raised."""
    import asyncio
    import concurrent.futures

    from distributed import KilledWorker
    from distributed.comm import CommClosedError

    return isinstance(exc, KilledWorker | CommClosedError | asyncio.CancelledError | concurrent.futures.CancelledError)
