"""MNIST-shaped IDX files for tests that run the pipeline offline: the files, their patched MD5 sums, no network."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from gpytorch_cnngp import datasets as ds


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def disable_sources(monkeypatch) -> None:
    """No network: every configured source fails."""

    def fail(names, scratch, progress):
        raise OSError("network disabled in tests")

    for name in ds.DATASETS:
        monkeypatch.setitem(ds.SOURCES, name, [ds.Source("offline", fail)])


def write_mnist(root: Path, monkeypatch, train_x, train_y, test_x, test_y) -> Path:
    """The four gzipped MNIST files under ``root / "mnist"``, with MD5 sums patched to match; returns ``root``."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    md5 = {}
    for name, array in (
        (ds.TRAIN_IMAGES, train_x),
        (ds.TRAIN_LABELS, train_y),
        (ds.TEST_IMAGES, test_x),
        (ds.TEST_LABELS, test_y),
    ):
        raw = idx_bytes(array)
        md5[name] = hashlib.md5(raw).hexdigest()
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
    monkeypatch.setitem(ds.MD5, "mnist", md5)
    return root
