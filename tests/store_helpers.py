"""A tiny kernel-store problem shared by the store, distributed, classifier and kill tests (fast on 2 CPU cores)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from gpytorch_cnngp.distributed import ArchitectureSpec
from gpytorch_cnngp.store import StoreMeta

TINY_ARCH = {"image_size": 8, "depth": 2, "kernel_size": 3}
TINY_SIZES = {"n_train": 16, "n_val": 6, "n_test": 5}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (much faster than two on a shared 2-core machine; same bits as worker processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_problem(seed: int = 0, dtype: str = "float32", sizes: dict[str, int] | None = None, **arch):
    """(spec, meta, labels, images) of a small ConvNet GP on random 8x8 images."""
    sizes = dict(TINY_SIZES if sizes is None else sizes)
    spec = ArchitectureSpec.from_name("convnet_gp", **{**TINY_ARCH, **arch})
    rng = np.random.default_rng(seed)
    images = {p: rng.random((sizes[f"n_{p}"], 1, 8, 8)).astype(dtype) for p in ("train", "val", "test")}
    labels = {p: rng.integers(0, 10, sizes[f"n_{p}"]) for p in ("train", "val", "test")}
    checksums = {f"{p}_images": f"sha-{seed}-{p}" for p in images}
    meta = StoreMeta(
        architecture=spec.name,
        hyperparameters=spec.kwargs,
        dtype=dtype,
        dataset="synthetic",
        split="tiny",
        checksums=checksums,
        **sizes,
    )
    return spec, meta, labels, images


def store_contents(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every dataset (except the timings ``seconds_*``) and every attribute (except ``created_at``) of a store."""
    data, attrs = {}, {}
    with h5py.File(path, "r") as f:
        for name in f:
            if not name.startswith("seconds_"):
                data[name] = f[name][...]
        attrs = {k: v for k, v in f.attrs.items() if k != "created_at"}
    return data, attrs


def assert_same_store(a: str | Path, b: str | Path) -> None:
    """Bit-for-bit equality of the data, completion records and attributes of two stores."""
    da, aa = store_contents(a)
    db, ab = store_contents(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        assert da[name].shape == db[name].shape, name
        assert da[name].tobytes() == db[name].tobytes(), f"dataset {name} differs"
    assert aa.keys() == ab.keys()
    for key in aa:
        assert np.array_equal(aa[key], ab[key]), f"attribute {key} differs: {aa[key]!r} vs {ab[key]!r}"
