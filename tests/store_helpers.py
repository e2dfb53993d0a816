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


def synthetic_kernels(sizes: dict[str, int], seed: int = 0, rank: int | None = None, scale: float = 1.0):
    """A positive (semi-)definite kernel ``F F^T / d`` of random features, split into Kxx, Kvx, Ktx and diagonals.

    ``rank`` (default ``n_train + 20``) below ``n_train`` gives a singular Kxx. Values are float32-exact float64s.
    """
    n, nv, nt = sizes["n_train"], sizes["n_val"], sizes["n_test"]
    d = rank if rank is not None else n + 20
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n + nv + nt, d)) + 0.3  # a common component, as image kernels have
    K = (scale * (F @ F.T) / d).astype(np.float32).astype(np.float64)
    K = (K + K.T) / 2  # exactly symmetric after rounding (float32 products are symmetric already)
    return split_kernel(K, sizes)


def split_kernel(K: np.ndarray, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """A kernel of the training, validation and test images (in that order) as a store's float32 parts."""
    n, nv = sizes["n_train"], sizes["n_val"]
    parts = {
        "Kxx": K[:n, :n],
        "Kvx": K[n : n + nv, :n],
        "Ktx": K[n + nv :, :n],
        "Kvv_diag": np.diagonal(K)[n : n + nv].copy(),
        "Ktt_diag": np.diagonal(K)[n + nv :].copy(),
    }
    return {k: v.astype(np.float32) for k, v in parts.items()}


def write_kernels(path: str | Path, kernels: dict, labels: dict, sizes: dict[str, int], tile: int, **hyper) -> None:
    """A complete store (architecture ``synthetic``) holding ``kernels`` as :func:`split_kernel` gives them."""
    from gpytorch_cnngp.store import KernelStore

    meta = StoreMeta(
        architecture="synthetic",
        hyperparameters=hyper,
        dtype="float32",
        dataset="synthetic",
        split="random",
        checksums={},
        **sizes,
    )
    with KernelStore.create(path, meta, labels, tile) as store:
        for block in store.pending():
            rows = slice(*block.rows)
            if block.cols is None:
                store.write_block(block, kernels[block.name][rows])
            else:
                store.write_block(block, kernels[block.name][rows, slice(*block.cols)])


def write_synthetic_store(path: str | Path, sizes: dict[str, int], tile: int = 512, seed: int = 0, **kw):
    """A complete store of :func:`synthetic_kernels` with random labels; returns (kernels, labels)."""
    kernels = synthetic_kernels(sizes, seed, **kw)
    rng = np.random.default_rng(seed + 1)
    labels = {p: rng.integers(0, 10, sizes[f"n_{p}"]) for p in ("train", "val", "test")}
    write_kernels(path, kernels, labels, sizes, tile, seed=seed, **kw)
    return kernels, labels
