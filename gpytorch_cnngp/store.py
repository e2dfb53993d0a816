"""A resumable, crash-safe HDF5 store for the kernel matrices behind a classification run.

One file holds, for a data split of ``n_train`` training, ``n_val`` validation and ``n_test`` test images:

* ``Kxx`` ``[n_train, n_train]``, ``Kvx`` ``[n_val, n_train]`` and ``Ktx`` ``[n_test, n_train]``. Of ``Kxx`` only
  the tiles on and above the diagonal are written; :meth:`KernelStore.read` and :meth:`KernelStore.read_into`
  take the rest from them by symmetry. (Writing each tile's transpose too was a column of scattered small
  writes per tile, which at 50,000 images made committing tiles cost about half as much as computing them.
  Stores made when the transposes were written read the same way.);
* the diagonals ``Kvv_diag`` ``[n_val]`` and ``Ktt_diag`` ``[n_test]`` (for predictive variances);
* the labels ``y_train``, ``y_val`` and ``y_test``, each with the CRC-32 of its bytes (attribute ``crc_y_<part>``;
  stores made before it lack it and are checked against the labels' SHA-256 in ``checksums`` only);
* per block of ``tile_size`` rows and columns, a completion record ``done_<name>`` (uint8), the seconds the
  block took, ``seconds_<name>`` (float64), and the CRC-32 of the block's bytes as committed, ``crc_<name>``
  (uint32; stores made before checksums were added lack it and are checked for NaN/inf only);
* attributes recording the architecture, its hyperparameters, the dtype, the data set and split, the sizes,
  checksums of the images and labels, the tile size and the package version.

Crash safety (a run killed at any moment, ``kill -9`` included, resumes where it stopped):

* the file is built completely under a temporary name and renamed into place, so a store either exists
  whole or not at all;
* every dataset is created up front with contiguous, early-allocated storage and no timestamps, so that
  computing tiles later writes raw data only and never touches HDF5 metadata; the file keeps the default
  (earliest) format, which has no "file open" status flag, so it reopens after a crash;
* a tile is committed by writing its values, flushing them to the operating system (and ``fsync``), and only
  then setting its ``done`` byte and flushing again. A kill between the two leaves the tile marked not done;
  it is recomputed on resume, and since blocks are computed deterministically the result is the same.

Integrity (damage after a tile was committed: a disk error, a stray write, a bad copy): :meth:`KernelStore.verify`
reads every committed tile and reports those whose bytes no longer match their checksum or that hold NaN/inf;
:meth:`KernelStore.mark_for_recompute` turns them back into pending tiles, so that only they are computed again
(``cnngp kernels --repair``). Labels are checked against their checksums whenever they are read
(:meth:`KernelStore.labels`); they cannot be recomputed from kernels, so damaged ones are written again from the
data set (:meth:`KernelStore.rewrite_labels`, which refuses labels that do not match the recorded checksums).
A file whose HDF5 structure (its metadata, not a tile) cannot be read raises :class:`UnreadableStore`, one line
that names the file and says to move it aside; nothing of h5py's own errors reaches the caller.

Failed writes (a full or read-only disk, a file made immutable): the store is opened without HDF5's raw-data sieve
buffer, so that every write reaches the file at once and a failed one fails in :meth:`KernelStore.write_block`
(one :class:`StoreError`; the tiles committed before it stay committed), and never later, while HDF5 closes the
file (where it used to end in a segmentation fault).

Only one process writes a store at a time (HDF5's file lock refuses a second writer).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .datasets.idx import data_checksum
from .memory import format_bytes
from .progress import progress_bar

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MATRICES",
    "DIAGONALS",
    "Block",
    "StoreMeta",
    "StoreError",
    "StoreMismatch",
    "StoreIncomplete",
    "StoreExists",
    "NonFiniteTileError",
    "DamagedStore",
    "DamagedLabels",
    "UnreadableStore",
    "KernelStore",
]

FORMAT = "gpytorch_cnngp.kernel_store"
"""Value of the ``format`` attribute of every store."""

FORMAT_VERSION = 1
"""Layout version of the store; stores of another version are refused."""

MATRICES: dict[str, tuple[str, str]] = {"Kxx": ("train", "train"), "Kvx": ("val", "train"), "Ktx": ("test", "train")}
"""The kernel matrices: name -> (row part, column part)."""

DIAGONALS: dict[str, str] = {"Kvv_diag": "val", "Ktt_diag": "test"}
"""The stored diagonals: name -> part."""

PARTS: tuple[str, ...] = ("train", "val", "test")

_DTYPES = ("float32", "float64")

_DATASET_DTYPES = {"done": "u1", "seconds": "f8", "crc": "u4", "y": "i8"}
"""dtype of the datasets by the prefix of their name (the kernels have the store's dtype)."""

_HEAD_BYTES = 1 << 16
"""At most this many bytes of the file's head are compared to notice another file copied over a store in use."""


# --------------------------------------------------------------------------------------------------------------
# errors


class StoreError(RuntimeError):
    """A kernel store cannot be created, opened or used."""


class StoreMismatch(StoreError):
    """An existing store was made for another architecture, hyperparameters, split, sizes, dtype or data."""

    def __init__(self, path: Path, differences: list[tuple[str, Any, Any]]) -> None:
        self.path = path
        self.differences = differences
        lines = "\n".join(
            f"  - {key}: the store has {stored!r}, this run wants {wanted!r}" for key, stored, wanted in differences
        )
        super().__init__(
            f"{path} was made for a different run and is not reused:\n{lines}\n"
            "Choose another output file, or delete this one to start again."
        )


class StoreExists(StoreError):
    """Another process created the same store first."""


class StoreIncomplete(StoreError):
    """The store does not hold every block yet (the run computing it was interrupted)."""


class NonFiniteTileError(StoreError):
    """A computed tile contains NaN or infinite values; nothing of it was written."""

    def __init__(self, block: Block, n_bad: int, total: int) -> None:
        self.block = block
        super().__init__(
            f"tile {block.describe()} contains {n_bad} NaN or infinite value(s) out of {total}; it was not written. "
            "Check the hyperparameters and the dtype (float64 gives more range)."
        )


class DamagedStore(StoreError):
    """Committed tiles no longer hold what was computed (checksum mismatch, NaN or inf).

    :ivar damaged: ``(block, reason)`` for every damaged block.
    """

    def __init__(self, path: Path, damaged: list[tuple[Block, str]]) -> None:
        self.path = path
        self.damaged = damaged
        shown = "\n".join(f"  - {block.describe()}: {why}" for block, why in damaged[:10])
        more = f"\n  ... and {len(damaged) - 10} more" if len(damaged) > 10 else ""
        super().__init__(
            f"{path} is damaged: {len(damaged)} committed tile(s) no longer hold what was computed:\n{shown}{more}\n"
            "Run the same `cnngp kernels` (or `cnngp table`) command again with --repair to recompute just those "
            "tiles."
        )


class DamagedLabels(StoreError):
    """Stored labels no longer match the checksums recorded when the store was made.

    :ivar damaged: ``(part, reason)`` for every damaged part (``"train"``, ``"val"`` or ``"test"``).
    """

    def __init__(self, path: Path, damaged: list[tuple[str, str]]) -> None:
        self.path = path
        self.damaged = damaged
        which = ", ".join(f"y_{part} ({why})" for part, why in damaged)
        super().__init__(
            f"{path} is damaged: its labels {which} no longer match the checksums recorded when it was made. "
            "Labels cannot be recomputed from the kernels: run the same `cnngp kernels` (or `cnngp table`) command "
            "again with --repair to write them again from the data set"
        )


class UnreadableStore(StoreError):
    """The file's HDF5 structure (its metadata, not a tile) cannot be read: damaged, or overwritten by another file."""


# --------------------------------------------------------------------------------------------------------------
# metadata and blocks


@dataclass(frozen=True)
class StoreMeta:
    """What a store was computed for; a store is reused only for an identical :class:`StoreMeta`.

    :ivar architecture: the configuration name (a key of :data:`gpytorch_cnngp.architectures.ARCHITECTURES`, or
        the name of a network built by a function of the caller's).
    :ivar hyperparameters: the keyword arguments of the architecture factory (every one, defaults included), and
        ``get`` for a kernel other than the NNGP (see ``ArchitectureSpec.hyperparameters``).
    :ivar dtype: ``"float32"`` or ``"float64"``, the dtype the kernels are computed and stored in.
    :ivar dataset: ``"mnist"`` or ``"fashion_mnist"``.
    :ivar split: the split name (see :data:`gpytorch_cnngp.datasets.SPLITS`).
    :ivar n_train, n_val, n_test: the sizes of the three parts (the first images of each part of the split).
    :ivar checksums: SHA-256 of the images (as uint8) and labels of each part: keys ``train_images``,
        ``train_labels``, ``val_images``, ... (see :func:`gpytorch_cnngp.datasets.data_checksum`).
    """

    architecture: str
    hyperparameters: Mapping[str, Any]
    dtype: str
    dataset: str
    split: str
    n_train: int
    n_val: int
    n_test: int
    checksums: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for part in PARTS:
            n = getattr(self, f"n_{part}")
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
                raise ValueError(f"n_{part} must be a non-negative integer, got {n!r}")
        if self.n_train < 1:
            raise ValueError("n_train must be at least 1")

    def size(self, part: str) -> int:
        """Number of images of ``part`` (``"train"``, ``"val"`` or ``"test"``)."""
        return int(getattr(self, f"n_{part}"))

    def items(self) -> dict[str, Any]:
        """The comparable fields as plain JSON-able values (hyperparameters and checksums as sorted dicts)."""
        return {
            "architecture": self.architecture,
            "hyperparameters": json.loads(json.dumps(dict(self.hyperparameters), sort_keys=True)),
            "dtype": self.dtype,
            "dataset": self.dataset,
            "split": self.split,
            "n_train": int(self.n_train),
            "n_val": int(self.n_val),
            "n_test": int(self.n_test),
            "checksums": dict(sorted(self.checksums.items())),
        }


@dataclass(frozen=True)
class Block:
    """One tile of a stored matrix (or one segment of a stored diagonal).

    :ivar name: the dataset (``"Kxx"``, ``"Kvx"``, ``"Ktx"``, ``"Kvv_diag"`` or ``"Ktt_diag"``).
    :ivar index: the block's position in the completion record: ``(bi, bj)`` for matrices, ``(bi,)`` for diagonals.
    :ivar rows: half-open row range.
    :ivar cols: half-open column range (``None`` for diagonals).
    :ivar row_part, col_part: the data parts the rows and columns index (``col_part`` ``None`` for diagonals).
    """

    name: str
    index: tuple[int, ...]
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    row_part: str
    col_part: str | None

    @property
    def is_diagonal(self) -> bool:
        """A segment of a stored diagonal (``k(x, x)`` for single images)."""
        return self.cols is None

    @property
    def symmetric(self) -> bool:
        """An on-diagonal tile of ``Kxx``: the images of its rows and columns are the same."""
        return self.name == "Kxx" and self.index[0] == self.index[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the block's values."""
        if self.cols is None:
            return (self.rows[1] - self.rows[0],)
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def entries(self) -> int:
        """Number of kernel entries computed for this block."""
        return int(math.prod(self.shape))

    def describe(self) -> str:
        """E.g. ``Kxx[0:100, 200:300] (block (0, 2))``."""
        r = f"{self.rows[0]}:{self.rows[1]}"
        where = f"{self.name}[{r}]" if self.cols is None else f"{self.name}[{r}, {self.cols[0]}:{self.cols[1]}]"
        return f"{where} (block {self.index if len(self.index) > 1 else self.index[0]})"


def _n_blocks(n: int, tile: int) -> int:
    return -(-n // tile)


def _block(name: str, index: tuple[int, ...], meta: StoreMeta, tile: int) -> Block:
    """The block of dataset ``name`` at ``index`` (its place in the completion record) for edge ``tile``."""
    if name in DIAGONALS:
        (bi,) = index
        n = meta.size(DIAGONALS[name])
        return Block(name, (bi,), (bi * tile, min(n, (bi + 1) * tile)), None, DIAGONALS[name], None)
    rp, cp = MATRICES[name]
    bi, bj = index
    rows = (bi * tile, min(meta.size(rp), (bi + 1) * tile))
    cols = (bj * tile, min(meta.size(cp), (bj + 1) * tile))
    return Block(name, (bi, bj), rows, cols, rp, cp)


def _dcpl() -> h5py.h5p.PropDCID:
    """Contiguous storage, allocated when the dataset is created, never filled: later writes are raw data only."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _reserve(fd: int, path: Path) -> None:
    """Allocate the whole file on disk now (``posix_fallocate``), so that writing tiles can never meet a full disk.

    HDF5 allocates the datasets early but the file system leaves them as holes; a write into a hole on a full
    disk fails inside HDF5, which then crashed the process on closing (a segmentation fault). Reserving the
    blocks turns that into one clear error before anything is computed. File systems without the call are
    left as they are.
    """
    size = os.fstat(fd).st_size
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # not on this platform
        return
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            return  # not supported here: writes stay sparse
        have = os.fstat(fd).st_blocks * 512
        free = shutil.disk_usage(path.parent).free
        raise StoreError(
            f"not enough disk space for {path}: the store takes {format_bytes(size)}, of which {format_bytes(have)} "
            f"is on disk, and {format_bytes(free)} is free on its file system; free space or choose another place"
        ) from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _crc(values: np.ndarray) -> int:
    """CRC-32 of a block's values in C order (a strided view of a band reads as the same bytes as the tile)."""
    return zlib.crc32(np.ascontiguousarray(values)) & 0xFFFFFFFF


def _read_region(dset: h5py.Dataset, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
    (r0, r1), (c0, c1) = rows, cols
    if out.dtype == dset.dtype and out.flags.c_contiguous:
        dset.read_direct(out, np.s_[r0:r1, c0:c1])
    else:
        out[...] = dset[r0:r1, c0:c1]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _reason(exc: BaseException) -> str:
    """One line for an error of h5py or the OS (HDF5's own messages run over several lines, with a time stamp)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"[Errno {code}] {os.strerror(code)}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0].rstrip(" ,(")


def _from_hdf5(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside h5py (HDF5 could not make sense of the file), not by this module."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "h5py" in Path(last.tb_frame.f_code.co_filename).parts


def _guarded(method: Any) -> Any:
    """Turn h5py's errors in ``method`` (raw KeyError, RuntimeError, OSError, ...) into :class:`UnreadableStore`."""

    @functools.wraps(method)
    def wrapper(self: KernelStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if _from_hdf5(exc):
                raise self._unreadable(exc) from exc
            raise

    return wrapper


def _label_crc(y: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(y, dtype=np.int64)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------------------
# the store


class KernelStore:
    """An HDF5 kernel store opened for reading (``mode="r"``) or for computing tiles (``mode="r+"``).

    Create one with :meth:`create`, open one with :meth:`open`, or do whichever applies with :meth:`open_or_create`.
    Use it as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no kernel store at {self.path}")
        try:
            # Readers skip HDF5's file lock: a store's metadata never changes after creation, so reading while a
            # run is computing tiles is safe (the completion records say which blocks are there).
            self._file = self._open_h5(mode)
        except OSError as exc:
            reason = str(exc)
            # HDF5's own wording; a bare "lock" would also match its "sblock" (superblock) of damaged files
            if "unable to lock file" in reason.lower():
                raise StoreError(
                    f"cannot open {self.path}: another process has it open for writing (only one writer at a time)"
                ) from exc
            if "truncated file" in reason.lower():
                raise StoreError(
                    f"{self.path} is truncated ({reason}): a damaged or partly copied store; recompute it (delete "
                    "it and run the same command again) or copy it again"
                ) from exc
            raise StoreError(
                f"cannot open {self.path} as an HDF5 kernel store: {_reason(exc)}. If it is a damaged store, move it "
                f"aside (e.g. `mv {self.path} {self.path}.damaged`) and run the same command to compute it again"
            ) from exc
        self.mode = mode
        self._failed: str | None = None  # why a write failed: nothing more is written then
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._stamp: tuple[int, ...] | None = None
        self._head = 0  # bytes before the first dataset's values: HDF5's metadata, never written after creation
        try:
            self._check_layout()
            self._done = {name: self._file[f"done_{name}"] for name in (*MATRICES, *DIAGONALS)}
            self._has_crc = all(f"crc_{name}" in self._file for name in self._done)
        except BaseException as exc:
            self.close()
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise self._unreadable(exc) from exc
            raise
        if mode == "r+":
            with contextlib.suppress(Exception):
                self._fd = int(self._file.id.get_vfd_handle())
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            if self._fd is not None:
                try:
                    _reserve(self._fd, self.path)  # stores made before reservation was added are sparse
                except BaseException:
                    self.close()
                    raise
            with contextlib.suppress(Exception):
                offsets = [self._file[name].id.get_offset() for name in self._file]
                self._head = min(min(o for o in offsets if o is not None), _HEAD_BYTES)
            self._stamp = self._file_stamp()

    def _open_h5(self, mode: str) -> h5py.File:
        if mode == "r":
            try:
                return h5py.File(self.path, "r", locking=False)
            except OSError as exc:
                if "locking flag" not in str(exc):
                    raise
                # this process already has the file open (with HDF5's default locking): share that
                return h5py.File(self.path, "r")
        # No sieve buffer: HDF5 otherwise holds small raw-data writes (the completion bytes, checksums, seconds)
        # and writes them at the next flush or at close. When the file has become unwritable, that deferred write
        # failed inside HDF5's close and the process ended in a segmentation fault; without the buffer each write
        # reaches the file (or fails) in write_block itself.
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
        fapl.set_sieve_buf_size(0)
        return h5py.File(h5py.h5f.open(os.fsencode(self.path), h5py.h5f.ACC_RDWR, fapl=fapl))

    def _unreadable(self, exc: BaseException, what: str = "its HDF5 structure") -> UnreadableStore:
        return UnreadableStore(
            f"{self.path} cannot be read as a kernel store: {what} is damaged, or the file was overwritten "
            f"({_reason(exc)}); --repair recomputes tiles but cannot rebuild it. Move it aside (e.g. `mv {self.path} "
            f"{self.path}.damaged`) and run the same command to compute the store again"
        )

    def _file_stamp(self) -> tuple[int, ...] | None:
        """Modification time, size and the CRC-32 of the metadata at the head of the open file.

        Another program writing to the file changes them; this store's own writes change only the time (recorded
        after each). The head's bytes catch a copy made within the time stamps' resolution.
        """
        try:
            st = os.stat(self.path)
            head = os.pread(self._fd, self._head, 0) if self._fd is not None and self._head else b""
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, zlib.crc32(head))

    # ---- creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        meta: StoreMeta,
        labels: Mapping[str, np.ndarray],
        tile_size: int,
        *,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> KernelStore:
        """Create a new, empty store at ``path`` (refused if a file is there) and open it for writing.

        The file is built under ``<path>.incomplete`` and renamed into place once whole.

        :param meta: what the store is for.
        :param labels: ``{"train": y, "val": y, "test": y}``, integer arrays of the part sizes.
        :param tile_size: edge of the blocks that are computed and committed at once.
        :param extra_attrs: more attributes to record (provenance only, never compared), JSON-able values.
        """
        path = Path(path)
        if isinstance(tile_size, bool) or not isinstance(tile_size, int | np.integer) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
        tile_size = int(tile_size)
        if path.exists():
            raise StoreError(f"{path} already exists")
        for part in PARTS:
            y = np.asarray(labels[part])
            if y.shape != (meta.size(part),):
                raise ValueError(f"labels[{part!r}] has shape {y.shape}, expected ({meta.size(part)},)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".incomplete")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a leftover of a creation that was killed
        from . import __version__

        items = meta.items()
        attrs: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": items["architecture"],
            "hyperparameters": json.dumps(items["hyperparameters"], sort_keys=True),
            "dtype": items["dtype"],
            "dataset": items["dataset"],
            "split": items["split"],
            "n_train": items["n_train"],
            "n_val": items["n_val"],
            "n_test": items["n_test"],
            "tile_size": tile_size,
            "checksums": json.dumps(items["checksums"], sort_keys=True),
            "package_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for key, value in items["checksums"].items():
            attrs[f"checksum_{key}"] = value
        for part in PARTS:
            attrs[f"crc_y_{part}"] = _label_crc(np.asarray(labels[part]))
        for key, value in (extra_attrs or {}).items():
            if key in attrs:
                raise ValueError(f"extra attribute {key!r} would overwrite a recorded one")
            if isinstance(value, str):
                attrs[key] = str(value)  # plain str: h5py cannot store str subclasses such as torch's version
            elif isinstance(value, bool | int | float):
                attrs[key] = value
            else:
                attrs[key] = json.dumps(value, sort_keys=True)
        dcpl = _dcpl()
        try:
            with h5py.File(tmp, "w") as f:
                for key, value in attrs.items():
                    f.attrs[key] = value
                for name, (rows, cols) in MATRICES.items():
                    n_r, n_c = meta.size(rows), meta.size(cols)
                    f.create_dataset(name, shape=(n_r, n_c), dtype=meta.dtype, dcpl=dcpl, track_times=False)
                    grid = (_n_blocks(n_r, tile_size), _n_blocks(n_c, tile_size))
                    f.create_dataset(f"done_{name}", shape=grid, dtype="u1", dcpl=dcpl, track_times=False)
                    f.create_dataset(f"seconds_{name}", shape=grid, dtype="f8", dcpl=dcpl, track_times=False)
                    f.create_dataset(f"crc_{name}", shape=grid, dtype="u4", dcpl=dcpl, track_times=False)
                for name, part in DIAGONALS.items():
                    n = meta.size(part)
                    f.create_dataset(name, shape=(n,), dtype=meta.dtype, dcpl=dcpl, track_times=False)
                    grid = (_n_blocks(n, tile_size),)
                    f.create_dataset(f"done_{name}", shape=grid, dtype="u1", dcpl=dcpl, track_times=False)
                    f.create_dataset(f"seconds_{name}", shape=grid, dtype="f8", dcpl=dcpl, track_times=False)
                    f.create_dataset(f"crc_{name}", shape=grid, dtype="u4", dcpl=dcpl, track_times=False)
                for name in (*MATRICES, *DIAGONALS):
                    done = f[f"done_{name}"]
                    if done.size:
                        done[...] = 0  # explicit zeros: the completion record never relies on fill values
                        f[f"seconds_{name}"][...] = 0.0
                        f[f"crc_{name}"][...] = 0
                for part in PARTS:
                    f.create_dataset(
                        f"y_{part}", data=np.asarray(labels[part], dtype=np.int64), dcpl=dcpl, track_times=False
                    )
            fd = os.open(tmp, os.O_RDWR)
            try:
                _reserve(fd, path)  # every block the store will ever write is on disk now
                os.fsync(fd)
            finally:
                os.close(fd)
            # a hard link, unlike a rename, refuses an existing name: of two processes creating the same
            # store at once exactly one wins, and the other never replaces the file the winner has open
            try:
                os.link(tmp, path)
                tmp.unlink()
            except FileExistsError:
                raise StoreExists(
                    f"{path} was created by another process while this one was creating it; only one run may "
                    "write a store"
                ) from None
            except OSError:  # a file system without hard links: check, then rename (a small race remains)
                if path.exists():
                    raise StoreExists(f"{path} was created by another process while this one was creating it") from None
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return cls(path, "r+")

    @classmethod
    def open(cls, path: str | os.PathLike[str], expected: StoreMeta | None = None, mode: str = "r") -> KernelStore:
        """Open an existing store; with ``expected``, refuse it (:class:`StoreMismatch`) unless made for that run."""
        store = cls(path, mode)
        if expected is not None:
            try:
                store.check(expected)
            except BaseException:
                store.close()
                raise
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike[str],
        meta: StoreMeta,
        labels: Mapping[str, np.ndarray],
        tile_size: int,
        *,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> KernelStore:
        """Resume the store at ``path`` if there is one made for ``meta`` (else refuse), or create it.

        A resumed store keeps the tile size recorded in it (see :attr:`tile_size`), whatever ``tile_size`` says.
        """
        if Path(path).exists():
            return cls.open(path, meta, mode="r+")
        return cls.create(path, meta, labels, tile_size, extra_attrs=extra_attrs)

    def _check_layout(self) -> None:
        f = self._file
        if f.attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path} is an HDF5 file but not a gpytorch_cnngp kernel store")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path} has store format version {version}; this version reads {FORMAT_VERSION}")
        meta, tile = self.meta, self.tile_size
        expected: dict[str, tuple[int, ...]] = {}
        for name, (rows, cols) in MATRICES.items():
            expected[name] = (meta.size(rows), meta.size(cols))
            expected[f"done_{name}"] = (_n_blocks(meta.size(rows), tile), _n_blocks(meta.size(cols), tile))
        for name, part in DIAGONALS.items():
            expected[name] = (meta.size(part),)
            expected[f"done_{name}"] = (_n_blocks(meta.size(part), tile),)
        for part in PARTS:
            expected[f"y_{part}"] = (meta.size(part),)
        for name in (*MATRICES, *DIAGONALS):
            if f"crc_{name}" in f:  # optional: older stores have no checksums
                expected[f"crc_{name}"] = expected[f"done_{name}"]
        size = os.path.getsize(self.path)
        for name, shape in expected.items():
            if name not in f:
                raise StoreError(f"{self.path} is damaged: dataset {name!r} is missing")
            ds = f[name]
            if ds.shape != shape:
                raise StoreError(f"{self.path} is damaged: dataset {name!r} has shape {ds.shape}, expected {shape}")
            want = np.dtype(_DATASET_DTYPES.get(name.split("_")[0], meta.dtype))
            offset = ds.id.get_offset()
            if ds.dtype != want or (ds.size and (offset is None or offset + ds.id.get_storage_size() > size)):
                where = "lies outside the file" if ds.dtype == want else f"has dtype {ds.dtype}, expected {want}"
                raise self._unreadable(RuntimeError(f"dataset {name!r} {where}"))

    def check(self, expected: StoreMeta) -> None:
        """Raise :class:`StoreMismatch` listing every field in which this store differs from ``expected``."""
        stored, wanted = self.meta.items(), expected.items()
        differences: list[tuple[str, Any, Any]] = []
        for key in stored:
            if key in ("hyperparameters", "checksums"):
                a, b = stored[key], wanted[key]
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        differences.append((f"{key}.{sub}", a.get(sub), b.get(sub)))
            elif stored[key] != wanted[key]:
                differences.append((key, stored[key], wanted[key]))
        if differences:
            raise StoreMismatch(self.path, differences)

    # ---- properties

    @property
    @_guarded
    def attrs(self) -> dict[str, Any]:
        """All recorded attributes as plain Python values."""
        return {key: _jsonable(value) for key, value in self._file.attrs.items()}

    @property
    def meta(self) -> StoreMeta:
        """What the store was made for."""
        try:
            a = self._file.attrs
            return StoreMeta(
                architecture=str(_jsonable(a["architecture"])),
                hyperparameters=json.loads(_jsonable(a["hyperparameters"])),
                dtype=str(_jsonable(a["dtype"])),
                dataset=str(_jsonable(a["dataset"])),
                split=str(_jsonable(a["split"])),
                n_train=int(a["n_train"]),
                n_val=int(a["n_val"]),
                n_test=int(a["n_test"]),
                checksums=json.loads(_jsonable(a["checksums"])),
            )
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            # damaged attributes read as garbage: undecodable text, bad JSON, impossible sizes
            raise self._unreadable(exc, "the record of what it was made for") from exc

    @property
    def tile_size(self) -> int:
        """Edge of the blocks of this store (fixed when it was created)."""
        try:
            tile = int(self._file.attrs["tile_size"])
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            raise self._unreadable(exc, "its tile size") from exc
        if tile < 1:
            raise self._unreadable(ValueError(f"tile size {tile}"), "its tile size")
        return tile

    @property
    def has_checksums(self) -> bool:
        """Whether the store records a checksum per committed tile (stores made by older versions do not)."""
        return self._has_crc

    # ---- blocks

    def block(self, name: str, index: tuple[int, ...]) -> Block:
        """The block of dataset ``name`` at ``index`` in its completion record."""
        return _block(name, index, self.meta, self.tile_size)

    def blocks(self, name: str | None = None) -> Iterator[Block]:
        """Every block of dataset ``name`` (of all datasets, diagonals first, when ``None``).

        ``Kxx`` has only the blocks on and above the diagonal: the rest is their transpose (see :meth:`read_into`).
        """
        names = (*DIAGONALS, *MATRICES) if name is None else (name,)
        meta, t = self.meta, self.tile_size
        for nm in names:
            if nm in DIAGONALS:
                for bi in range(_n_blocks(meta.size(DIAGONALS[nm]), t)):
                    yield _block(nm, (bi,), meta, t)
            elif nm in MATRICES:
                rp, cp = MATRICES[nm]
                for bi in range(_n_blocks(meta.size(rp), t)):
                    for bj in range(bi if nm == "Kxx" else 0, _n_blocks(meta.size(cp), t)):
                        yield _block(nm, (bi, bj), meta, t)
            else:
                raise ValueError(f"unknown dataset {nm!r}; expected one of {', '.join((*MATRICES, *DIAGONALS))}")

    @_guarded
    def done_mask(self, name: str) -> np.ndarray:
        """The completion record of dataset ``name`` as a boolean array (block grid)."""
        return self._done[name][...].astype(bool)

    @_guarded
    def is_done(self, block: Block) -> bool:
        """Whether ``block`` is committed."""
        return bool(self._done[block.name][block.index])

    @_guarded
    def pending(self, name: str | None = None) -> list[Block]:
        """The blocks not committed yet (of ``name``, or of every dataset), in computing order."""
        masks = {nm: self.done_mask(nm) for nm in (*DIAGONALS, *MATRICES)}
        return [b for b in self.blocks(name) if not masks[b.name][b.index]]

    @_guarded
    def entries(self) -> tuple[int, int]:
        """``(committed, total)`` kernel entries to compute (off-diagonal ``Kxx`` blocks count once)."""
        masks = {nm: self.done_mask(nm) for nm in (*DIAGONALS, *MATRICES)}
        done = total = 0
        for b in self.blocks():
            total += b.entries
            done += b.entries if masks[b.name][b.index] else 0
        return done, total

    def is_complete(self) -> bool:
        """Whether every block of every dataset is committed."""
        return not self.pending()

    @_guarded
    def seconds(self, name: str) -> np.ndarray:
        """Compute seconds recorded per block of dataset ``name`` (block grid; 0 where not done)."""
        return self._file[f"seconds_{name}"][...]

    @_guarded
    def block_seconds(self) -> float:
        """Total compute seconds recorded for the committed blocks (summed over workers and resumed runs)."""
        return float(sum(float(self._file[f"seconds_{nm}"][...].sum()) for nm in (*DIAGONALS, *MATRICES)))

    # ---- writing

    def check_still_there(self) -> None:
        """Refuse to write when the file at ``path`` is no longer the one this store has open.

        Writes to a deleted (or replaced) file succeed silently, into an inode nobody will ever read again.
        """
        try:
            st = os.stat(self.path)
            here = (st.st_dev, st.st_ino)
        except OSError:
            here = None
        if self._identity is not None and here != self._identity:
            what = "deleted" if here is None else "replaced by another file"
            raise StoreError(
                f"{self.path} was {what} while this run was writing to it; nothing more is written. "
                "Run the same command again to start a new store"
            )
        if self._stamp is not None and self._file_stamp() != self._stamp:
            # the same file, written by someone else since this run's last write (e.g. another store copied over
            # it): this run's view of its layout is stale, and writing on would damage what is there now
            self._disarm("it was changed by another program")
            raise StoreError(
                f"{self.path} was changed by another program while this run was writing to it (another file copied "
                "over it?); nothing more is written. Run the same command again: it checks the store before resuming"
            )
        if self._failed is not None:
            raise StoreError(f"{self.path} cannot be written ({self._failed}); nothing more is written")

    def _disarm(self, why: str) -> None:
        """Write nothing more to the file, HDF5's close included.

        On closing, HDF5 writes its superblock and may truncate the file to the size it knows: over another file
        copied onto this one, that would damage the copy. Its file descriptor is pointed at ``/dev/null``, read
        only, so those writes fail (and :meth:`close` does not report them).
        """
        self._failed = why
        if self._fd is not None:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDONLY)
                try:
                    os.dup2(null, self._fd)
                finally:
                    os.close(null)
            self._fd = None

    def _sync(self) -> None:
        self._file.flush()
        if self._fd is not None:
            os.fsync(self._fd)
        self._stamp = self._file_stamp()

    def _write_failed(self, what: str, exc: BaseException) -> StoreError:
        """Record that the file cannot be written (no later write is tried) and say so in one line."""
        self._failed = _reason(exc)
        return StoreError(
            f"writing {what} to {self.path} failed: {self._failed}. The tiles committed before it are kept; "
            "once the disk is writable again, run the same command to resume"
        )

    def write_block(self, block: Block, values: np.ndarray, seconds: float = 0.0) -> None:
        """Commit one computed block: check it, write it and its checksum, flush, then mark it done and flush.

        :raises NonFiniteTileError: when ``values`` holds NaN or inf (nothing is written).
        :raises ValueError: when ``values`` does not have the block's shape.
        :raises StoreError: when the file cannot be written (the block stays pending).
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only")
        self.check_still_there()
        values = np.asarray(values)
        if values.shape != block.shape:
            raise ValueError(f"values for {block.describe()} have shape {values.shape}, expected {block.shape}")
        finite = np.isfinite(values)
        if not finite.all():
            raise NonFiniteTileError(block, int(values.size - finite.sum()), int(values.size))
        values = values.astype(self.meta.dtype, copy=False)
        ds = self._file[block.name]
        r0, r1 = block.rows
        try:
            if block.cols is None:
                ds[r0:r1] = values
            else:
                c0, c1 = block.cols
                ds[r0:r1, c0:c1] = values
            self._file[f"seconds_{block.name}"][block.index] = float(seconds)
            if self.has_checksums:
                self._file[f"crc_{block.name}"][block.index] = _crc(values)
            self._sync()  # the data and its checksum are in the file before the block is marked done
            self._done[block.name][block.index] = 1
            self._sync()
        except (OSError, RuntimeError) as exc:  # h5py raises either when HDF5's write or flush fails
            raise self._write_failed(block.describe(), exc) from exc

    @_guarded
    def mark_for_recompute(self, blocks: Iterable[Block]) -> None:
        """Turn committed ``blocks`` back into pending ones (e.g. the damaged blocks :meth:`verify` found)."""
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only")
        self.check_still_there()
        try:
            for block in blocks:
                self._done[block.name][block.index] = 0
            self._sync()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed("the completion records", exc) from exc

    # ---- checking

    @_guarded
    def verify(self, names: Iterable[str] | None = None, *, progress: bool = False) -> list[tuple[Block, str]]:
        """Read every committed block of ``names`` (default: all) and return the damaged ones with the reason.

        A block is damaged when its values hold NaN or inf, or (in stores with checksums) when their CRC-32 differs
        from the one recorded when it was committed. Pending blocks are not read (nor the part of ``Kxx`` below
        its diagonal tiles, which is never read). Matrices are read in bands of one tile's height, so memory
        stays at one band.
        """
        names = (*DIAGONALS, *MATRICES) if names is None else tuple(names)
        for name in names:
            if name not in self._done:
                raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(self._done)}")
        meta, t, checksums = self.meta, self.tile_size, self.has_checksums
        damaged: list[tuple[Block, str]] = []
        masks = {name: self.done_mask(name) for name in names}
        total = sum(int(self._file[name].size) * self._file[name].dtype.itemsize for name in names)
        bar = progress_bar(progress, total, "checking tiles", "B")

        def check(name: str, index: tuple[int, ...], values: np.ndarray, crc: np.ndarray | None) -> None:
            n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if n_bad:
                why = f"{n_bad} NaN or infinite value(s)"
            elif crc is not None and _crc(values) != int(crc[index]):
                why = "checksum mismatch"
            else:
                return
            damaged.append((_block(name, index, meta, t), why))

        try:
            for name in names:
                ds, done = self._file[name], masks[name]
                crc = self._file[f"crc_{name}"][...] if checksums else None
                if name in DIAGONALS:
                    values = ds[...]
                    for bi in np.flatnonzero(done):
                        check(name, (int(bi),), values[bi * t : (bi + 1) * t], crc)
                    if bar is not None:
                        bar.update(values.nbytes)
                    continue
                n_r, n_c = ds.shape
                band = np.empty(min(t, n_r) * n_c, dtype=ds.dtype)
                for bi in range(done.shape[0]):
                    r0, r1 = bi * t, min(n_r, (bi + 1) * t)
                    first = bi if name == "Kxx" else 0  # Kxx stores only the tiles on and above the diagonal
                    if done[bi, first:].any():
                        rows = band[: (r1 - r0) * (n_c - first * t)].reshape(r1 - r0, n_c - first * t)
                        ds.read_direct(rows, np.s_[r0:r1, first * t :])
                        for bj in np.flatnonzero(done[bi, first:]) + first:
                            check(name, (bi, int(bj)), rows[:, (bj - first) * t : (bj - first + 1) * t], crc)
                    if bar is not None:
                        bar.update((r1 - r0) * n_c * ds.dtype.itemsize)
        finally:
            if bar is not None:
                bar.close()
        return damaged

    def require_intact(self, names: Iterable[str] | None = None, *, progress: bool = False) -> None:
        """Raise :class:`DamagedStore` naming the damaged blocks when :meth:`verify` finds any."""
        damaged = self.verify(names, progress=progress)
        if damaged:
            raise DamagedStore(self.path, damaged)

    # ---- reading

    @_guarded
    def read(self, name: str, *, require_complete: bool = True) -> np.ndarray:
        """The whole dataset ``name`` (a matrix, diagonal or ``y_<part>``, see :meth:`labels`) as a NumPy array.

        :raises StoreIncomplete: when a kernel dataset still has blocks to compute (unless ``require_complete``
            is false, in which case those blocks read as zeros).
        """
        if name not in self._file:
            raise KeyError(f"{self.path} has no dataset {name!r}")
        if name.startswith("y_") and name[2:] in PARTS:
            return self.labels(name[2:])  # checked against their checksums
        if require_complete:
            self.require_complete(name)
        values = self._file[name][...]
        if name == "Kxx":
            t = self.tile_size
            for r0 in range(t, values.shape[0], t):  # below the diagonal tiles: the transpose of the tiles above
                values[r0 : r0 + t, :r0] = values[:r0, r0 : r0 + t].T
        return values

    @_guarded
    def require_complete(self, name: str) -> None:
        """Raise :class:`StoreIncomplete` when kernel dataset ``name`` still has blocks to compute."""
        if name not in self._done:
            return
        mask = self.done_mask(name)
        if name == "Kxx":
            mask = np.triu(mask) | np.triu(mask).T  # the blocks on and above the diagonal stand for those below
        if not mask.all():
            missing = int((~mask).sum())
            raise StoreIncomplete(
                f"{self.path}: {name} still has {missing} of {mask.size} blocks to compute; "
                "run `cnngp kernels` again with the same arguments to finish it"
            )

    @_guarded
    def read_into(self, name: str, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
        """Copy ``name[r0:r1, c0:c1]`` into ``out`` (any float dtype, converted), without a temporary of its size.

        ``Kxx`` is assembled from its tiles on and above the diagonal (the part below is never read).

        Completeness is not checked here (see :meth:`require_complete`): this is the classifier's bounded read.
        """
        (r0, r1), (c0, c1) = rows, cols
        dset = self._file[name]
        if out.shape != (r1 - r0, c1 - c0):
            raise ValueError(
                f"out has shape {out.shape}, the block {name}[{r0}:{r1}, {c0}:{c1}] is {(r1 - r0, c1 - c0)}"
            )
        if out.size == 0:
            return
        if name != "Kxx":
            _read_region(dset, (r0, r1), (c0, c1), out)
            return
        # Kxx holds entry (r, c) where r's tile is at most c's (on and above the diagonal tiles); the entries below
        # are read from their transposed place. From column t * (tile of the last row) on, every row is stored.
        t = self.tile_size
        split = min(c1, max(c0, (r1 - 1) // t * t))
        if split < c1:
            _read_region(dset, (r0, r1), (split, c1), out[:, split - c0 :])
        a = c0
        while a < split:  # column tile bands left of the split: rows above e direct, rows below transposed
            e = (a // t + 1) * t
            b = min(split, e)
            if r0 < e:
                _read_region(dset, (r0, min(r1, e)), (a, b), out[: min(r1, e) - r0, a - c0 : b - c0])
            if r1 > e:
                out[max(r0, e) - r0 :, a - c0 : b - c0] = dset[a:b, max(r0, e) : r1].T
            a = b

    @_guarded
    def labels(self, part: str) -> np.ndarray:
        """The labels of ``part`` (``"train"``, ``"val"`` or ``"test"``), checked against their recorded checksums.

        :raises DamagedLabels: when they no longer match them.
        """
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
        y = self._file[f"y_{part}"][...]
        why = self._label_problem(part, y)
        if why is not None:
            raise DamagedLabels(self.path, [(part, why)])
        return y

    def _label_problem(self, part: str, y: np.ndarray) -> str | None:
        """Why labels ``y`` of ``part`` are not the ones recorded when the store was made (``None``: they are)."""
        try:
            crc = self._file.attrs.get(f"crc_y_{part}")
            crc = None if crc is None else int(crc)
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            raise self._unreadable(exc, "the record of its labels' checksums") from exc
        if crc is not None and _label_crc(y) != crc:
            return "checksum mismatch"
        sha = self.meta.checksums.get(f"{part}_labels")
        if sha is not None and data_checksum(np.ascontiguousarray(y, dtype=np.int64)) != sha:
            return "SHA-256 mismatch"
        return None

    @_guarded
    def verify_labels(self) -> list[tuple[str, str]]:
        """``(part, reason)`` for every part whose stored labels no longer match their recorded checksums.

        Labels are checked against the CRC-32 recorded in the store and against the SHA-256 of the data set's
        labels in :attr:`meta` ``.checksums`` (``<part>_labels``), whichever the store has.
        """
        damaged = []
        for part in PARTS:
            why = self._label_problem(part, self._file[f"y_{part}"][...])
            if why is not None:
                damaged.append((part, why))
        return damaged

    @_guarded
    def rewrite_labels(self, labels: Mapping[str, np.ndarray], parts: Iterable[str]) -> None:
        """Write the labels of ``parts`` again (from the data set: labels cannot be recomputed from kernels).

        Each must match the checksums recorded when the store was made, so only the original labels are accepted.

        :raises StoreError: when given labels do not match them, or the store has no checksum to check them by.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only")
        self.check_still_there()
        parts = list(parts)
        for part in parts:
            y = np.asarray(labels[part], dtype=np.int64)
            if y.shape != (self.meta.size(part),):
                raise ValueError(f"labels[{part!r}] has shape {y.shape}, expected ({self.meta.size(part)},)")
            if self._file.attrs.get(f"crc_y_{part}") is None and f"{part}_labels" not in self.meta.checksums:
                raise StoreError(f"{self.path} records no checksum of its {part} labels: they cannot be checked")
            why = self._label_problem(part, y)
            if why is not None:
                raise StoreError(
                    f"the {part} labels given do not match the checksums {self.path} recorded when it was made "
                    f"({why}): they are not the labels it was computed for; nothing was written"
                )
        try:
            for part in parts:
                self._file[f"y_{part}"][...] = np.asarray(labels[part], dtype=np.int64)
            self._sync()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed("the labels", exc) from exc

    # ---- closing

    def close(self) -> None:
        """Close the file (flushing it); idempotent.

        After a failed write, HDF5 cannot close the file cleanly either (it writes its superblock, unchanged, on
        closing): that second failure is not reported again, and the file on disk keeps its committed tiles.
        """
        if not self._file.id.valid:
            return
        try:
            self._file.close()
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(Exception):
                self._file.id.close()
            if self._failed is None:
                self._failed = _reason(exc)
                raise StoreError(
                    f"closing {self.path} failed: {self._failed}. The tiles committed before are kept; once the disk "
                    "is writable again, run the same command to resume"
                ) from exc

    def __enter__(self) -> KernelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._file.id.valid else "closed"
        return f"KernelStore({str(self.path)!r}, mode={self.mode!r}, {state})"
