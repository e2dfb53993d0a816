"""Loading a data set (official train then official test images) and the named train/validation/test splits."""

from __future__ import annotations

import os

import numpy as np
import torch

from .cache import _ensure
from .catalog import FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from .errors import DatasetError
from .idx import parse_idx

__all__ = ["SPLITS", "load_dataset", "load_fashion_mnist", "load_mnist", "load_split", "split_indices"]

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
