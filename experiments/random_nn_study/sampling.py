"""Inputs and sampling: the first MNIST test digits (full MNIST or an ``.npz`` sample), area-downscaled, and the
outputs of many random finite networks ``model.nn(C)`` on them, drawn one network at a time from one seeded
generator and returned as float64 ``[networks, images, outputs]`` on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpytorch_cnngp import datasets

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the `experiments` extra
    tqdm = None

MNIST_TEST_OFFSET = 60000  # load_mnist returns the 60k training images, then the 10k test images


def load_images(n_images: int, image_size: int, images_npz: str | None, data_dir: str | None) -> dict[str, Any]:
    """The first ``n_images`` MNIST test digits as float64 ``[n, 1, image_size, image_size]`` in [0, 1].

    From the full MNIST (``datasets.load_mnist``, downloaded and verified if missing), or from an ``.npz``
    holding ``test_images`` (and optionally ``test_labels``), such as ``tests/data/mnist_sample.npz``.
    Other sizes than 28 are area-downscaled.
    """
    if images_npz is not None:
        with np.load(images_npz) as data:
            images = data["test_images"]
            labels = data["test_labels"] if "test_labels" in data else np.full(len(images), -1)
        source, first = f"{images_npz} (test_images)", 0
    else:
        images, labels = datasets.load_mnist(data_dir, progress=True)
        source, first = "MNIST official test set", MNIST_TEST_OFFSET
    available = len(images) - first
    if n_images > available:
        raise ValueError(f"--n-images {n_images}: only {available} test images in {source}")
    x = torch.as_tensor(np.asarray(images[first : first + n_images]), dtype=torch.float64)[:, None] / 255.0
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="area")
    return {
        "x": x,
        "labels": [int(v) for v in labels[first : first + n_images]],
        "indices": list(range(n_images)),  # within the test set
        "source": source,
    }


def sample_outputs(
    model,
    x: torch.Tensor,
    channels: int,
    n_networks: int,
    out_channels: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> torch.Tensor:
    """Outputs of ``n_networks`` random networks ``model.nn(channels)`` on ``x``: float64 ``[M, N, O]`` (CPU).

    The networks are drawn one after the other from one generator seeded with ``seed``. (They are evaluated
    one at a time: on a batch of a few 28x28 images, batching networks with ``torch.vmap``, as the tests do for
    tiny images, was 1.5-2x slower here.)
    """
    g = torch.Generator(device=device).manual_seed(seed)
    xf = x.to(device=device, dtype=torch.float32)
    out = torch.empty(n_networks, x.shape[0], out_channels, dtype=torch.float64)
    bar = None
    if progress and tqdm is not None:
        bar = tqdm(total=n_networks, desc=f"C={channels}", unit="net", leave=True, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for m in range(n_networks):
                net = model.nn(
                    channels,
                    in_channels=x.shape[1],
                    out_channels=out_channels,
                    generator=g,
                    dtype=torch.float32,
                    device=device,
                )
                f = net(xf)
                if f.shape != (x.shape[0], out_channels):
                    raise RuntimeError(f"unexpected network output shape {tuple(f.shape)}")
                out[m] = f.to(device="cpu", dtype=torch.float64)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out
