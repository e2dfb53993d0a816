"""gpytorch-cnngp: exact infinite-width CNN Gaussian-process kernels, native to GPyTorch.

Write an architecture as layers and get its kernel::

    from gpytorch_cnngp import Sequential, Conv2d, ReLU
    model = Sequential(Conv2d(3), ReLU(), Conv2d(3, stride=2), ReLU(), Conv2d(14, padding=0))
    K = model(X)            # [N, N], X of shape [N, C, 28, 28]
    net = model.nn(channels=16, in_channels=3, out_channels=10)  # a random finite network
"""

from . import architectures
from .engine import gram, gram_diag
from .kernel import CNNGPKernel
from .layers import (
    GELU,
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Erf,
    GlobalAvgPool2d,
    Layer,
    LeakyReLU,
    ReLU,
    Sequential,
    Sum,
    resnet_block,
)
from .models import SharedCovarianceExactGP

__version__ = "0.1.0"

__all__ = [
    "CNNGPKernel",
    "SharedCovarianceExactGP",
    "AvgPool2d",
    "Conv2d",
    "Dense",
    "Elementwise",
    "Erf",
    "GELU",
    "GlobalAvgPool2d",
    "Layer",
    "LeakyReLU",
    "ReLU",
    "Sequential",
    "Sum",
    "architectures",
    "gram",
    "gram_diag",
    "resnet_block",
]
