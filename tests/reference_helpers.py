"""Test helpers around the independent reference (tests/reference_impl.py).

:func:`describe` turns a gpytorch_cnngp layer tree into the reference's plain-data description by
reading public attributes only; the reference's math never sees a library object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpytorch_cnngp import Conv2d, ReLU, Sequential, Sum

DATA = Path(__file__).parent / "data" / "mnist_sample.npz"


def describe(layer):
    """The reference description (nested tuples/dicts) of a gpytorch_cnngp layer tree."""
    if isinstance(layer, Sequential):
        return ("seq", [describe(sub) for sub in layer.layers])
    if isinstance(layer, Sum):
        return ("sum", [describe(branch) for branch in layer.branches])
    if isinstance(layer, ReLU):
        return ("relu",)
    if isinstance(layer, Conv2d):
        return (
            "conv",
            {
                "k": layer.kernel_size,
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "vw": float(layer.var_weight),
                "vb": float(layer.var_bias),
            },
        )
    raise TypeError(f"no reference description for {type(layer).__name__}")


def mnist_digits(n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_train`` training and ``n_test`` test digits, float64 [N, 1, 28, 28] in [0, 1]."""
    with np.load(DATA) as data:
        x = data["train_images"][:n_train].astype(np.float64) / 255.0
        z = data["test_images"][:n_test].astype(np.float64) / 255.0
    return x[:, None], z[:, None]


def max_rel_err(got, want) -> float:
    """``max |got - want| / max |want|``: the error relative to the largest entry of the reference."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def entry_rel_err(got, want) -> float:
    """``max_ij |got - want| / |want|``: the worst entrywise relative error."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want) / np.abs(want)))
