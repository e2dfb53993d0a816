"""The data folder: where it is, reading and verifying the files present, filling in the missing ones.

Missing files are obtained from the sources of :data:`.sources.SOURCES`, in order, verified, and written
atomically; :func:`fetch` does this for one data set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import settings
from .catalog import _DISPLAY_NAMES, FILES, MD5, _canonical
from .errors import ChecksumError, DatasetUnavailable
from .idx import _decompress, _find_file, _verify
from .sources import SOURCES, _describe

__all__ = ["ENV_VAR", "dataset_dir", "default_cache_dir", "fetch", "resolve_data_dir"]

log = logging.getLogger(__name__)

ENV_VAR = "CNNGP_DATA"
"""Environment variable naming the data folder when no ``data_dir`` is given."""

# --------------------------------------------------------------------------------------------------------------
# Data folder
# --------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/gpytorch_cnngp``, else ``~/.cache/gpytorch_cnngp``.

    :return: the folder (not created).
    """
    return settings.data_dir.default()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder holding one subfolder per data set.

    Resolution order: the ``data_dir`` argument, else ``$CNNGP_DATA`` (when set and non-empty), else
    :func:`default_cache_dir`.

    :param data_dir: an explicit data folder, or ``None``.
    :return: the folder (``~`` expanded; not created).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return settings.data_dir.value()


def dataset_dir(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of one data set's IDX files: ``resolve_data_dir(data_dir) / dataset``.

    :param dataset: ``"mnist"`` or ``"fashion_mnist"``.
    :param data_dir: the data folder, or ``None`` for the default resolution.
    :return: the folder (not created).
    """
    return resolve_data_dir(data_dir) / _canonical(dataset)


# --------------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and :func:`os.replace`.

    The temporary file is created with :func:`open` (mode ``"xb"``) rather than :func:`tempfile.mkstemp`, so the
    final file gets the usual permissions of the user's umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_present(dataset: str, folder: Path, download: bool) -> tuple[dict[str, bytes], list[str]]:
    """Read and verify the files already in ``folder``.

    :return: the verified decompressed bytes by file name, and the names still to obtain. With ``download``
        a corrupted file is renamed to ``<file>.corrupt`` (kept for inspection) and counted as missing;
        without, it raises :class:`ChecksumError`.
    """
    verified: dict[str, bytes] = {}
    missing: list[str] = []
    for name in FILES:
        path = _find_file(folder, name)
        if path is None:
            missing.append(name)
            continue
        try:
            data = _decompress(path.name, path.read_bytes())
            _verify(dataset, name, data, str(path))
        except ChecksumError as exc:
            if not download:
                raise ChecksumError(
                    f"{exc}. Delete or replace {path}, or call with download=True to fetch a fresh copy."
                ) from exc
            quarantine = path.with_name(path.name + ".corrupt")
            log.warning("%s; moving it to %s and fetching a fresh copy", exc, quarantine)
            os.replace(path, quarantine)
            missing.append(name)
            continue
        verified[name] = data
    return verified, missing


# --------------------------------------------------------------------------------------------------------------
# Obtaining missing files
# --------------------------------------------------------------------------------------------------------------


def _manual_hint(dataset: str, folder: Path) -> str:
    lines = [
        f"You can place the files by hand in {folder} (raw or gzipped, e.g. {FILES[0]}.gz); "
        "the MD5s of the decompressed files must be:"
    ]
    lines += [f"    {name}  {md5}" for name, md5 in MD5[dataset].items()]
    lines.append(f"or choose another folder with data_dir=... or ${ENV_VAR}.")
    return "\n".join(lines)


def _obtain(dataset: str, folder: Path, missing: Sequence[str], progress: bool) -> dict[str, bytes]:
    """Try :data:`SOURCES` in order until every file of ``missing`` is written (verified) in ``folder``.

    :return: the decompressed bytes of the files obtained, by name.
    :raises DatasetUnavailable: listing every source tried and why it failed, when some files stay missing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remaining = list(missing)
    obtained: dict[str, bytes] = {}
    failures: list[tuple[str, str]] = []
    display = _DISPLAY_NAMES[dataset]
    for source in SOURCES[dataset]:
        if not remaining:
            break
        log.info("%s: fetching %s from %s", display, ", ".join(remaining), source.name)
        started = time.monotonic()
        wanted = tuple(remaining)
        problems: list[str] = []
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as scratch:
            items: Iterator[tuple[str, bytes]] | None = None
            try:
                items = iter(source.fetch(wanted, Path(scratch), progress))
                for stored_name, payload in items:
                    name = stored_name.removesuffix(".gz")
                    if name not in remaining:
                        continue
                    try:
                        data = _decompress(stored_name, payload)
                        _verify(dataset, name, data, source.name)
                    except ChecksumError as exc:
                        problems.append(str(exc))
                        continue
                    _atomic_write(folder / stored_name, payload)
                    other = folder / (name if stored_name.endswith(".gz") else f"{name}.gz")
                    with contextlib.suppress(FileNotFoundError):
                        other.unlink()  # never leave a stale copy in the other format beside the new one
                    obtained[name] = data
                    remaining.remove(name)
            except Exception as exc:  # every failure is recorded and the next source tried
                problems.append(_describe(exc))
            finally:
                close = getattr(items, "close", None)  # finish a generator before its scratch folder goes
                if close is not None:
                    close()
        not_given = [n for n in wanted if n in remaining]
        served = [n for n in wanted if n not in remaining]
        elapsed = time.monotonic() - started
        if not_given:
            if not problems:
                problems.append(f"did not provide {', '.join(not_given)}")
            failures.append((source.name, "; ".join(problems)))
            gave = f" (it served {', '.join(served)})" if served else ""
            log.warning("%s: %s failed after %.1f s%s: %s", display, source.name, elapsed, gave, failures[-1][1])
        else:
            if problems:
                log.warning("%s: %s: %s", display, source.name, "; ".join(problems))
            # After a logged failure the source that served the files is told at the same level, so that a log
            # showing warnings does not end on failed mirrors without saying where the data came from.
            level = logging.WARNING if failures or problems else logging.INFO
            log.log(level, "%s: got %s from %s in %.1f s", display, ", ".join(served), source.name, elapsed)
    if remaining:
        tried = "\n".join(f"  - {name}: {reason}" for name, reason in failures) or "  (no sources configured)"
        raise DatasetUnavailable(
            f"could not obtain {display} file(s) {', '.join(remaining)}. Sources tried:\n{tried}\n"
            + _manual_hint(dataset, folder),
            dataset=dataset,
            folder=folder,
            missing=remaining,
            failures=failures,
        )
    return obtained


def _ensure(
    dataset: str, data_dir: str | os.PathLike[str] | None, download: bool, progress: bool
) -> tuple[Path, dict[str, bytes]]:
    """Make sure the four verified files are in the data set's folder; return it and their decompressed bytes."""
    dataset = _canonical(dataset)
    folder = dataset_dir(dataset, data_dir)
    verified, missing = _read_present(dataset, folder, download)
    if missing:
        if not download:
            raise DatasetUnavailable(
                f"{_DISPLAY_NAMES[dataset]} file(s) {', '.join(missing)} missing from {folder} and download=False.\n"
                + _manual_hint(dataset, folder),
                dataset=dataset,
                folder=folder,
                missing=missing,
                failures=[],
            )
        verified.update(_obtain(dataset, folder, missing, progress))
    return folder, verified


def fetch(dataset: str, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """Make sure a data set's four IDX files are present and verified, downloading the missing ones.

    Files already present are checked against :data:`MD5`; a corrupted one is renamed to ``<file>.corrupt``
    and fetched again. Missing files are obtained from the sources of :data:`SOURCES`, in order.

    :param dataset: ``"mnist"`` or ``"fashion_mnist"`` (``"fashion-mnist"`` is accepted too).
    :param data_dir: the data folder (see :func:`resolve_data_dir`); the files go in its ``dataset`` subfolder.
    :param progress: show tqdm progress bars for downloads (when tqdm is installed).
    :return: the data set's folder.
    :raises DatasetUnavailable: when some file could be obtained from no source; the message lists every
        source tried with its failure, and how to place the files by hand.
    """
    folder, _ = _ensure(dataset, data_dir, download=True, progress=progress)
    return folder
